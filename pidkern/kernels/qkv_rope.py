"""The attention's QKV Linear with QK-norm and RoPE in its epilogue (op "qkv_rope").

    q, k, v = split(h W^T);  q = RoPE(RMSNorm(q) * wq);  k = RoPE(RMSNorm(k) * wk)

written straight into the [B, T+L, H, hd] tensors that SDPA reads (text rows first),
so the QKV output is never written, read back, normalised and written again: the
"prep" kernel's 300 MB round trip per patch block at 2048² disappears, and with it the
prepared copy that sat next to the QKV output at the block's memory peak.

Each program owns a BLOCK_M x BLOCK_N tile of the [M, 3*H*hd] product. BLOCK_N is a
multiple of hd and divides H*hd, so a tile lies inside one of q, k, v and holds whole
heads: the RMS over a head and the rotation of pairs (2m, 2m+1) need nothing from
other tiles. The accumulator is rounded to the output dtype before the norm, as the
unfused chain rounds the Linear's output, so both paths normalise the same numbers.
Power-of-two head dims only (64 in the patch blocks); the pixel blocks' 72 keep the
prep kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pidkern.kernels._common import (FLOAT_DTYPES, INTERPRET as _INTERPRET, SM90, ArchAutotune, aligned_rows,
                                     dot_precision, gemm_k_loop, grouped_tile, on_device)



def _configs(family: str):
    """The CUDA configs (the interpreter launches the kernel directly, see _launch)."""
    if family == SM90:
        # 8 warps (two warpgroups) throughout: offline for sm_90 the 128 x 64 and 64 x 128 tiles
        # do not spill, 128 x 128 spills ~340 bytes and 64 x 256 ~160 in the norm/RoPE epilogue;
        # 4-warp tiles and 128 x 256 spilled far more and are left out
        return [
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
        ]
    # SM80 (<= 99 KB per block, mma.sync), from bench.compile_matrix for sm_89/sm_120: every
    # Hopper tile fits (at most 80 KB) but 128 x 128 and 64 x 256 spill 470-630 bytes in the
    # norm/RoPE epilogue under mma.sync's accumulator layout, even with BLOCK_K 32; the
    # 128 x 64 and 64 x 128 tiles (72 KB at 4 stages) and 64 x 64 with 4 warps do not spill
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    ]


def _prune(configs, named_args, **kwargs):
    hd, hhd = kwargs["HD"], kwargs["HHD"]
    fit = [c for c in configs if c.kwargs["BLOCK_N"] % hd == 0 and hhd % c.kwargs["BLOCK_N"] == 0]
    # small models (few heads of 16 or 32): one head per tile always fits
    return fit or [triton.Config({"BLOCK_M": 64, "BLOCK_N": hd, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4,
                                 num_stages=3)]


@triton.jit
def _qkv_rope_kernel(h_ptr, w_ptr, q_ptr, k_ptr, v_ptr, nw_ptr, cos_ptr, sin_ptr,
                     M, N, D, tok0, n_out, s_hm, s_wn, eps,
                     HD: tl.constexpr, HHD: tl.constexpr, ALIGN: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr):
    """h [M = B*N, D] (row stride s_hm, in ALIGN units), w [3*HHD, D]; output row of
    token n of batch b: b*n_out + tok0 + n in q/k/v [B, n_out, HHD]."""
    s_hm = s_hm * ALIGN
    s_wn = s_wn * ALIGN
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, 3 * HHD, BLOCK_M, BLOCK_N, GROUP_M)
    # rows past M wrap onto valid ones so the loads need no masks; the store is masked
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rm.to(tl.int64)[:, None] * s_hm + rk[None, :]
    b_ptrs = w_ptr + rn.to(tl.int64)[None, :] * s_wn + rk[:, None]
    acc = gemm_k_loop(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), a_ptrs, b_ptrs, rk, D, 1,
                      w_ptr.dtype.element_ty, BLOCK_K, EVEN_K, DOT_PREC)

    x = acc.to(q_ptr.dtype.element_ty).to(tl.float32)
    region = (pid_n * BLOCK_N) // HHD           # 0: q, 1: k, 2: v
    col = (pid_n * BLOCK_N) % HHD + tl.arange(0, BLOCK_N)
    om = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_tok = (rm % N).to(tl.int64)
    out_row = ((rm // N).to(tl.int64) * n_out + tok0 + n_tok) * HHD
    out_ptrs = out_row[:, None] + col[None, :]
    row_ok = (om < M)[:, None]
    if region == 2:
        tl.store(v_ptr + out_ptrs, x.to(v_ptr.dtype.element_ty), mask=row_ok)
    else:
        dst = q_ptr
        if region == 1:
            dst = k_ptr
        # the RMS of each head in the tile by masked row sums: no 3-D reshape, so the
        # accumulator keeps its layout (the reshape cost a spill at 128 x 128 on sm_90)
        head = (tl.arange(0, BLOCK_N) // HD)[None, :]
        xx = x * x
        r = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for j in tl.static_range(BLOCK_N // HD):
            rj = tl.rsqrt(tl.sum(tl.where(head == j, xx, 0.0), 1) / HD + eps)
            r = tl.where(head == j, rj[:, None], r)
        nw = tl.load(nw_ptr + region * HD + col % HD).to(tl.float32)
        xn = x * r * nw[None, :]
        pair = ((pid_n * BLOCK_N) % HHD // 2 + tl.arange(0, BLOCK_N // 2)) % (HD // 2)
        tab = n_tok[:, None] * (HD // 2) + pair[None, :]
        c = tl.load(cos_ptr + tab)
        s = tl.load(sin_ptr + tab)
        ev, od = tl.split(tl.reshape(xn, (BLOCK_M, BLOCK_N // 2, 2)))
        y = tl.reshape(tl.join(ev * c - od * s, ev * s + od * c), (BLOCK_M, BLOCK_N))
        tl.store(dst + out_ptrs, y.to(dst.dtype.element_ty), mask=row_ok)


_tuned = ArchAutotune(_qkv_rope_kernel, _configs, key=["M", "N", "D", "HD", "HHD", "ALIGN"],
                      prune_configs_by={"early_config_prune": _prune})


def _check(name, h, w, nw, cos, sin, heads):
    if not isinstance(h, torch.Tensor) or h.dim() != 3:
        raise ValueError(f"{name}: expected a [B, N, D] tensor, got "
                         f"{tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__}")
    if h.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: dtype {h.dtype} not supported; expected one of {FLOAT_DTYPES}")
    if h.stride(2) != 1:
        raise ValueError(f"{name}: last dim must be contiguous (strides {h.stride()})")
    B, N, D = h.shape
    if h.shape[0] > 1 and h.stride(0) != N * h.stride(1):
        raise ValueError(f"{name}: batch and token dims must merge into rows (strides {h.stride()})")
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[1] != D or w.shape[0] % (3 * heads):
        raise ValueError(f"{name} weight: expected [3*heads*hd, {D}] with heads={heads}, got "
                         f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    if w.dtype != h.dtype or w.device != h.device or w.stride(1) != 1:
        raise ValueError(f"{name} weight: expected {h.dtype} on {h.device} with contiguous rows, got {w.dtype} "
                         f"on {w.device} with strides {w.stride()}")
    hd = w.shape[0] // (3 * heads)
    if hd & (hd - 1) or hd < 16:
        raise ValueError(f"{name} weight: head dim {hd} must be a power of two >= 16 (the pixel blocks' 72 use "
                         f"attention_prep)")
    if not isinstance(nw, torch.Tensor) or tuple(nw.shape) != (2, hd) or not nw.is_contiguous() \
            or nw.device != h.device or not nw.is_floating_point():
        raise ValueError(f"{name} norms: expected the q and k RMSNorm weights stacked as a contiguous float [2, {hd}] "
                         f"on {h.device}, got "
                         f"{(tuple(nw.shape), nw.dtype, nw.device) if isinstance(nw, torch.Tensor) else nw!r}")
    for tname, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (N, hd // 2) or t.dtype != torch.float32 \
                or not t.is_contiguous() or t.device != h.device:
            raise ValueError(f"{name} rope {tname}: expected contiguous float32 [{N}, {hd // 2}] on {h.device}, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else t!r}")
    return B, N, D, hd


def rows_aligned(h: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether every row of h and w starts 16-byte aligned, which the CUDA path requires
    (see _common.aligned_rows)."""
    return aligned_rows([h, w], h.stride(1), w.stride(0))[1]


def _launch(h, w, nw, cos, sin, q, k, v, tok0, eps, hd):
    B, N, D = h.shape
    M = B * N
    if M == 0:
        return
    hhd = q.shape[2] * q.shape[3]
    align, ok = aligned_rows([h, w], h.stride(1), w.stride(0))
    if h.is_cuda and not ok:
        raise ValueError(f"qkv_rope: on CUDA the rows of h (strides {h.stride()}) and w (strides {w.stride()}) "
                         f"must start 16-byte aligned; pidkern.ops.qkv_rope falls back to PyTorch for these")
    args = (h, w, q, k, v, nw, cos, sin, M, N, D, tok0, q.shape[1], h.stride(1) // align, w.stride(0) // align,
            float(eps))
    consts = dict(HD=hd, HHD=hhd, ALIGN=align, DOT_PREC=dot_precision(h.dtype))
    with on_device(h):
        if _INTERPRET:
            bn = max(hd, 32) if hhd % max(hd, 32) == 0 else hd
            grid = (triton.cdiv(M, 32) * (3 * hhd // bn),)
            _qkv_rope_kernel[grid](*args, **consts, BLOCK_M=32, BLOCK_N=bn, BLOCK_K=32, GROUP_M=4,
                                   EVEN_K=D % 32 == 0, num_warps=4, num_stages=1)
        else:
            def grid(meta):
                return (triton.cdiv(M, meta["BLOCK_M"]) * (3 * hhd // meta["BLOCK_N"]),)
            _tuned.at(h.device)[grid](*args, **consts, EVEN_K=D % 64 == 0)


def qkv_rope(h_img: torch.Tensor, w_img: torch.Tensor, norms_img: torch.Tensor, cos_img: torch.Tensor,
                sin_img: torch.Tensor, h_txt: torch.Tensor | None, w_txt: torch.Tensor | None,
                norms_txt: torch.Tensor | None, cos_txt: torch.Tensor | None, sin_txt: torch.Tensor | None,
                heads: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, jobs = _plan(h_img, w_img, norms_img, cos_img, sin_img, h_txt, w_txt, norms_txt, cos_txt, sin_txt,
                          heads)
    for h, w, norms, cos, sin, tok0, hd in jobs:
        _launch(h, w, norms, cos, sin, q, k, v, tok0, eps, hd)
    return q, k, v


def _plan(h_img, w_img, norms_img, cos_img, sin_img, h_txt, w_txt, norms_txt, cos_txt, sin_txt, heads):
    if not isinstance(heads, int) or heads <= 0:
        raise ValueError(f"heads: expected a positive int, got {heads!r}")
    B, L, _, hd = _check("h_img", h_img, w_img, norms_img, cos_img, sin_img, heads)
    T = 0
    jobs = []
    if h_txt is not None:
        Bt, T, _, hd_t = _check("h_txt", h_txt, w_txt, norms_txt, cos_txt, sin_txt, heads)
        if Bt != B or hd_t != hd or h_txt.dtype != h_img.dtype or h_txt.device != h_img.device:
            raise ValueError(f"h_txt: batch {Bt}, head dim {hd_t}, {h_txt.dtype} on {h_txt.device} must match "
                             f"h_img's {B}, {hd}, {h_img.dtype} on {h_img.device}")
        jobs.append((h_txt, w_txt, norms_txt, cos_txt, sin_txt, 0, hd))
    elif any(t is not None for t in (w_txt, norms_txt, cos_txt, sin_txt)):
        raise ValueError("w_txt/norms_txt/cos_txt/sin_txt: given without h_txt")
    jobs.append((h_img, w_img, norms_img, cos_img, sin_img, T, hd))
    shape = (B, T + L, heads, hd)
    q, k, v = (torch.empty(shape, device=h_img.device, dtype=h_img.dtype) for _ in range(3))
    return q, k, v, jobs
