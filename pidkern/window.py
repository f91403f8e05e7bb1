"""Windowed decoding: one canvas, overlapping windows of a trained size, fused at every step.

PiD was trained at a few output resolutions (`PiDConfig.trained_res`). Past them, or past
the card's memory, the canvas is split into overlapping windows of one size inside that
range. At every sampler step each window's velocity is the network's on its crop of the
current canvas, its crop of the latent (so its own adapter tokens) and the caption; the
velocities are blended into one canvas velocity with weights that sum to one at every
pixel, and the sampler steps once on the whole canvas with noise drawn for the whole
canvas (the MultiDiffusion rule). Nothing differs between windows but the network's view,
and a window covering the whole canvas is exactly the plain decode. See docs/windows.md.

The pieces, each written once:
- `make_grid`: the window grid (sizes aligned to the latent cell and the patch, edge
  windows shifted inward, never padded) with its checks;
- `WindowGrid.profiles`: the blend weights, separable, normalised per axis;
- `windowed_velocity`: crops, evaluates in batches of windows, blends (and under a
  torch.distributed group, spreads the windows over the ranks and sums with all_reduce);
- `pid_evaluator`: the reference PiD network on a batch of windows.
"""
from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .config import PiDConfig

AUTO = "auto"


def cell(cfg: PiDConfig) -> int:
    """Output pixels a window's side and position must be a multiple of: whole latent cells
    (so the window's latent crop is exact) and whole patches."""
    return math.lcm(cfg.upscale, cfg.patch)


def has_range(cfg: PiDConfig) -> bool:
    return cfg.trained_res[1] > 0


def in_trained_range(cfg: PiDConfig, h: int, w: int) -> bool:
    """Whether an h x w output lies within the checkpoint's training (by area: the release
    trains equal-area buckets of several aspect ratios). Below the range counts as in it:
    windows cannot help a small image."""
    return not has_range(cfg) or h * w <= cfg.trained_res[1] ** 2


def default_window(cfg: PiDConfig) -> int:
    """The largest trained side, aligned down to the cell: the most context per window and
    the fewest windows."""
    c = cell(cfg)
    return max(c, cfg.trained_res[1] // c * c)


def default_overlap(cfg: PiDConfig) -> int:
    """A quarter of the default window, aligned to the cell. The outer quarter of an
    overlap gets no weight (a window's prediction is least reliable where its context is
    cut; the adapter's 3x3 convolutions alone reach 10 patch cells in), the middle half is
    the raised-cosine ramp."""
    c = cell(cfg)
    return max(c, default_window(cfg) // 4 // c * c)


def _side_pair(window, name: str) -> tuple[int, int]:
    if isinstance(window, int) and not isinstance(window, bool):
        return window, window
    if (isinstance(window, (tuple, list)) and len(window) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in window)):
        return int(window[0]), int(window[1])
    raise TypeError(f"{name}={window!r}: expected None, 'auto', an int (square window, output pixels) or "
                    f"(height, width)")


def check_window(cfg: PiDConfig, window) -> tuple[int, int]:
    """(h, w) of a requested window: positive multiples of the cell, inside the trained
    range (each side >= its low end, the area <= its high end squared)."""
    h, w = _side_pair(window, "window")
    c = cell(cfg)
    lo, hi = cfg.trained_res
    if h <= 0 or w <= 0 or h % c or w % c:
        raise ValueError(f"window={window!r}: sides must be positive multiples of {c} output pixels (one latent "
                         f"cell of {cfg.name} is {cfg.upscale} px, a patch {cfg.patch} px)")
    if has_range(cfg) and (min(h, w) < lo or h * w > hi * hi):
        lo_c = -(-lo // c) * c
        raise ValueError(f"window={window!r}: outside the trained range of {cfg.name} (sides >= {lo}, area <= "
                         f"{hi}x{hi}); expected a window from {lo_c} to {hi // c * c} px in steps of {c}, "
                         f"or window='auto' ({default_window(cfg)})")
    return h, w


def check_overlap(overlap, size: tuple[int, int]) -> int:
    if isinstance(overlap, bool) or not isinstance(overlap, int):
        raise TypeError(f"overlap={overlap!r}: expected an int (output pixels) or None")
    if overlap < 0 or overlap >= min(size):
        raise ValueError(f"overlap={overlap}: expected 0 <= overlap < the window's smaller side "
                         f"({min(size)} px)")
    return overlap


def _starts(n_px: int, win: int, overlap: int, c: int) -> tuple[int, ...]:
    """Window starts along one axis: evenly spread, aligned to `c`, the first at 0 and the
    last ending at the edge; as few as keep every pair overlapping by >= `overlap`."""
    if win >= n_px:
        return (0,)
    span = (n_px - win) // c               # cells the last window starts at
    n = 2
    while -(-span // (n - 1)) * c > win - overlap:
        n += 1
    return tuple(c * round(i * span / (n - 1)) for i in range(n))


def _ramp(length: int, overlap: int) -> torch.Tensor:
    """Weight of a window's first `length` pixels from an inner edge, float64: zero over
    the outer quarter of the overlap, a raised cosine over its middle half, one after."""
    m = overlap // 4
    r = overlap - 2 * m
    i = torch.arange(length, dtype=torch.float64)
    if r == 0:
        return (i >= m).double()
    u = ((i - m + 0.5) / r).clamp(0, 1)
    return 0.5 - 0.5 * torch.cos(math.pi * u)


def _profiles(starts: Sequence[int], win: int, n_px: int, overlap: int) -> torch.Tensor:
    """[len(starts), win] float64 weights along one axis, summing to one at every pixel."""
    ramp = _ramp(win, overlap)
    raw = torch.ones(len(starts), win, dtype=torch.float64)
    for k, s in enumerate(starts):
        if s > 0:
            raw[k] *= ramp
        if s + win < n_px:
            raw[k] *= ramp.flip(0)
    total = torch.zeros(n_px, dtype=torch.float64)
    for k, s in enumerate(starts):
        total[s:s + win] += raw[k]
    if (total <= 0).any():      # _starts keeps every overlap >= `overlap`: cannot happen
        raise AssertionError(f"window profile leaves pixels uncovered: starts {starts}, window {win}")
    return torch.stack([raw[k] / total[s:s + win] for k, s in enumerate(starts)])


@dataclass(frozen=True)
class WindowGrid:
    """Overlapping windows of one size over an output canvas (all in output pixels)."""
    canvas: tuple[int, int]       # (H, W)
    size: tuple[int, int]         # (h, w) of every window
    overlap: int                  # the least overlap of neighbouring windows
    rows: tuple[int, ...]         # top of each row of windows
    cols: tuple[int, ...]         # left of each column of windows
    upscale: int                  # output pixels per latent cell

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    @property
    def whole(self) -> bool:
        """One window covering the canvas: the plain decode."""
        return self.size == self.canvas

    def boxes(self) -> list[tuple[int, int]]:
        """(top, left) of every window, row-major."""
        return [(y, x) for y in self.rows for x in self.cols]

    def crop(self, t: torch.Tensor, k: int) -> torch.Tensor:
        """Window k of an output-sized [B, C, H, W] tensor."""
        y, x = self.boxes()[k]
        return t[..., y:y + self.size[0], x:x + self.size[1]]

    def crop_latent(self, latent: torch.Tensor, k: int) -> torch.Tensor:
        """The latent cells under window k (exact: windows are aligned to the cell)."""
        y, x = self.boxes()[k]
        u = self.upscale
        return latent[..., y // u:(y + self.size[0]) // u, x // u:(x + self.size[1]) // u]

    def profiles(self, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [len(rows), h], cols [len(cols), w]): window (i, j)'s weight at (y, x) is
        rows[i, y] * cols[j, x]; the weights of all windows sum to one at every pixel."""
        py = _profiles(self.rows, self.size[0], self.canvas[0], self.overlap)
        px = _profiles(self.cols, self.size[1], self.canvas[1], self.overlap)
        return py.to(device, dtype), px.to(device, dtype)

    def weight(self, k: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """Window k's [h, w] blend weight."""
        py, px = self.profiles(device, torch.float64)
        i, j = divmod(k, len(self.cols))
        return (py[i][:, None] * px[j][None, :]).to(dtype)

    def describe(self) -> str:
        return (f"{len(self.rows)}x{len(self.cols)} windows of {self.size[0]}x{self.size[1]} over "
                f"{self.canvas[0]}x{self.canvas[1]}, overlap >= {self.overlap}")


def make_grid(cfg: PiDConfig, canvas: tuple[int, int], window=AUTO, overlap: int | None = None) -> WindowGrid:
    """The window grid of a decode of `canvas` (H, W) output pixels.

    window: "auto" (`default_window`) or a size in output pixels, int or (h, w), inside
    the trained range and aligned to `cell(cfg)`; a side longer than the canvas's is the
    canvas's (so a window at least as large as the image is the plain decode).
    overlap: output pixels, 0 <= overlap < the window's smaller side; None: `default_overlap`,
    or a quarter of the window when that is smaller."""
    if isinstance(window, str):
        if window != AUTO:
            raise ValueError(f"window={window!r}: expected None, 'auto', an int or (height, width)")
        if not has_range(cfg):
            raise ValueError(f"window='auto': {cfg.name} declares no trained range (trained_res); pass a "
                             f"window size in output pixels")
        size = (default_window(cfg),) * 2
    else:
        size = check_window(cfg, window)
    c = cell(cfg)
    if overlap is None:
        overlap = min(default_overlap(cfg), max(0, min(size) // 4 // c * c)) if has_range(cfg) else min(size) // 4
    overlap = check_overlap(overlap, size)
    H, W = canvas
    if H % c or W % c:
        raise ValueError(f"canvas {H}x{W}: windowed decoding needs sides in whole latent cells ({c} px)")
    h, w = min(size[0], H), min(size[1], W)
    return WindowGrid((H, W), (h, w), overlap, _starts(H, h, overlap, c), _starts(W, w, overlap, c), cfg.upscale)


def rank_windows(n: int, rank: int, world: int) -> list[int]:
    """The windows one rank of `world` evaluates: contiguous, as even as possible."""
    base, extra = divmod(n, world)
    first = rank * base + min(rank, extra)
    return list(range(first, first + base + (rank < extra)))


def windowed_velocity(grid: WindowGrid, evaluate: Callable[[torch.Tensor, float, list[int]], torch.Tensor],
                      batch_windows: int = 1, group=None, progress=None, pin: bool = False) -> Callable:
    """velocity(x, t) of the whole canvas, for `pidkern.sampler.sample`.

    evaluate(crops, t, ids): the network's velocity [len(ids)*B, 3, h, w] on window crops
    [len(ids)*B, 3, h, w] (window-major: window ids[0]'s B images first) at time t.
    batch_windows: windows per evaluate call. group: a torch.distributed group whose ranks
    each evaluate their share of the windows; the weighted sums meet in one all_reduce per
    step, so every rank steps the same canvas. progress: optional callable(windows_done)
    after every batch. pin: the blended velocity in pinned host memory (a host canvas
    beside a CUDA device: the windows' velocities come back at full PCIe speed).
    """
    if isinstance(batch_windows, bool) or not isinstance(batch_windows, int) or batch_windows < 1:
        raise ValueError(f"batch_windows={batch_windows!r}: expected a positive int")
    mine = list(range(len(grid)))
    if group is not None:
        import torch.distributed as dist
        mine = rank_windows(len(grid), dist.get_rank(group), dist.get_world_size(group))
    cache: dict = {}

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        if "w" not in cache:
            cache["w"] = grid.profiles(x.device, torch.float32)
        py, px = cache["w"]
        b = x.shape[0]
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device, pin_memory=pin)
        for first in range(0, len(mine), batch_windows):
            ids = mine[first:first + batch_windows]
            crops = torch.cat([grid.crop(x, k) for k in ids])
            v = evaluate(crops, t, ids)
            for n, k in enumerate(ids):
                i, j = divmod(k, len(grid.cols))
                wk = py[i][:, None] * px[j][None, :]
                grid.crop(out, k).add_(v[n * b:(n + 1) * b].to(out.device, torch.float32) * wk)
            if progress:
                progress(len(ids))
        if group is not None:
            import torch.distributed as dist
            dist.all_reduce(out, group=group)
        return out
    return velocity


def pid_evaluator(net, grid: WindowGrid, latent: torch.Tensor, text: torch.Tensor, sigma: torch.Tensor,
                  dtype: torch.dtype, device) -> Callable:
    """evaluate(crops, t, ids) of the reference PiDNet: each window's adapter tokens come
    from its own latent crop (computed once, at its first use) and the caption is every
    window's."""
    b = latent.shape[0]
    h, w = grid.size
    tokens: dict[int, torch.Tensor] = {}

    def evaluate(crops: torch.Tensor, t: float, ids: list[int]) -> torch.Tensor:
        for k in ids:
            if k not in tokens:
                tokens[k] = net.adapter_tokens(grid.crop_latent(latent, k).to(device, dtype), h, w)
        n = len(ids)
        tt = torch.full((n * b,), t, device=device, dtype=torch.float32)
        lq = torch.cat([tokens[k] for k in ids])
        return net(crops.to(device), tt, text.repeat(n, 1, 1), None, sigma.repeat(n), lq_tokens=lq)
    return evaluate


# Captured window batches per engine: (batch rows, h, w, text length, t, overrides) -> Runner,
# with one memory pool and one lock per engine (its graphs are replayed one at a time).
_captured: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_captured_lock = threading.Lock()


def fast_evaluator(engine, grid: WindowGrid, latent: torch.Tensor, text: torch.Tensor, sigma: torch.Tensor,
                   overrides=None, graphs: bool = False) -> Callable:
    """evaluate(crops, t, ids) of the fast path (pidkern.engine's FastPiD): a batch of
    windows is one FastPiD forward at the window's shape, under the plan of that shape
    (the same for every batch of that many windows), its adapter prologue run once per
    batch and kept; the velocity is the final layer folded (as the engine's ODE step).

    graphs: each (batch shape, time) is one CUDA graph, captured once per engine and
    replayed for every batch of windows of every decode (all of them in one memory pool);
    its static inputs are the crops, the adapter tokens, the text stream and sigma."""
    from .fast import AdapterHeads
    from .graphs import Runner, capture
    from .reference import fold_patch_pixels
    model, cfg = engine.model, engine.cfg
    b, (h, w), t_len = latent.shape[0], grid.size, text.shape[1]
    kept: dict = {}
    fl = model.net.final_layer
    tab = engine.tables(h, w, t_len)

    def velocity(x, t, heads, y, sig, plan, racing):
        p = model.forward(x, t, heads, y, sig, tab, plan, racing=racing)
        return fold_patch_pixels(fl(p.to(fl.linear.weight.dtype)), x.shape[0], h, w, cfg.patch)

    def runner(rows: int, t: float, plan, tokens, y):
        with _captured_lock:
            store = _captured.setdefault(engine, dict(pool=torch.cuda.graph_pool_handle(), lock=threading.Lock(),
                                                      runners={}))
        key = (rows, h, w, t_len, t, tuple(sorted(plan.overrides.items())))
        if key not in store["runners"]:
            dev = engine.device
            bufs = dict(x=torch.randn(rows, 3, h, w, device=dev), tokens=torch.randn_like(tokens),
                        y=torch.randn_like(y), sigma=torch.rand(rows, device=dev))

            def run(first):
                heads = AdapterHeads(model.net.lq_proj, bufs["tokens"], keep=plan["keep_heads"])
                return velocity(bufs["x"], t, heads, bufs["y"], bufs["sigma"], plan, first)
            graph, out = capture(run, dev, pool=store["pool"])
            store["runners"][key] = Runner(graph, bufs, out)
        return store["lock"], store["runners"][key]

    def evaluate(crops: torch.Tensor, t: float, ids: list[int]) -> torch.Tensor:
        n = len(ids)
        plan = engine.plan(n * b, h, w, t_len, overrides)
        if tuple(ids) not in kept:
            lat = torch.cat([grid.crop_latent(latent, k) for k in ids])
            kept[tuple(ids)] = model.prologue(lat, text.repeat(n, 1, 1), h, w, plan["keep_heads"])
        heads, y = kept[tuple(ids)]
        x, sig = crops.to(engine.device).contiguous(), sigma.repeat(n)
        if not graphs:
            return velocity(x, t, heads, y, sig, plan, True)
        lock, r = runner(n * b, t, plan, heads.tokens, y)
        with lock:
            return r.replay(x=x, tokens=heads.tokens, y=y, sigma=sig)
    return evaluate


WHOLE = "whole"


def resolve_grid(cfg: PiDConfig, canvas: tuple[int, int], window=None, overlap=None,
                 trained: bool = True) -> WindowGrid | None:
    """What `Decoder.decode(window=, overlap=)` runs: None for the plain decode, else the grid.

    window=None refuses a canvas past the trained range (for trained weights: `trained`),
    naming window="auto"; window="whole" decodes it whole anyway; a grid of one window
    covering the canvas is the plain decode (None)."""
    h, w = canvas
    if window is None or window == WHOLE:
        if overlap is not None:
            raise ValueError(f"overlap={overlap!r}: needs window= ('auto' or a size in output pixels)")
        if window is None and trained and not in_trained_range(cfg, h, w):
            lo, hi = cfg.trained_res
            raise ValueError(f"latent: decodes to {h}x{w}, outside the trained range of {cfg.name} (up to {hi}x{hi} "
                             f"in area; trained at {lo} to {hi} px); decode it in windows with window='auto' "
                             f"({default_window(cfg)} px windows blended at every step), or whole anyway with "
                             f"window='whole' (the network was not trained there)")
        return None
    grid = make_grid(cfg, canvas, window, overlap)
    return None if grid.whole else grid


def canvas_band_rows(canvas_width: int, batch: int, band_bytes: int = 64 * 2**20) -> int:
    """Image rows per in-place sampler update on a canvas: about `band_bytes` of float64
    temporaries (five per element: x, v, eps, x0 and the sum)."""
    return max(1, band_bytes // (batch * 3 * canvas_width * 8 * 5))


def sample_windows(net, inputs, *, dtype: torch.dtype, device, canvas: str = "auto", batch_windows: int = 1,
                   group=None, progress=None, evaluate=None) -> torch.Tensor:
    """The windowed decode of `inputs` (pidkern.inputs.DecodeInputs, its `window` the grid):
    `pidkern.sampler.sample` over the whole canvas, its velocity
    blended from the windows (`windowed_velocity`) evaluated by `evaluate` (default: the
    reference network `net`, `pid_evaluator`; the fast path passes `fast_evaluator`).

    canvas: where the canvas, the noise draws and the sampler's update live (`canvas_place`:
    "auto" keeps it on `device` unless it is past CANVAS_DEVICE_BYTES on CUDA; on the host,
    the release stream's noise is the host generator's stream of the seed). The network
    runs on `device`."""
    from ._ext import philox_draws
    from .sampler import release_draws, sample
    grid, latent, text, sigma = inputs.window, inputs.latent, inputs.text, inputs.sigma
    steps, seed, sampler, noise = inputs.steps, inputs.seed, inputs.sampler, inputs.noise
    device = torch.device(device)
    b = latent.shape[0]
    host = canvas_place(b, grid.canvas, device.type, canvas) == "host"
    canvas_device = torch.device("cpu") if host else device
    shape = (b, 3, *grid.canvas)
    if evaluate is None:
        evaluate = pid_evaluator(net, grid, latent, text.to(dtype), sigma, dtype, device)
    total = len(grid) * steps if group is None else len(rank_windows(len(grid), _rank(group), _world(group))) * steps
    done = [0]

    def tick(n):
        done[0] += n
        progress(done[0], total)

    pin = host and device.type == "cuda"
    velocity = windowed_velocity(grid, evaluate, batch_windows, group, tick if progress else None, pin)
    draws = (philox_draws if noise == "philox" else release_draws)(seed, canvas_device)
    if pin:     # the canvas itself in pinned memory: its window crops go to the card at full speed
        stream = draws
        draws = lambda k, shp: stream(k, shp).pin_memory()    # noqa: E731
    return sample(velocity, shape, steps=steps, sampler=sampler, draw=draws, device=canvas_device,
                  band_rows=canvas_band_rows(grid.canvas[1], b))


def _rank(group) -> int:
    import torch.distributed as dist
    return dist.get_rank(group)


def _world(group) -> int:
    import torch.distributed as dist
    return dist.get_world_size(group)


# -- memory and the plan ------------------------------------------------------------------

# A canvas whose sampler state (x, the blended velocity, one noise draw: three float32
# images) takes more than this lives in host memory; the card then holds the weights and
# one batch of windows whatever the output size. 4 GiB keeps 8192² (2.25 GiB for batch 1)
# on the card and puts 16384² (9 GiB) on the host.
CANVAS_DEVICE_BYTES = 4 * 2**30
CANVAS_PLACES = ("auto", "device", "host")


def canvas_state_bytes(batch: int, canvas: tuple[int, int]) -> int:
    return 3 * batch * 3 * canvas[0] * canvas[1] * 4


def canvas_place(batch: int, canvas: tuple[int, int], device_type: str, place: str = "auto") -> str:
    """Where the canvas lives: "device" or "host" ("auto": the host past CANVAS_DEVICE_BYTES,
    on CUDA only; off CUDA the device is the host)."""
    if place not in CANVAS_PLACES:
        raise ValueError(f"canvas={place!r}: expected one of {CANVAS_PLACES}")
    if place != "auto":
        return place
    if device_type != "cuda":
        return "device"
    return "host" if canvas_state_bytes(batch, canvas) > CANVAS_DEVICE_BYTES else "device"


def token_bytes(cfg: PiDConfig, grid: WindowGrid, batch: int, dtype_bytes: int) -> int:
    """Every window's adapter tokens, kept for the decode (each computed once)."""
    per_window = (grid.size[0] // cfg.patch) * (grid.size[1] // cfg.patch) * cfg.adapter_width
    return len(grid) * batch * per_window * dtype_bytes


def windowed_memory(cfg: PiDConfig, batch: int, grid: WindowGrid, window_bytes: int, dtype_bytes: int = 2,
                    place: str = "auto", batch_windows: int = 1) -> dict:
    """GPU bytes of a windowed decode: `window_bytes` (the decode of one batch of windows,
    weights included: memory.estimate_memory at the window's size and batch x
    batch_windows), plus, where the canvas lives on the card, the canvas's sampler state,
    one band of the in-place update's float64 temporaries and every window's adapter
    tokens; on the host those are host bytes instead, and the card holds one batch of
    window crops and velocities in flight."""
    where = canvas_place(batch, grid.canvas, "cuda", place)
    band = canvas_band_rows(grid.canvas[1], batch) * batch * 3 * grid.canvas[1] * 8 * 5
    canvas = canvas_state_bytes(batch, grid.canvas) + band
    tokens = token_bytes(cfg, grid, batch, dtype_bytes)
    staging = 2 * batch_windows * batch * 3 * grid.size[0] * grid.size[1] * 4
    on_card = canvas + tokens if where == "device" else staging
    return dict(device=window_bytes + on_card, host=0 if where == "device" else canvas + tokens, canvas=where,
                window=window_bytes, canvas_bytes=canvas, token_bytes=tokens)


@dataclass
class WindowPlan:
    """What a windowed decode runs: the grid, windows per network call, where the canvas
    lives, its memory (bytes), and the plan of one batch of windows (the fast path's Plan,
    or None)."""
    grid: WindowGrid
    batch_windows: int
    canvas: str
    memory: dict
    window_plan: object = None

    def __str__(self) -> str:
        m = self.memory
        lines = [f"windowed decode: {self.grid.describe()}",
                 f"  windows per network call: {self.batch_windows}",
                 f"  canvas: {self.canvas} ({m['canvas_bytes'] / 2**30:.2f} GiB incl. one update band; adapter tokens "
                 f"{m['token_bytes'] / 2**30:.2f} GiB)",
                 f"  GPU memory (estimate): {m['device'] / 2**30:.2f} GiB (one batch of windows "
                 f"{m['window'] / 2**30:.2f} GiB); host {m['host'] / 2**30:.2f} GiB"]
        if self.window_plan is not None:
            lines += ["  each batch of windows:"] + ["    " + ln for ln in str(self.window_plan).splitlines()]
        return "\n".join(lines)


def windowed_estimate(estimate, cfg: PiDConfig, batch: int, height: int, width: int, window, overlap, place: str,
                      batch_windows: int, **kw) -> int:
    """`memory.estimate_memory(..., window=)`: the bytes on the card (see windowed_memory)."""
    grid = make_grid(cfg, (height, width), window, overlap)
    if grid.whole:
        return estimate(cfg, batch, height, width, **kw)
    one = estimate(cfg, batch * batch_windows, *grid.size, **kw)
    return windowed_memory(cfg, batch, grid, one, kw.get("dtype_bytes", 2), place, batch_windows)["device"]


def window_plan(cfg: PiDConfig, batch: int, grid: WindowGrid, device_type: str, window_bytes: int, inner=None,
                batch_windows: int = 1, place: str = "auto", dtype_bytes: int = 2) -> WindowPlan:
    """The WindowPlan of a decode. window_bytes: one batch of windows' decode
    (memory.estimate_memory at the window's size); inner(latent_shape): its plan."""
    u = cfg.upscale
    where = canvas_place(batch, grid.canvas, device_type, place)
    mem = windowed_memory(cfg, batch, grid, window_bytes, dtype_bytes, where, batch_windows)
    shape = (batch * batch_windows, cfg.latent_channels, grid.size[0] // u, grid.size[1] // u)
    return WindowPlan(grid, batch_windows, where, mem, inner(shape) if inner else None)
