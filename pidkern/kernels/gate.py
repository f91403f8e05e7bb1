"""The sigma-aware latent gate: out = x + sigmoid([x, lq] W^T + b - exp(log_alpha) * sigma) * lq.

v1 (W [D, 2D]): one GEMM over K = 2D that reads x for the first D columns of W and lq for
the last D through two pointers, so the concatenation never exists; the gate and the
residual add run in the epilogue. v1.5 (W [1, 2D]): one scalar gate per token, a row-dot
that is memory bound, so it is a separate kernel that reads each row of x and lq once.

x may be float32 (the residual stream) while lq and W are half precision: tiles are cast
to W's dtype for the dot (what autocast does) but the residual add uses x exactly, and
the result has x's dtype. sigma [B] is per sample (row r belongs to sample r // N);
log_alpha stays a 0-d tensor, read in the kernel, so CUDA graphs do not freeze it.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from pidkern.kernels._common import (FLOAT_DTYPES, INTERPRET_FAMILY, SM90, ArchAutotune, dot_precision, gemm_k_loop,
                                     grouped_tile, on_device)


def _gemm_configs(family: str):
    # No 128x256 tile: with the x/lq epilogue tiles live it spills (ptxas, sm_90).
    if family == INTERPRET_FAMILY:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    if family == SM90:
        return [
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        ]
    # SM80 (<= 99 KB per block, mma.sync), from bench.compile_matrix for sm_89/sm_120: x is
    # float32, so its A tiles take twice the bytes: 128 x 128 x 64 needs 144 KB at 4 stages and
    # 128 x 64 with 4 warps spills; these fit (at most 96 KB) without spilling.
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    ]


@triton.heuristics({"EVEN_K": lambda a: a["D"] % a["BLOCK_K"] == 0})
@triton.jit
def _gate_gemm_kernel(x_ptr, lq_ptr, w_ptr, b_ptr, la_ptr, sig_ptr, out_ptr, M, N, D,
                      s_xb, s_xn, s_lb, s_ln, s_wn, s_wk, s_ob, s_on,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr):
    # M = B*N token rows, D channels (the GEMM's N and half its K); x etc. are [B, N, D]
    # with a unit channel stride.
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, M, D, BLOCK_M, BLOCK_N, GROUP_M)

    rm = ((pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % D
    rk = tl.arange(0, BLOCK_K)
    x_rows = (rm // N) * s_xb + (rm % N) * s_xn
    l_rows = (rm // N) * s_lb + (rm % N) * s_ln
    wdt = w_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_cols = w_ptr + rn.to(tl.int64)[None, :] * s_wn
    # K half 1: x against W[:, :D]; K half 2: lq against W[:, D:].
    acc = gemm_k_loop(acc, x_ptr + x_rows[:, None] + rk[None, :], w_cols + rk[:, None] * s_wk, rk, D, s_wk, wdt,
                  BLOCK_K, EVEN_K, DOT_PREC)
    acc = gemm_k_loop(acc, lq_ptr + l_rows[:, None] + rk[None, :], w_cols + (rk[:, None] + D) * s_wk, rk, D, s_wk, wdt,
                  BLOCK_K, EVEN_K, DOT_PREC)

    # Epilogue on the true (unwrapped) rows and channels.
    om = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    on = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (om[:, None] < M) & (on[None, :] < D)
    ob = om // N
    on_row = om % N
    alpha = tl.exp(tl.load(la_ptr).to(tl.float32))
    sig = tl.load(sig_ptr + ob, mask=om < M, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + on, mask=on < D, other=0.0).to(tl.float32)
    z = acc + bias[None, :] - (alpha * sig)[:, None]
    g = 1.0 / (1.0 + tl.exp(-z))
    xv = tl.load(x_ptr + (ob * s_xb + on_row * s_xn)[:, None] + on[None, :], mask=mask, other=0.0)
    lv = tl.load(lq_ptr + (ob * s_lb + on_row * s_ln)[:, None] + on[None, :], mask=mask, other=0.0)
    out = xv.to(tl.float32) + g * lv.to(tl.float32)
    tl.store(out_ptr + (ob * s_ob + on_row * s_on)[:, None] + on[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_rowdot_kernel(x_ptr, lq_ptr, w_ptr, b_ptr, la_ptr, sig_ptr, out_ptr, M, N, D, s_wk,
                        s_xb, s_xn, s_lb, s_ln, s_ob, s_on,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # Whole rows live in registers (BLOCK_D >= D), so x and lq are read exactly once.
    pid = tl.program_id(0)
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < M
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    rb = rows // N
    rn = rows % N
    wdt = w_ptr.dtype.element_ty
    xv = tl.load(x_ptr + (rb * s_xb + rn * s_xn)[:, None] + cols[None, :], mask=mask, other=0.0)
    lv = tl.load(lq_ptr + (rb * s_lb + rn * s_ln)[:, None] + cols[None, :], mask=mask, other=0.0)
    wx = tl.load(w_ptr + cols * s_wk, mask=cmask, other=0.0).to(tl.float32)
    wl = tl.load(w_ptr + (cols + D) * s_wk, mask=cmask, other=0.0).to(tl.float32)
    # Round the activations to W's dtype as the GEMM path does, then accumulate in fp32.
    dot = tl.sum(xv.to(wdt).to(tl.float32) * wx[None, :] + lv.to(wdt).to(tl.float32) * wl[None, :], axis=1)
    alpha = tl.exp(tl.load(la_ptr).to(tl.float32))
    sig = tl.load(sig_ptr + rb, mask=rmask, other=0.0).to(tl.float32)
    z = dot + tl.load(b_ptr).to(tl.float32) - alpha * sig
    g = 1.0 / (1.0 + tl.exp(-z))
    out = xv.to(tl.float32) + g[:, None] * lv.to(tl.float32)
    tl.store(out_ptr + (rb * s_ob + rn * s_on)[:, None] + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


_gate_gemm_tuned = ArchAutotune(_gate_gemm_kernel, _gemm_configs, key=["M", "D"])


def _check(x, lq, weight, bias, log_alpha, sigma):
    for name, t in (("x", x), ("lq", lq), ("weight", weight), ("bias", bias), ("log_alpha", log_alpha),
                    ("sigma", sigma)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, expected x's device {x.device}")
    if x.dim() != 3:
        raise ValueError(f"x: expected a 3-D [B, N, D] tensor, got shape {tuple(x.shape)}")
    B, N, D = x.shape
    if lq.shape != x.shape:
        raise ValueError(f"lq: expected shape {tuple(x.shape)} (x's), got {tuple(lq.shape)}")
    if weight.dim() != 2 or weight.shape[1] != 2 * D or weight.shape[0] not in (1, D):
        raise ValueError(f"weight: expected [{D}, {2 * D}] (v1) or [1, {2 * D}] (v1.5), got {tuple(weight.shape)}")
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if log_alpha.dim() != 0:
        raise ValueError(f"log_alpha: expected a 0-d tensor, got shape {tuple(log_alpha.shape)}")
    if sigma.shape != (B,):
        raise ValueError(f"sigma: expected shape ({B},) (one per sample), got {tuple(sigma.shape)}")
    for name, t in (("x", x), ("lq", lq), ("weight", weight)):
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} not supported; expected one of {FLOAT_DTYPES}")
    if not bias.is_floating_point() or not sigma.is_floating_point() or not log_alpha.is_floating_point():
        raise ValueError("bias, sigma, log_alpha: expected floating-point tensors")
    if x.stride(2) != 1:
        raise ValueError(f"x: channel dim must be contiguous (stride 1), got strides {x.stride()}")
    if lq.stride(2) != 1:
        raise ValueError(f"lq: channel dim must be contiguous (stride 1), got strides {lq.stride()}")
    if weight.shape[0] == D and weight.stride(1) != 1:
        raise ValueError(f"weight: last dim must be contiguous (stride 1), got strides {weight.stride()}")


def lq_gate(x: torch.Tensor, lq: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
            log_alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x + sigmoid([x, lq] W^T + b - exp(log_alpha) * sigma[b]) * lq, in x's dtype: the CUDA
    implementation of torch.ops.pidkern.gate (pidkern.custom_ops)."""
    _check(x, lq, weight, bias, log_alpha, sigma)
    B, N, D = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    M = B * N
    if M == 0:
        return out
    bias = bias.contiguous()
    sigma = sigma.contiguous()
    strides = (x.stride(0), x.stride(1), lq.stride(0), lq.stride(1))
    with on_device(x):
        if weight.shape[0] == 1:
            block_d = triton.next_power_of_2(D)
            block_r = max(1, min(16, 8192 // block_d))
            grid = (triton.cdiv(M, block_r),)
            _gate_rowdot_kernel[grid](x, lq, weight, bias, log_alpha, sigma, out, M, N, D, weight.stride(1),
                                      *strides, out.stride(0), out.stride(1),
                                      BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4 if block_d <= 1024 else 8)
        else:
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(D, meta["BLOCK_N"]),)
            _gate_gemm_tuned.at(x.device)[grid](x, lq, weight, bias, log_alpha, sigma, out, M, N, D, *strides,
                                   weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
                                   DOT_PREC=dot_precision(weight.dtype))
    return out

