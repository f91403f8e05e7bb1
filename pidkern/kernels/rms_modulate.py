"""Fused residual add + RMSNorm + adaLN modulation (op "rms_modulate").

    x_new = x + gate * y                     (only when y is given)
    h     = RMSNorm(x_new) * weight * (1 + scale) + shift

One read of x (and y, gate), one write of x_new and h: the patch blocks run this twice
per block on [B, L, 1536] rows with per-sample modulation, the pixel blocks on
[B*L, 256, 16] rows with per-pixel modulation sliced out of a [B*L, 256, 96] view.

Every [R, N, C] operand is addressed as base + r*stride0 + n*stride1 + c, so per-sample
modulation ([R, 1, C], expanded with stride1 = 0) and strided per-pixel views go through
the same kernel without a copy; only the channel stride must be 1. Statistics and the
modulation are computed in float32; x_new is rounded to x's dtype before the norm so
that h is the norm of exactly the residual the caller keeps.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from pidkern.kernels._common import FLOAT_DTYPES, INTERPRET as _INTERPRET, INTERPRET_FAMILY, ArchAutotune, on_device


@triton.jit
def _rms_modulate_kernel(
    x_ptr, y_ptr, g_ptr, w_ptr, sh_ptr, sc_ptr, xo_ptr, h_ptr,
    M, N, C, M_BUCKET,
    sx0, sx1, sy0, sy1, sg0, sg1, ssh0, ssh1, ssc0, ssc1,
    eps,
    HAS_RES: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < M
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    # 32-bit divide (M < 2**31), 64-bit offsets: a 4096^2 modulation tensor passes 2**31 elements.
    r = (rows // N).to(tl.int64)
    n = (rows % N).to(tl.int64)
    c = cols[None, :]

    x = tl.load(x_ptr + (r * sx0 + n * sx1)[:, None] + c, mask=mask, other=0.0).to(tl.float32)
    out_row = rows.to(tl.int64)[:, None] * C + c
    if HAS_RES:
        y = tl.load(y_ptr + (r * sy0 + n * sy1)[:, None] + c, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + (r * sg0 + n * sg1)[:, None] + c, mask=mask, other=0.0).to(tl.float32)
        xn = (x + g * y).to(xo_ptr.dtype.element_ty)
        tl.store(xo_ptr + out_row, xn, mask=mask)
        x = xn.to(tl.float32)

    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / C + eps)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    sh = tl.load(sh_ptr + (r * ssh0 + n * ssh1)[:, None] + c, mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(sc_ptr + (r * ssc0 + n * ssc1)[:, None] + c, mask=mask, other=0.0).to(tl.float32)
    h = x * rstd[:, None] * w[None, :] * (1.0 + sc) + sh
    tl.store(h_ptr + out_row, h.to(h_ptr.dtype.element_ty), mask=mask)


def _configs(family: str, block_c: int) -> list[triton.Config]:
    # 2K-8K elements per program: wide rows (C=1536) take 1-4 rows, the 16-wide pixel
    # rows 128-512, so every program moves tens of KB without spilling registers. No
    # tensor cores and only a reduction's scratch in shared memory: one set for every
    # architecture (bench.compile_matrix checks it fits each).
    if family == INTERPRET_FAMILY:
        return [triton.Config({"BLOCK_ROWS": max(1, 4096 // block_c)}, num_warps=4)]
    return [triton.Config({"BLOCK_ROWS": max(1, elems // block_c)}, num_warps=warps)
            for elems, warps in ((2048, 4), (4096, 8), (8192, 8))]


# key: the row width and the row count's order of magnitude (a tiny test call must not
# pick the config the 2048^2 engine then reuses); dtypes are added by Triton. One
# autotuner per (family, block width).
_tuned = ArchAutotune(_rms_modulate_kernel, _configs, key=["C", "M_BUCKET"])


def _check_float(name: str, t: torch.Tensor, device: torch.device):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")


def _as_rows(name: str, t: torch.Tensor, R: int, N: int, C: int, x_device) -> tuple[int, int]:
    """(stride0, stride1) of t viewed as [R, N, C]; broadcast dims get stride 0."""
    _check_float(name, t, x_device)
    if t.dim() != 3 or t.shape[-1] != C or t.shape[0] not in (1, R) or t.shape[1] not in (1, N):
        raise ValueError(f"{name} must have shape [{R}, {N}, {C}] or [{R}, 1, {C}] (broadcast over x), "
                         f"got {list(t.shape)}")
    if C > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have channel stride 1 (other strides may be anything), got strides {t.stride()}")
    s0 = t.stride(0) if t.shape[0] == R and R > 1 else 0
    s1 = t.stride(1) if t.shape[1] == N and N > 1 else 0
    return s0, s1


def _validate(x, weight, shift, scale, y, gate, out_dtype):
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a [R, N, C] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    dev = x.device
    if not (x.is_cuda or _INTERPRET):
        raise ValueError(f"x is on {dev}: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1)")
    R, N, C = x.shape
    if R * N >= 2**31:
        raise ValueError(f"x has {R * N} rows; at most 2**31 - 1 are supported")
    strides = {"x": _as_rows("x", x, R, N, C, dev)}
    _check_float("weight", weight, dev)
    if weight.shape != (C,):
        raise ValueError(f"weight must have shape [{C}], got {list(weight.shape)}")
    if (y is None) != (gate is None):
        raise ValueError("y and gate must be given together (the residual update is x + gate * y)")
    if y is not None:
        strides["y"] = _as_rows("y", y, R, N, C, dev)
        strides["gate"] = _as_rows("gate", gate, R, N, C, dev)
    strides["shift"] = _as_rows("shift", shift, R, N, C, dev)
    strides["scale"] = _as_rows("scale", scale, R, N, C, dev)
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    return strides


def _launch(x, weight, shift, scale, y, gate, eps, out_dtype):
    st = _validate(x, weight, shift, scale, y, gate, out_dtype)
    R, N, C = x.shape
    M = R * N
    w = weight.contiguous()
    h = torch.empty((R, N, C), dtype=out_dtype, device=x.device)
    has_res = y is not None
    if has_res:
        x_new = torch.empty((R, N, C), dtype=x.dtype, device=x.device)
        sy, sg = st["y"], st["gate"]
    else:
        x_new, y, gate = h, x, x  # never touched: HAS_RES=False
        sy = sg = (0, 0)
    if M == 0:
        return x_new, h
    block_c = triton.next_power_of_2(C)
    kernel = _tuned.at(x.device, block_c)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_ROWS"]),)  # noqa: E731
    with on_device(x):
        kernel[grid](
            x, y, gate, w, shift, scale, x_new, h,
            M, N, C, M.bit_length(),
            *st["x"], *sy, *sg, *st["shift"], *st["scale"],
            float(eps),
            HAS_RES=has_res, BLOCK_C=block_c,
        )
    return x_new, h


def add_rms_modulate(x, weight, shift, scale, y=None, gate=None, eps=1e-6, out_dtype=None):
    """(x_new, h) as pidkern.ops.add_rms_modulate: the CUDA implementation of
    torch.ops.pidkern.rms_modulate and add_rms_modulate (pidkern.custom_ops)."""
    if (y is None) != (gate is None):
        raise ValueError("y and gate must be given together (the residual update is x + gate * y)")
    if out_dtype is None:
        out_dtype = (y if y is not None else x).dtype
    x_new, h = _launch(x, weight, shift, scale, y, gate, float(eps), out_dtype)
    return (x if y is None else x_new), h
