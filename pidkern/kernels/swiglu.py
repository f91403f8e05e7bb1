"""SwiGLU gate-up: h = SiLU(u w1^T) * (u w3^T) as one GEMM.

w13 = cat([w1, w3], 0) is built once at load time. Each program owns a BLOCK_M x BLOCK_N
tile of h and runs two accumulators over the same A tile (rows n of w1 and rows Hm + n of
w3), so u is read once per tile and neither product is ever written to memory; the
SiLU-product happens in float32 in the epilogue. The w2 GEMM stays with cuBLAS.

Where cuBLAS beats this GEMM (it did at 2048² on H200: 0.89 ms for the unfused chain vs
1.00), `silu_mul` is the other half of the split: one cuBLAS GEMM against w13, then one
pass that reads [M, 2*Hm] and writes SiLU(a) * b, instead of PyTorch's silu and mul (two
passes, one more [M, Hm] temporary).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from pidkern.kernels._common import (FLOAT_DTYPES, INTERPRET as _INTERPRET, INTERPRET_FAMILY, SM90, ArchAutotune,
                                     dot_precision, grouped_tile, on_device)


def _configs(family: str):
    if family == INTERPRET_FAMILY:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    if family == SM90:
        # Two 128x128 accumulators = a 128x256 output footprint; 3 stages of A + 2 B tiles is 144 KB.
        return [
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        ]
    # SM80 (<= 99 KB per block, mma.sync), from bench.compile_matrix for sm_89/sm_120: the two
    # 128 x 128 accumulators spill under mma.sync (170-220 bytes, with BLOCK_K 32 too) and at 4
    # stages need 144 KB; 64 x 128 at 4 stages needs 120 KB. These three fit without spilling.
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
    ]


@triton.heuristics({"EVEN_K": lambda a: a["D"] % a["BLOCK_K"] == 0})
@triton.jit
def _swiglu_kernel(u_ptr, w_ptr, h_ptr, M, Hm, D,
                   s_um, s_uk, s_wn, s_wk, s_hm, s_hn,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, M, Hm, BLOCK_M, BLOCK_N, GROUP_M)

    # Out-of-range rows/columns wrap onto valid ones so the loads need no M/N masks;
    # the store is masked.
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % Hm
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = u_ptr + rm.to(tl.int64)[:, None] * s_um + rk[None, :] * s_uk
    b1_ptrs = w_ptr + rn.to(tl.int64)[None, :] * s_wn + rk[:, None] * s_wk
    b3_ptrs = b1_ptrs + Hm * s_wn

    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b1 = tl.load(b1_ptrs)
            b3 = tl.load(b3_ptrs)
        else:
            kmask = rk < D - k
            a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
            b1 = tl.load(b1_ptrs, mask=kmask[:, None], other=0.0)
            b3 = tl.load(b3_ptrs, mask=kmask[:, None], other=0.0)
        acc1 = tl.dot(a, b1, acc1, input_precision=DOT_PREC)
        acc3 = tl.dot(a, b3, acc3, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K * s_uk
        b1_ptrs += BLOCK_K * s_wk
        b3_ptrs += BLOCK_K * s_wk

    h = acc1 / (1.0 + tl.exp(-acc1)) * acc3
    om = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    on = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    h_ptrs = h_ptr + om.to(tl.int64)[:, None] * s_hm + on[None, :] * s_hn
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=(om[:, None] < M) & (on[None, :] < Hm))


_swiglu_tuned = ArchAutotune(_swiglu_kernel, _configs, key=["M", "Hm", "D"])


def _check(u: torch.Tensor, w13: torch.Tensor) -> int:
    if u.dim() != 2:
        raise ValueError(f"u: expected a 2-D [M, D] tensor, got shape {tuple(u.shape)}")
    if w13.dim() != 2:
        raise ValueError(f"w13: expected a 2-D [2*Hm, D] tensor, got shape {tuple(w13.shape)}")
    if u.dtype not in FLOAT_DTYPES:
        raise ValueError(f"u: dtype {u.dtype} not supported; expected one of {FLOAT_DTYPES}")
    if w13.dtype != u.dtype:
        raise ValueError(f"w13: dtype {w13.dtype} must match u's dtype {u.dtype}")
    if w13.shape[1] != u.shape[1]:
        raise ValueError(f"w13: expected {u.shape[1]} columns (u's D), got shape {tuple(w13.shape)}")
    if w13.shape[0] % 2 or w13.shape[0] == 0:
        raise ValueError(f"w13: expected an even, non-zero row count (cat([w1, w3])), got {w13.shape[0]}")
    if u.device != w13.device:
        raise ValueError(f"w13: on {w13.device}, expected u's device {u.device}")
    if u.stride(1) != 1:
        raise ValueError(f"u: last dim must be contiguous (stride 1), got strides {u.stride()}")
    if w13.stride(1) != 1:
        raise ValueError(f"w13: last dim must be contiguous (stride 1), got strides {w13.stride()}")
    return w13.shape[0] // 2


def swiglu_gate_up(u: torch.Tensor, w13: torch.Tensor) -> torch.Tensor:
    """h [M, Hm] = SiLU(u w1^T) * (u w3^T), with w13 = cat([w1, w3]) [2*Hm, D]."""
    hm = _check(u, w13)
    M, D = u.shape
    h = torch.empty((M, hm), device=u.device, dtype=u.dtype)
    if M == 0:
        return h
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(hm, meta["BLOCK_N"]),)
    with on_device(u):
        _swiglu_tuned.at(u.device)[grid](u, w13, h, M, hm, D, u.stride(0), u.stride(1), w13.stride(0), w13.stride(1),
                                         h.stride(0), h.stride(1), DOT_PREC=dot_precision(u.dtype))
    return h


@triton.jit
def _silu_mul_kernel(ab_ptr, h_ptr, M, Hm, s_am, s_hm, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm < M)[:, None] & (rn < Hm)[None, :]
    a_ptrs = ab_ptr + rm.to(tl.int64)[:, None] * s_am + rn[None, :]
    a = tl.load(a_ptrs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(a_ptrs + Hm, mask=mask, other=0.0).to(tl.float32)
    h = a / (1.0 + tl.exp(-a)) * b
    tl.store(h_ptr + rm.to(tl.int64)[:, None] * s_hm + rn[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)


def silu_mul(ab: torch.Tensor) -> torch.Tensor:
    """h [M, Hm] = SiLU(a) * b for ab = [a, b] [M, 2*Hm] (the gate-up GEMM's output)."""
    _check_ab(ab)
    M, hm = ab.shape[0], ab.shape[1] // 2
    h = torch.empty((M, hm), device=ab.device, dtype=ab.dtype)
    if M == 0:
        return h
    bm, bn = (16, 32) if _INTERPRET else (8, 512)
    with on_device(ab):
        _silu_mul_kernel[(triton.cdiv(M, bm), triton.cdiv(hm, bn))](ab, h, M, hm, ab.stride(0), h.stride(0),
                                                                   BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    return h


def _check_ab(ab):
    if not isinstance(ab, torch.Tensor) or ab.dim() != 2 or ab.shape[1] % 2 or ab.shape[1] == 0:
        raise ValueError(f"ab: expected a 2-D [M, 2*Hm] tensor, got "
                         f"{tuple(ab.shape) if isinstance(ab, torch.Tensor) else type(ab).__name__}")
    if ab.dtype not in FLOAT_DTYPES:
        raise ValueError(f"ab: dtype {ab.dtype} not supported; expected one of {FLOAT_DTYPES}")
    if ab.stride(1) != 1:
        raise ValueError(f"ab: last dim must be contiguous (stride 1), got strides {ab.stride()}")

