"""The fast path's GPU memory model: what a warm decode holds, predicted before it runs.

`estimate_memory` is public (a caller can size batches with it); the fast path also
uses it to refuse a decode that cannot fit before any work starts. See docs/design.md,
"Memory".
"""
from __future__ import annotations

import functools

import torch

from .config import PiDConfig, get_preset
from .routes import PRECISIONS
from .sampler import check_noise
# the shape rules the plan records (re-exported: the memory model's vocabulary)
from .sizes import HEADS_KEEP_BYTES, MODULATION_BAND_BYTES, heads_fit, modulation_band_rows, split_rows  # noqa: F401

# Fitted on NVIDIA H200 measurements (bench/results/engine_check_nvidia-h200_2026-11-26.json,
# flux-2k at 1024², 2048², 4096² batch 1 and 2048² batch 4): the CUDA graph's private pool
# holds about 1.9x the largest transient working set (the four steps are unrolled in one
# capture and freed blocks of one size rarely fit the next request), and about 0.3 GiB
# more stays with cuBLAS/cuDNN workspaces and allocator rounding.
GRAPH_POOL_FACTOR = 1.9
FIXED_OVERHEAD = int(0.30 * 2**30)


class InsufficientMemoryError(RuntimeError):
    """A decode that would not fit in the GPU's free memory, refused before it starts."""


def _config(preset) -> PiDConfig:
    return preset if isinstance(preset, PiDConfig) else get_preset(preset)


def weight_bytes(preset, dtype_bytes: int = 2, precision: str = "native") -> int:
    """Device bytes of the weights a fast decoder holds while it decodes fast, asked from
    the fast model itself, built on the meta device (no memory, no time): the reference
    network's parameters less those the Decoder parks (`FastPiD.unread_parameters`), plus
    what FastPiD's layers own (`FastPiD.resident_bytes`). A reference decode brings the
    parked ones back. precision="fp8": the fp8 layers hold one byte per weight and four
    per output row (their scales), docs/fp8.md."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    dtypes = {1: torch.float8_e4m3fn, 2: torch.bfloat16, 4: torch.float32}
    if dtype_bytes not in dtypes:
        raise ValueError(f"dtype_bytes={dtype_bytes!r}: expected one of {sorted(dtypes)}")
    return _weight_bytes(_config(preset), dtypes[dtype_bytes], precision)


@functools.lru_cache(maxsize=64)
def _weight_bytes(cfg: PiDConfig, dtype: torch.dtype, precision: str) -> int:
    # a config's answer never changes, and building the meta model takes seconds: the
    # small-card ladder and the card predictions ask for it many times
    from .fast import FastPiD
    from .reference import PiDNet
    with torch.device("meta"):
        net = PiDNet(cfg).to(dtype)
        return FastPiD(net, dtype, precision).resident_bytes()


def estimate_memory(preset, batch: int, height: int, width: int, text_len: int | None = None,
                    dtype_bytes: int = 2, noise: str = "release", world_size: int = 1,
                    precision: str = "native", sampler: str = "sde", cfg_scale: float = 1.0, window=None,
                    overlap: int | None = None, canvas: str = "auto", batch_windows: int = 1, graphs: bool = True,
                    band_rows: int | None = None, keep_heads: bool | None = None) -> int:
    """Predicted GPU bytes a fast decode holds once warm (torch.cuda.memory_reserved).

    What the fast path keeps for the whole decode (weights, the graph's static buffers,
    adapter tokens and heads, pixel tokens, the float32 residual stream) plus the graph
    pool, sized from the larger of the two transient peaks: patch attention (qkv, its
    normed/roped copy, the output) and the pixel block (attention of the compressed
    tokens, or one modulation band). Checked against measurements by bench/engine_check.py.
    noise: the decode's noise stream ("release" or "philox", see Decoder.decode).
    world_size: the ranks of a sequence-parallel decode (pidkern.parallel, docs/parallel.md):
    the bytes of the rank with the longest band of rows. The band's tokens and images
    shrink with N; the weights, the text stream, one full-size image (the noise draw every
    rank takes whole; rank 0's gathered result) and the gathered keys and values of one
    attention (the whole image's) do not. A forecast: the sequence-parallel fast path runs
    without CUDA graphs today, and no multi-GPU run has checked it.
    precision: the model's ("native" or "fp8", see weight_bytes); the fp8 activations'
    codes (one byte per element of one GEMM input at a time) are left out, a forecast
    no GPU run has checked.
    sampler, cfg_scale: "dpm++" keeps four more images (two predictions of history, the
    velocity, the new prediction) and, with a guidance scale != 1, runs the network on a
    batch of 2B (the unconditional half beside the conditional one): every term of the
    network doubles, and the doubled input and second velocity add two images. A
    forecast: no GPU run has checked the DPM-Solver++ graph.
    window, overlap, canvas, batch_windows: a windowed decode (pidkern.window,
    docs/windows.md): one batch of windows at the window's size, plus the canvas and
    every window's adapter tokens where the canvas lives on the card ("auto": the host
    past pidkern.window.CANVAS_DEVICE_BYTES).
    graphs, band_rows, keep_heads: the plan's settings of those names (None: the plan's
    rules). Without a CUDA graph the allocator holds the transient peak once instead of
    the graph pool's GRAPH_POOL_FACTOR times it (a forecast: only graphed decodes were
    measured).
    """
    cfg = _config(preset)
    if window is not None:
        from .window import windowed_estimate
        return windowed_estimate(estimate_memory, cfg, batch, height, width, window, overlap, canvas, batch_windows,
                                 text_len=text_len, dtype_bytes=dtype_bytes, noise=noise, precision=precision)
    check_noise(noise)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r}: expected a positive int (the ranks of the decode)")
    images = batch                                             # the decode's own images
    if sampler == "dpm++" and cfg_scale != 1.0:
        batch = 2 * batch                                      # the network's batch from here on
    t = cfg.max_text if text_len is None else text_len
    grid_rows, grid_cols = height // cfg.patch, width // cfg.patch
    rows = grid_rows
    if world_size > 1:
        rows = max(n for _, n in split_rows(grid_rows, world_size))
    L = rows * grid_cols                                      # this rank's tokens
    n = batch * L
    n_all = batch * grid_rows * grid_cols
    e = dtype_bytes
    d = cfg.hidden
    image = images * 3 * rows * cfg.patch * width * 4         # one float32 image (this rank's rows)
    n_heads = cfg.num_lq_heads + cfg.is_v15
    keep = heads_fit(cfg, n, e) if keep_heads is None else keep_heads
    heads = n_heads * n * d * e if keep else n * d * e
    per_pixel = cfg.pixels_per_patch * cfg.pixel_dim
    persistent = (
        n * cfg.adapter_width * e                             # adapter tokens
        + heads                                               # heads' outputs (or the one in use)
        + batch * t * d * 4                                   # text stream (float32)
        # the graph's noise buffers, x in flight, the copy returned; Philox noise needs no
        # buffers, only the initial image, which the graph makes itself
        + image * (4 if noise == "release" else 1)
        + n * per_pixel * e                                   # pixel tokens
        + (images * 3 * height * width * 4 if world_size > 1 else 0)  # the full-size draw / gathered image
        # DPM-Solver++: history, velocity, prediction; guided, the doubled x and velocity too
        + (image * (4 + 2 * (batch > images)) if sampler == "dpm++" else 0)
    )
    m = batch * (L + t)
    patch_peak = n * d * 4 + m * 3 * d * e * 2 + m * d * e    # residual, qkv + its roped copy, output
    pa = n * cfg.pixel_attn_dim * e
    band = modulation_band_rows(cfg, n, e) if band_rows is None else min(band_rows, n)
    pixel_peak = n * d * e + max(pa * 8,                      # s; compressed tokens, qkv x2, output
                                 pa + band * per_pixel * e * (4 + 1 + 1))  # or a band's m, e, tokens
    if world_size > 1:
        # K and V stacked to send, every rank's (padded to the longest band), the whole image's
        def gathered(width_):
            return 2 * width_ * e * (n + world_size * n + n_all)
        patch_peak += gathered(d) + 2 * batch * t * d * e     # + the text keys joined to them
        pixel_peak += gathered(cfg.pixel_attn_dim)
    transient = max(patch_peak, pixel_peak)
    pool = GRAPH_POOL_FACTOR if graphs else 1.0
    return weight_bytes(cfg, e, precision) + persistent + int(pool * transient) + FIXED_OVERHEAD


def small_card_ladder(cfg: PiDConfig, rows: int, dtype_bytes: int = 2) -> list[tuple[str, dict]]:
    """The plan settings a card short of memory steps through, cheapest first: each
    (what it gives up, plan overrides) keeps the previous ones. The adapter heads'
    outputs recomputed instead of kept; modulation bands of 16 MiB instead of 128; no
    CUDA graph (its pool holds ~1.9x the transient peak). Past the last rung only a
    smaller working set helps: windowed decoding, or a smaller batch."""
    cfg = _config(cfg)
    small_band = max(1, min(rows, (16 * 2**20) // (6 * cfg.pixels_per_patch * cfg.pixel_dim * dtype_bytes)))
    return [("as planned", {}),
            ("adapter heads recomputed each step", {"keep_heads": False}),
            ("16 MiB modulation bands", {"keep_heads": False, "band_rows": small_band}),
            ("no CUDA graph", {"keep_heads": False, "band_rows": small_band, "graphs": False})]


def fitting_settings(preset, batch: int, height: int, width: int, budget_bytes: int, text_len: int | None = None,
                     dtype_bytes: int = 2, noise: str = "release", precision: str = "native",
                     margin: float = 1.0) -> tuple[str, dict] | None:
    """The first rung of small_card_ladder whose estimate_memory, times `margin`, fits
    in budget_bytes: (what it gives up, plan overrides for Decoder.decode(plan=...)).
    None: not even the last rung fits (decode in windows or a smaller batch)."""
    cfg = _config(preset)
    rows = batch * (height // cfg.patch) * (width // cfg.patch)
    for what, over in small_card_ladder(cfg, rows, dtype_bytes):
        need = estimate_memory(cfg, batch, height, width, text_len, dtype_bytes, noise, precision=precision, **over)
        if need * margin <= budget_bytes:
            return what, over
    return None


def free_device_bytes(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def shortfall(cfg: PiDConfig, device: torch.device, batch: int, h: int, w: int, text_len: int | None = None,
              noise: str = "release", sampler: str = "sde", cfg_scale: float = 1.0) -> int:
    """Bytes a decode lacks beside the loaded weights (0: it fits): what estimate_memory
    predicts beyond the weights, against what the device can still give (free, plus what
    the allocator holds unused). Off CUDA, 0. The one "does it fit" rule: the engine
    refuses a decode by it, the pipelines offload their generator by it."""
    if device.type != "cuda":
        return 0
    need = estimate_memory(cfg, batch, h, w, text_len, noise=noise, sampler=sampler, cfg_scale=cfg_scale) \
        - weight_bytes(cfg)
    return max(0, need - free_device_bytes(device))


def check_fits(cfg: PiDConfig, device: torch.device, batch: int, h: int, w: int, text_len: int,
               noise: str = "release", sampler: str = "sde", cfg_scale: float = 1.0) -> None:
    """Raise InsufficientMemoryError when a decode cannot fit beside the loaded weights."""
    short = shortfall(cfg, device, batch, h, w, text_len, noise, sampler, cfg_scale)
    if short:
        need = estimate_memory(cfg, batch, h, w, text_len, noise=noise, sampler=sampler, cfg_scale=cfg_scale) \
            - weight_bytes(cfg)
        free = need - short
        fit = fitting_settings(cfg, batch, h, w, free + weight_bytes(cfg), text_len, noise=noise)
        hint = (f"; it fits with plan={fit[1]} ({fit[0]})" if fit else
                "; no plan setting makes it fit: decode a smaller batch, or in windows with window='auto' "
                "(pidkern.window)")
        raise InsufficientMemoryError(
            f"decode of batch {batch} at {h}x{w} needs about {need / 2**30:.2f} GiB of GPU memory beyond the "
            f"weights (estimate_memory), but only {free / 2**30:.2f} GiB is free on {device}{hint}")
