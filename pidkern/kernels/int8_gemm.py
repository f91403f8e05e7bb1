"""int8 x int8 -> int32 GEMM with the per-token and per-channel scales in its epilogue.

y[m, n] = s_x[m] * s_w[n] * sum_k q_x[m, k] * q_w[n, k] (+ bias[n]), written in the output
dtype. The codes are int8, the accumulator int32 (exact: |q| <= 128, so a K of up to 2^17
cannot overflow), the epilogue float32. The weight is read as stored, [N, K] row-major, so
a tile of it is the dot's transposed right operand. This is the "triton" route of
pidkern.int8's GEMM; `torch._int_mm` (cuBLASLt's IMMA on CUDA) is the other.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pidkern.kernels._common import FLOAT_DTYPES, INTERPRET_FAMILY, SM90, ArchAutotune, grouped_tile, on_device


def _configs(family: str):
    if family == INTERPRET_FAMILY:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    # int8 tiles are one byte an element: a stage of 128 x 128 x 64 holds 16 KB of A and B.
    configs = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    ]
    if family == SM90:
        # BLOCK_K 128 at 3 stages is 96 KB of operands: room under Hopper's 227 KB, none to
        # spare under the 99 KB of the mma.sync cards (SM80 family)
        configs.insert(1, triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8,
                                        num_stages=3))
    return configs


@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _int8_gemm_kernel(a_ptr, w_ptr, sa_ptr, sw_ptr, bias_ptr, out_ptr, M, N, K,
                      s_am, s_wn, s_om,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows and columns past the edge wrap onto valid ones (no load masks); the store is masked
    rm = offs_m % M
    rn = offs_n % N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * s_am + rk[None, :]
    w_ptrs = w_ptr + rn.to(tl.int64)[None, :] * s_wn + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(w_ptrs)
        else:
            kmask = rk < K - k
            a = tl.load(a_ptrs, mask=kmask[None, :], other=0)
            b = tl.load(w_ptrs, mask=kmask[:, None], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    sa = tl.load(sa_ptr + rm)
    sw = tl.load(sw_ptr + rn)
    y = acc.to(tl.float32) * (sa[:, None] * sw[None, :])
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * s_om + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
             mask=mask)


_int8_gemm_tuned = ArchAutotune(_int8_gemm_kernel, _configs, key=["M", "N", "K"])


def int8_gemm(a: torch.Tensor, sa: torch.Tensor, w: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None,
              out_dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] int8 codes with float32 scales sa [M] (or [M, 1]); w [N, K] int8 with float32
    scales sw [N] (or [N, 1]); bias [N] or None. Returns [M, N] in out_dtype (into `out`)."""
    if a.dtype != torch.int8 or w.dtype != torch.int8:
        raise ValueError(f"a, w: expected int8 codes, got {a.dtype} and {w.dtype}")
    if a.dim() != 2 or w.dim() != 2 or a.shape[1] != w.shape[1]:
        raise ValueError(f"a {tuple(a.shape)}, w {tuple(w.shape)}: expected [M, K] and [N, K]")
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype={out_dtype}: expected one of {FLOAT_DTYPES}")
    m, k = a.shape
    n = w.shape[0]
    sa = sa.reshape(-1).float().contiguous()
    sw = sw.reshape(-1).float().contiguous()
    if sa.numel() != m or sw.numel() != n:
        raise ValueError(f"sa {sa.numel()} / sw {sw.numel()} scales: expected {m} and {n}")
    a = a if a.stride(1) == 1 else a.contiguous()
    w = w if w.stride(1) == 1 else w.contiguous()
    if out is None:
        out = torch.empty(m, n, device=a.device, dtype=out_dtype)
    if m == 0 or n == 0:
        return out
    if k == 0:
        out.zero_()
        return out.add_(bias) if bias is not None else out
    b = bias if bias is not None else sw      # any pointer: HAS_BIAS=False never reads it
    with on_device(a):
        _int8_gemm_tuned.at(a.device)[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)](
            a, w, sa, sw, b, out, m, n, k, a.stride(0), w.stride(0), out.stride(0), HAS_BIAS=bias is not None)
    return out
