"""The fast decode path: fused kernels, work moved out of the step loop, CUDA graphs.

What it does differently from the reference (same math, same weights):
- At load: the time embedding and every block's adaLN vectors for the schedule's times
  (they depend on t alone), w1/w3 of every SwiGLU concatenated into one matrix (the
  reference's w1/w3 become views of it, so no weight exists twice), the pixel blocks'
  modulation rows regrouped into the half needed before attention and the half needed
  after it.
- Once per decode: the latent adapter's convolutions and, while they take at most
  256 MiB, all its output heads (beyond that each head is recomputed where it is used,
  0.3% of the FLOPs, to hold the memory target); the text embedding; the RoPE and sin-cos
  tables (cached per shape).
- Per step: patch/pixel embedding, gated residual + RMSNorm + adaLN, the sigma gate,
  attention with QK-norm + RoPE, SwiGLU through `pidkern.ops` (Triton, or cuBLAS where a
  one-time race at warm-up finds it faster); the pixel blocks'
  Linear(1536 -> 24576) modulation in bands of patches (at most 128 MiB at once); the
  output head + fold + sampler update through `pidkern._C` in one pass. The last patch
  block's text stream is not updated (nothing reads it).
- On CUDA the whole decode (adapter, 4 steps, sampler) is one CUDA graph per
  (batch, height, width, text length, steps, sampler), kept in a small LRU cache.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import ops
from .config import PiDConfig, get_preset
from .reference import pixel_sincos, rope_angles_1d, rope_angles_2d, rope_tables
from .sampler import T_LIST, check_noise, make_generator, philox_key, schedule, seed_int64

# "qkv_rope+sdpa": the patch blocks' QKV Linear with QK-norm + RoPE in its epilogue
# (ops.qkv_rope), then SDPA; an engine route, since it starts from the block's normalised
# input rather than from the QKV output. The pixel blocks (head dim 72) take "prep+sdpa"
# when it is forced.
QKV_ROPE = "qkv_rope+sdpa"
ATTENTION_BACKENDS = ops.ATTENTION_BACKENDS + (QKV_ROPE,)
# Raced at warm-up (the patch routes with their QKV GEMMs, so the race is fair). Left out:
# the unfused chain (never wins, and its float32 temporaries would set the decode's
# memory peak during the race) and "prep+triton" (its core hit an illegal memory access
# on H200, 2026-11-26, in the one shape whose rows Triton could not see were aligned,
# since fixed but not yet rerun on a GPU; selectable by hand).
AUTO_ATTENTION = ("prep+sdpa", "triton", QKV_ROPE)
MODULATION_BAND_BYTES = 128 * 2**20   # the bound is 256 MiB; half keeps the peak low


class InsufficientMemoryError(RuntimeError):
    """A decode that would not fit in the GPU's free memory, refused before it starts."""


# ------------------------------------------------------------------------ memory model

def parked_modules(net) -> list:
    """What the engine reads only while it loads: the timestep embedder and the patch
    blocks' adaLN Linears (their outputs at the schedule's times are precomputed), and the
    pixel blocks' adaLN Linear (the engine computes from its regrouped copy). 0.88 GiB of
    flux-2k's 2.54 GiB in bf16."""
    mods = [net.t_embedder]
    for b in net.patch_blocks:
        mods += [b.adaLN_modulation_img, b.adaLN_modulation_txt]
    return mods + [b.adaLN_modulation for b in net.pixel_blocks]


def park(net) -> None:
    """Move parked_modules to host memory, on a CUDA decoder's fast path."""
    if not getattr(net, "_pidkern_parked", False):
        for m in parked_modules(net):
            m.to("cpu")
        net._pidkern_parked = True


def unpark(net, device: torch.device) -> None:
    """Bring parked modules back to `device` (the reference forward needs them)."""
    if getattr(net, "_pidkern_parked", False):
        for m in parked_modules(net):
            m.to(device)
        net._pidkern_parked = False


def weight_bytes(cfg: PiDConfig, dtype_bytes: int = 2) -> int:
    """Device bytes of the weights the fast engine keeps resident."""
    with torch.device("meta"):
        from .reference import PiDNet
        net = PiDNet(cfg)
        n = sum(p.numel() for p in net.parameters())
        n -= sum(p.numel() for m in parked_modules(net) for p in m.parameters())
    # the engine adds a regrouped copy of each pixel block's modulation matrix
    extra = cfg.pixel_blocks * 6 * cfg.pixel_dim * cfg.pixels_per_patch * (cfg.hidden + 1)
    return (n + extra) * dtype_bytes


# Fitted on NVIDIA H200 measurements (bench/results/engine_check_nvidia-h200_2026-11-26.json,
# flux-2k at 1024², 2048², 4096² batch 1 and 2048² batch 4; the image term has since lost
# the four noise images decode no longer draws outside the graph's buffers): the CUDA graph's private
# pool holds about 1.9x the largest transient working set (the four steps are unrolled in
# one capture and freed blocks of one size rarely fit the next request), and about
# 0.3 GiB more stays with cuBLAS/cuDNN workspaces and allocator rounding.
GRAPH_POOL_FACTOR = 1.9
FIXED_OVERHEAD = int(0.30 * 2**30)


def estimate_memory(preset, batch: int, height: int, width: int, text_len: int | None = None,
                    dtype_bytes: int = 2, noise: str = "release") -> int:
    """Predicted GPU bytes a fast decode holds once warm (torch.cuda.memory_reserved).

    What the engine keeps for the whole decode (weights, the graph's static buffers,
    adapter tokens and heads, pixel tokens, the float32 residual stream) plus the graph
    pool, sized from the larger of the two transient peaks: patch attention (qkv, its
    normed/roped copy, the output) and the pixel block (attention of the compressed
    tokens, or one modulation band). Checked against measurements by bench/engine_check.py.
    noise: the decode's noise stream ("release" or "philox", see Decoder.decode).
    """
    cfg = preset if isinstance(preset, PiDConfig) else get_preset(preset)
    check_noise(noise)
    t = cfg.max_text if text_len is None else text_len
    L = (height // cfg.patch) * (width // cfg.patch)
    n = batch * L
    e = dtype_bytes
    d = cfg.hidden
    image = batch * 3 * height * width * 4                    # one float32 image
    n_heads = cfg.num_lq_heads + cfg.is_v15
    heads = n_heads * n * d * e if heads_fit(cfg, n, e) else n * d * e
    per_pixel = cfg.pixels_per_patch * cfg.pixel_dim
    persistent = (
        n * cfg.adapter_width * e                             # adapter tokens
        + heads                                               # heads' outputs (or the one in use)
        + batch * t * d * 4                                   # text stream (float32)
        # the graph's noise buffers, x in flight, the copy returned; Philox noise needs no
        # buffers, only the initial image, which the graph makes itself
        + image * (4 if noise == "release" else 1)
        + n * per_pixel * e                                   # pixel tokens
    )
    m = batch * (L + t)
    patch_peak = n * d * 4 + m * 3 * d * e * 2 + m * d * e    # residual, qkv + its roped copy, output
    pa = n * cfg.pixel_attn_dim * e
    band_rows = max(1, min(n, MODULATION_BAND_BYTES // (6 * per_pixel * e)))
    pixel_peak = n * d * e + max(pa * 8,                      # s; compressed tokens, qkv x2, output
                                 pa + band_rows * per_pixel * e * (4 + 1 + 1))  # or a band's m, e, tokens
    transient = max(patch_peak, pixel_peak)
    return weight_bytes(cfg, e) + persistent + int(GRAPH_POOL_FACTOR * transient) + FIXED_OVERHEAD


def free_device_bytes(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


# ------------------------------------------------------------------------------- graphs

class GraphCache:
    """A bounded LRU of per-shape runners, each with its own lock.

    `factory(key)` builds a runner (a captured CUDA graph with its static buffers); the
    cache holds at most `capacity` of them and drops the least recently used, which
    frees its memory pool.
    """

    def __init__(self, factory, capacity: int = 2):
        if capacity < 1:
            raise ValueError(f"capacity={capacity}: expected at least 1 cached graph")
        self.factory = factory
        self.capacity = capacity
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.builds = 0

    def get(self, key):
        with self._lock:
            entry = self._items.get(key)
            if entry is not None:
                self._items.move_to_end(key)
                return entry
            entry = _Entry(self.factory(key), threading.Lock())
            self.builds += 1
            self._items[key] = entry
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
            return entry

    def keys(self):
        with self._lock:
            return list(self._items)

    def __len__(self):
        return len(self._items)


@dataclass
class _Entry:
    runner: object
    lock: threading.Lock


# ------------------------------------------------------------------------------ engine

@dataclass
class _Weights:
    """Per-t precomputed conditioning."""
    temb: torch.Tensor          # [1, 1, D] float32, pre-SiLU
    img: list                   # per patch block: 6 x [1, 1, D] float32
    txt: list


class Engine:
    """Fast decoding for one Decoder. Build through `Decoder.engine()`.

    On CUDA it parks the weights it needs only while loading in host memory (see
    parked_modules; park_weights=False keeps them); a reference decode on the same
    network brings them back for good."""

    def __init__(self, decoder, attention_backend: str | None = None, graphs: bool | None = None,
                 graph_capacity: int = 2, park_weights: bool = True):
        self.decoder = decoder
        self.net = decoder.net
        self.cfg: PiDConfig = decoder.config
        self.device = decoder.device
        self.dtype = decoder.dtype
        self.attention_backend = attention_backend or os.environ.get("PIDKERN_ATTENTION_BACKEND")
        if self.attention_backend is not None and self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend={self.attention_backend!r}: expected one of {ATTENTION_BACKENDS}")
        disable_graphs = os.environ.get("PIDKERN_DISABLE_GRAPHS") == "1"
        self.use_graphs = (self.device.type == "cuda" and not disable_graphs) if graphs is None else graphs
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError("graphs=True needs a CUDA device")
        self._attn_choice: dict = {}
        self._op_choice: dict = {}      # (op, shape) -> "triton" | "torch" | a variant, measured on CUDA
        self.choice_ms: dict = {}
        self._tables: dict = {}
        unpark(self.net, self.device)     # a second engine on a network the first one parked
        self._prepare_weights()
        self._per_t = {t: self._conditioning(t) for t in sorted(set(T_LIST) | {1.0}) if t > 0}
        if self.device.type == "cuda" and park_weights:
            park(self.net)
        self.graphs = GraphCache(self._build_runner, graph_capacity)

    # -- load-time work ------------------------------------------------------------------
    @torch.no_grad()
    def _prepare_weights(self):
        cfg = self.cfg
        for blk in self.net.patch_blocks:
            for mlp in (blk.mlp_x, blk.mlp_y):
                if not hasattr(mlp, "w13"):
                    hm = mlp.w1.weight.shape[0]
                    mlp.w13 = torch.cat([mlp.w1.weight, mlp.w3.weight], 0)
                    # the reference keeps working on views of the one concatenated matrix
                    mlp.w1.weight.data = mlp.w13[:hm]
                    mlp.w3.weight.data = mlp.w13[hm:]
        for blk in self.net.patch_blocks:
            a = blk.attn
            # q and k norm weights side by side, as ops.qkv_rope reads them
            a.qk_norms_x = torch.stack([a.q_norm_x.weight, a.k_norm_x.weight])
            a.qk_norms_y = torch.stack([a.q_norm_y.weight, a.k_norm_y.weight])
        dp, p2 = cfg.pixel_dim, cfg.pixels_per_patch
        self.pixel_mod = []
        for blk in self.net.pixel_blocks:
            lin = blk.adaLN_modulation[0]
            w = lin.weight.view(p2, 6, dp, -1)
            b = lin.bias.view(p2, 6, dp)
            # per pixel: (shift1, scale1) before attention, (gate1, shift2, scale2, gate2) after
            self.pixel_mod.append((w[:, :2].reshape(p2 * 2 * dp, -1).contiguous(), b[:, :2].reshape(-1).contiguous(),
                                   w[:, 2:].reshape(p2 * 4 * dp, -1).contiguous(), b[:, 2:].reshape(-1).contiguous()))

    @torch.no_grad()
    def _conditioning(self, t: float) -> _Weights:
        net = self.net
        tt = torch.full((1,), t, device=self.device)
        mlp = net.t_embedder.mlp
        from .reference import timestep_embedding
        e = timestep_embedding(tt * 1000, net.t_embedder.freq_dim)
        h = F.linear(e, mlp[0].weight.float(), mlp[0].bias.float())
        temb = F.linear(F.silu(h), mlp[2].weight.float(), mlp[2].bias.float())
        c = F.silu(temb)

        def six(lin):
            return [m.view(1, 1, -1) for m in F.linear(c, lin.weight.float(), lin.bias.float()).chunk(6, -1)]

        return _Weights(temb.view(1, 1, -1),
                        [six(b.adaLN_modulation_img[0]) for b in net.patch_blocks],
                        [six(b.adaLN_modulation_txt[0]) for b in net.patch_blocks])

    def tables(self, h: int, w: int, text_len: int):
        key = (h, w, text_len)
        if key not in self._tables:
            cfg, dev = self.cfg, self.device
            hs, ws = h // cfg.patch, w // cfg.patch
            half = cfg.pixel_dim // 2
            sc = pixel_sincos(1, w, cfg.pixel_dim, dev)[0, :, :half].float()
            sr = pixel_sincos(h, 1, cfg.pixel_dim, dev)[:, 0, half:].float()
            self._tables[key] = dict(
                rope_img=rope_tables(rope_angles_2d(hs, ws, cfg.head_dim, cfg.rope_ref_grid, dev)),
                rope_txt=rope_tables(rope_angles_1d(text_len, cfg.head_dim, dev)),
                rope_pix=rope_tables(rope_angles_2d(hs, ws, cfg.pixel_head_dim, cfg.rope_ref_grid, dev)),
                sincos_col=sc.contiguous(), sincos_row=sr.contiguous())
        return self._tables[key]

    # -- the network, fused ----------------------------------------------------------------
    def patch_attention(self, a, hx, hy, tab, choose=False):
        """The patch block's joint attention from its normalised inputs: (o_img, o_txt)."""
        heads = self.cfg.heads

        def run(backend):
            if backend == QKV_ROPE:
                q, k, v = ops.qkv_rope(hx, a.qkv_x.weight, a.qk_norms_x, tab["rope_img"], hy, a.qkv_y.weight,
                                       a.qk_norms_y, tab["rope_txt"], heads=heads)
                return ops.attend(q, k, v, hy.shape[1], True)
            qkv_x, qkv_y = F.linear(hx, a.qkv_x.weight), F.linear(hy, a.qkv_y.weight)
            return ops.attention(qkv_x, qkv_y, a.q_norm_x.weight, a.k_norm_x.weight, a.q_norm_y.weight,
                                 a.k_norm_y.weight, tab["rope_img"], tab["rope_txt"], heads, backend=backend)

        key = ("patch", hx.shape, hy.shape)
        if choose:
            self._choose(key, run, AUTO_ATTENTION, hx)
        return run(self.attention_backend or self._attn_choice.get(key, "triton"))

    def pixel_attention(self, qkv, at, tab, choose=False):
        """The pixel block's attention over its compressed tokens (no text)."""
        weights = (at.q_norm.weight, at.k_norm.weight, None, None)

        def run(backend):
            return ops.attention(qkv, None, *weights, tab["rope_pix"], None, self.cfg.pixel_heads,
                                 backend=backend)[0]

        key = ("pixel", qkv.shape)
        if choose:
            self._choose(key, run, tuple(b for b in AUTO_ATTENTION if b != QKV_ROPE), qkv)
        forced = "prep+sdpa" if self.attention_backend == QKV_ROPE else self.attention_backend
        return run(forced or self._attn_choice.get(key, "triton"))

    def _choose(self, key, run, backends, t):
        """Time each backend once for this shape and keep the fastest."""
        if self.attention_backend or key in self._attn_choice or not t.is_cuda:
            return
        from .timing import time_ms
        best = None
        for backend in backends:
            try:
                ms = time_ms(lambda: run(backend), warmup=2, reps=5)["median_ms"]
            except Exception as err:  # a backend that cannot run this shape is skipped, loudly
                print(f"pidkern: attention backend {backend} failed for {key[0]} {tuple(t.shape)}: {err}")
                continue
            self.choice_ms.setdefault(str(key), {})[backend] = ms
            if best is None or ms < best[1]:
                best = (backend, ms)
        self._attn_choice[key] = best[0] if best else "torch"

    def patch_blocks(self, xs, y, lq, sigma, cond: _Weights, tab, choose=False):
        net, cfg = self.net, self.cfg
        n_blocks = len(net.patch_blocks)
        b, L, d = xs.shape
        pend_x = pend_y = None
        for i, blk in enumerate(net.patch_blocks):
            last = i == n_blocks - 1
            sh1, sc1, g1, sh2, sc2, g2 = cond.img[i]
            th1, tc1, tg1, th2, tc2, tg2 = cond.txt[i]
            if i % cfg.lq_every == 0:
                if pend_x is not None:
                    xs = torch.addcmul(xs, pend_x[1], pend_x[0])
                    pend_x = None
                j = i // cfg.lq_every
                gm = net.lq_proj.gate_modules[j]
                head = lq.head(j)
                xs = self.fastest("gate", xs.shape, choose, lambda: ops.lq_gate(xs, head, gm.content_proj.weight,
                                                                     gm.content_proj.bias, gm.log_alpha, sigma))
                del head
            a = blk.attn
            xs, hx = ops.add_rms_modulate(xs, blk.norm_x1.weight, sh1, sc1, *(pend_x or (None, None)),
                                          eps=cfg.rms_eps, out_dtype=self.dtype)
            y, hy = ops.add_rms_modulate(y, blk.norm_y1.weight, th1, tc1, *(pend_y or (None, None)),
                                         eps=cfg.rms_eps, out_dtype=self.dtype)
            pend_x = pend_y = None
            ox, oy = self.patch_attention(a, hx, hy, tab, choose)
            del hx, hy  # every temporary is dropped as soon as it is read: the peak is the sum
            ax = F.linear(ox, a.proj_x.weight, a.proj_x.bias)
            ay = F.linear(oy, a.proj_y.weight, a.proj_y.bias) if not last else None
            del ox, oy
            xs, hx = ops.add_rms_modulate(xs, blk.norm_x2.weight, sh2, sc2, ax, g1, eps=cfg.rms_eps,
                                          out_dtype=self.dtype)
            del ax
            pend_x = (self._mlp(blk.mlp_x, hx, choose), g2)
            del hx
            if not last:  # the last block's text stream is never read
                y, hy = ops.add_rms_modulate(y, blk.norm_y2.weight, th2, tc2, ay, tg1, eps=cfg.rms_eps,
                                             out_dtype=self.dtype)
                pend_y = (self._mlp(blk.mlp_y, hy, choose), tg2)
                del hy
        return torch.addcmul(xs, pend_x[1], pend_x[0])

    def _mlp(self, mlp, h, choose=False):
        shape = h.shape
        u = h.reshape(-1, shape[-1])
        hidden = self.fastest("swiglu", u.shape, choose, lambda: ops.swiglu_gate_up(u, mlp.w13),
                              split=lambda: ops.swiglu_gate_up(u, mlp.w13, split=True))
        return F.linear(hidden, mlp.w2.weight).view(shape)

    def fastest(self, op: str, shape, choose: bool, call, **variants):
        """Run `call` with op's kernel, its PyTorch math (`ops.disabled`), or one of the
        other Triton variants given by name, whichever measured fastest here.

        GEMM-shaped fusions race cuBLAS: the winner depends on the card and the shape, so
        the engine times each once at warm-up (choose=True, before any graph capture)."""
        key = (op, tuple(shape))

        def plain():
            with ops.disabled(op):
                return call()
        runs = {"triton": call, "torch": plain, **variants}
        if choose and self.device.type == "cuda" and key not in self._op_choice:
            from .timing import time_ms
            ms = {name: time_ms(fn, warmup=2, reps=5)["median_ms"] for name, fn in runs.items()}
            self._op_choice[key] = min(ms, key=ms.get)
            self.choice_ms[str(key)] = ms
        return runs[self._op_choice.get(key, "triton")]()

    def pixel_blocks(self, p, s, batch, tab, choose=False):
        cfg = self.cfg
        rows, p2, dp = p.shape
        band = max(1, MODULATION_BAND_BYTES // (6 * p2 * dp * s.element_size()))
        for blk, (w_pre, b_pre, w_post, b_post) in zip(self.net.pixel_blocks, self.pixel_mod):
            a = torch.empty(rows, cfg.pixel_attn_dim, device=p.device, dtype=self.dtype)
            for r0 in range(0, rows, band):
                r1 = min(rows, r0 + band)
                m = F.linear(s[r0:r1], w_pre, b_pre).view(r1 - r0, p2, 2 * dp)
                _, u = ops.add_rms_modulate(p[r0:r1], blk.norm1.weight, m[..., :dp], m[..., dp:], eps=cfg.rms_eps,
                                            out_dtype=self.dtype)
                a[r0:r1] = F.linear(u.reshape(r1 - r0, p2 * dp), blk.compress_to_attn.weight, blk.compress_to_attn.bias)
            at = blk.attn
            qkv = F.linear(a.view(batch, rows // batch, -1), at.qkv.weight)
            o = self.pixel_attention(qkv, at, tab, choose)
            del qkv
            a = F.linear(o, at.proj.weight, at.proj.bias).view(rows, -1)
            del o
            for r0 in range(0, rows, band):
                r1 = min(rows, r0 + band)
                m = F.linear(s[r0:r1], w_post, b_post)
                e = F.linear(a[r0:r1], blk.expand_from_attn.weight, blk.expand_from_attn.bias)
                mlp = blk.mlp
                # a band's new tokens depend on that band alone: update p in place
                p[r0:r1] = ops.pixel_post(p[r0:r1], e, m, blk.norm2.weight, mlp.fc1.weight, mlp.fc1.bias,
                                          mlp.fc2.weight, mlp.fc2.bias, eps=cfg.rms_eps)
                del m, e
        return p

    def step(self, x, t, lq, y0, sigma, tab, choose=False):
        """The network at time t on image x [B, 3, H, W] -> pixel tokens before the output head."""
        net, cfg = self.net, self.cfg
        cond = self._per_t[t]
        b = x.shape[0]
        xin = x.to(self.dtype)
        xs, p = self.fastest("embed", xin.shape, choose, lambda: ops.patch_pixel_embed(
            xin, net.s_embedder.proj.weight, net.s_embedder.proj.bias, net.pixel_embedder.proj.weight,
            net.pixel_embedder.proj.bias, tab["sincos_col"], tab["sincos_row"], cfg.patch))
        del xin
        xs = self.patch_blocks(xs.float(), y0, lq, sigma, cond, tab, choose)
        s = F.silu(cond.temb + xs)
        if cfg.is_v15:
            g = net.pit_lq_gate
            head = lq.head(len(net.lq_proj.output_heads))
            s = ops.lq_gate(s, head, g.content_proj.weight, g.content_proj.bias, g.log_alpha, sigma)
            del head
        s = s.to(self.dtype).reshape(b * xs.shape[1], -1)
        return self.pixel_blocks(p, s, b, tab, choose)

    def prologue(self, latent, text, h, w):
        """Once per decode: adapter tokens, the heads' outputs (see _Heads), the text embedding."""
        net = self.net
        tokens = net.adapter_tokens(latent.to(self.dtype), h, w)
        heads = _Heads(net.lq_proj, tokens, keep=heads_fit(self.cfg, tokens.shape[0] * tokens.shape[1]))
        ye = net.y_embedder
        y = ye.norm(F.linear(text.to(self.dtype), ye.proj.weight, ye.proj.bias)).float()
        return heads, y + net.y_pos_embedding[:, :text.shape[1]].float()

    def run(self, latent, sigma, text, noise, steps, sampler, h, w, choose=False):
        """The whole decode. noise: the release stream's draws (noise[0] the initial image,
        noise[k] the k-th eps), or a 0-d int64 Philox key, whose draw k is made here, in
        the graph (the initial image by philox_normal, the eps inside the output stage)."""
        from . import _ext
        cfg = self.cfg
        times = schedule(steps)
        tab = self.tables(h, w, text.shape[1])
        lq, y0 = self.prologue(latent, text, h, w)
        fl = self.net.final_layer
        philox = isinstance(noise, torch.Tensor)
        x = _ext.philox_normal(noise, self._counter(0), (latent.shape[0], 3, h, w)) if philox else noise[0]
        for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
            p = self.step(x, t, lq, y0, sigma, tab, choose)
            head = (p, fl.norm.weight, fl.linear.weight, fl.linear.bias, x, self._scalar(t))
            if sampler == "sde" and t_next > 0:
                eps = dict(seed=noise, step=self._counter(i + 1)) if philox else dict(noise=noise[i + 1])
                x = _ext.pixel_output_step(*head, self._scalar(t_next), **eps, patch=cfg.patch, eps=cfg.rms_eps)
            elif sampler == "sde":
                x, _ = _ext.pixel_output_final(*head, patch=cfg.patch, eps=cfg.rms_eps)
            else:
                from .reference import fold_patch_pixels
                v = fold_patch_pixels(fl(p.to(fl.linear.weight.dtype)), x.shape[0], h, w, cfg.patch)
                x = (x.double() + (t_next - t) * v.double()).float()
        return x.clamp(-1, 1)

    def _counter(self, k: int) -> torch.Tensor:
        """The Philox stream's draw index k as a device scalar (graphs freeze Python ints)."""
        return self._device_scalar(k, torch.int64)

    def _scalar(self, t: float) -> torch.Tensor:
        # float64: the extension then reproduces the release's Python-float update exactly
        return self._device_scalar(t, torch.float64)

    def _device_scalar(self, value, dtype: torch.dtype) -> torch.Tensor:
        key = ("scalar", dtype, value)
        if key not in self._tables:
            self._tables[key] = torch.tensor(value, dtype=dtype, device=self.device)
        return self._tables[key]

    # -- graphs ------------------------------------------------------------------------
    def _build_runner(self, key):
        b, c, lh, lw, t_len, steps, sampler, noise = key
        h, w = self.cfg.output_size(lh, lw)
        dev = self.device
        bufs = dict(latent=torch.zeros(b, c, lh, lw, device=dev), sigma=torch.zeros(b, device=dev),
                    text=torch.zeros(b, t_len, self.cfg.text_dim, device=dev))
        if noise == "philox":
            bufs["noise"] = torch.zeros((), dtype=torch.int64, device=dev)     # the key
        else:
            bufs["noise"] = [torch.zeros(b, 3, h, w, device=dev).normal_() for _ in range(steps)]
        for k in ("latent", "text"):
            bufs[k].normal_()
        args = (bufs["latent"], bufs["sigma"], bufs["text"], bufs["noise"], steps, sampler, h, w)
        # warm-up on a side stream: autotuning, attention choice, cuBLAS handles, all before capture
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            self.run(*args, choose=True)
            self.run(*args)
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.run(*args)
        # the warm-up's blocks are free now; hand them back so only the graph's pool stays
        torch.cuda.empty_cache()
        return _Runner(graph, bufs, out)

    # -- entry point ---------------------------------------------------------------------
    def draw_noise(self, shape, steps, sampler, seed, out=None):
        """The release's stream: one generator, initial noise then one eps per re-noising.

        With `out` (a graph's static buffers) the draws go straight into them: a separate
        set would hold as many more image-sized float32 buffers at the decode's peak."""
        gen = make_generator(seed, self.device)
        n_eps = sum(1 for t in schedule(steps)[1:] if t > 0) if sampler == "sde" else 0
        if out is None:
            out = [torch.empty(shape, device=self.device, dtype=torch.float32) for _ in range(1 + n_eps)]
        for buf in out[:1 + n_eps]:
            torch.randn(shape, generator=gen, out=buf)
        return out[:1 + n_eps]

    def check_memory(self, batch, h, w, text_len, noise="release"):
        if self.device.type != "cuda":
            return
        need = estimate_memory(self.cfg, batch, h, w, text_len, noise=noise) - weight_bytes(self.cfg)
        free = free_device_bytes(self.device)
        if need > free:
            raise InsufficientMemoryError(
                f"decode of batch {batch} at {h}x{w} needs about {need / 2**30:.2f} GiB of GPU memory beyond the "
                f"weights (estimate_memory), but only {free / 2**30:.2f} GiB is free on {self.device}")

    @torch.inference_mode()
    def decode(self, latent, sigma, text, steps, seed, size, sampler, progress=None, noise="release"):
        h, w = size
        b = latent.shape[0]
        if not self.use_graphs:
            self.check_memory(b, h, w, text.shape[1], noise)
            if noise == "philox":
                draws = philox_key(seed, self.device)
            else:
                draws = self.draw_noise((b, 3, h, w), steps, sampler, seed)
            out = self.run(latent, sigma, text, draws, steps, sampler, h, w, choose=latent.is_cuda)
            if progress:
                progress(steps, steps)
            return out
        key = (b, latent.shape[1], latent.shape[2], latent.shape[3], text.shape[1], steps, sampler, noise)
        if key not in self.graphs.keys():
            self.check_memory(b, h, w, text.shape[1], noise)
        entry = self.graphs.get(key)
        with entry.lock:
            r = entry.runner
            r.bufs["latent"].copy_(latent)
            r.bufs["sigma"].copy_(sigma)
            r.bufs["text"].copy_(text)
            if noise == "philox":
                r.bufs["noise"].fill_(seed_int64(seed))      # the whole stream follows on the device
            else:
                self.draw_noise((b, 3, h, w), steps, sampler, seed, out=r.bufs["noise"])
            r.graph.replay()
            out = r.out.clone()
        if progress:
            progress(steps, steps)
        return out


HEADS_KEEP_BYTES = 256 * 2**20


def heads_fit(cfg: PiDConfig, rows: int, dtype_bytes: int = 2) -> bool:
    """Whether all adapter heads' outputs, kept for the whole decode, take <= 256 MiB."""
    return (cfg.num_lq_heads + cfg.is_v15) * rows * cfg.hidden * dtype_bytes <= HEADS_KEEP_BYTES


class _Heads:
    """The adapter heads' outputs [B, L, D] (j = 0..6, and pit_head last in v1.5).

    Computed once per decode while they take at most 256 MiB (1024² and below). Beyond
    that (352 MiB at 2048², 1.4 GiB at 4096²) each is recomputed from the adapter tokens
    where it is used: 0.3% more FLOPs, and the decode stays within its memory target.
    """

    def __init__(self, lq_proj, tokens, keep: bool):
        self.lins = list(lq_proj.output_heads) + ([lq_proj.pit_head] if hasattr(lq_proj, "pit_head") else [])
        self.tokens = tokens
        self.kept = [self._compute(j) for j in range(len(self.lins))] if keep else None

    def _compute(self, j):
        return F.linear(self.tokens, self.lins[j].weight, self.lins[j].bias)

    def head(self, j):
        return self.kept[j] if self.kept is not None else self._compute(j)


@dataclass
class _Runner:
    graph: object
    bufs: dict
    out: torch.Tensor
