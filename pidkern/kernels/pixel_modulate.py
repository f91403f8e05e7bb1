"""The pixel block's second half, fused (op "pixel_modulate").

A pixel block (docs/design.md, "The network") on R = B*L patches of P2 = 256 pixels x 16
channels ends with

    p1    = p + gate1 * e                       e = expand_from_attn(attention output)
    p_new = p1 + gate2 * fc2(GELU(fc1(RMSNorm16(p1) * norm2_w * (1 + scale2) + shift2)))

pixel_post does all of it in one pass: it reads its band's slice of the modulation m
through strides (no copies), tiles [BLOCK, 16] pixel rows, computes in float32, and holds
the 16x64 / 64x16 MLP weights on chip, running both matmuls with tl.dot, so the
[R, 256, 64] hidden activation never reaches memory. m is either all six chunks per pixel
(96 wide) or FastPiD's post-attention half (gate1, shift2, scale2, gate2: 64 wide). The
first half of the block (RMSNorm + modulation before compress_to_attn) is rms_modulate's.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from pidkern.kernels._common import (FLOAT_DTYPES, INTERPRET as _INTERPRET, INTERPRET_FAMILY, ArchAutotune, dot_precision,
                                     on_device)

DP = 16       # pixel width
HIDDEN = 64   # pixel MLP hidden width


@triton.jit
def _pixel_post_kernel(
    p_ptr, e_ptr, m_ptr, nw_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
    M, P2, M_BUCKET,
    sp0, sp1, se0, se1, sm0, sm1, m_off,
    eps,
    D: tl.constexpr, H: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_PIX: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_PIX + tl.arange(0, BLOCK_PIX)
    rmask = rows < M
    mask = rmask[:, None]
    r = (rows // P2).to(tl.int64)
    q = (rows % P2).to(tl.int64)
    c = tl.arange(0, D)[None, :]

    p = tl.load(p_ptr + (r * sp0 + q * sp1)[:, None] + c, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(e_ptr + (r * se0 + q * se1)[:, None] + c, mask=mask, other=0.0).to(tl.float32)
    m_row = m_ptr + (r * sm0 + q * sm1)[:, None] + c + m_off
    gate1 = tl.load(m_row, mask=mask, other=0.0).to(tl.float32)
    shift2 = tl.load(m_row + D, mask=mask, other=0.0).to(tl.float32)
    scale2 = tl.load(m_row + 2 * D, mask=mask, other=0.0).to(tl.float32)
    gate2 = tl.load(m_row + 3 * D, mask=mask, other=0.0).to(tl.float32)

    # The residual is rounded to p's dtype first: the MLP sees the p the unfused block keeps.
    p1 = (p + gate1 * e).to(out_ptr.dtype.element_ty).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(p1 * p1, axis=1) / D + eps)
    nw = tl.load(nw_ptr + c).to(tl.float32)
    u = p1 * rstd[:, None] * nw * (1.0 + scale2) + shift2

    # Weights in their natural [out, in] layout; tl.trans gives the K-major operand.
    k16 = tl.arange(0, D)
    j64 = tl.arange(0, H)
    w1 = tl.load(w1_ptr + j64[:, None] * D + k16[None, :])          # [64, 16]
    w2 = tl.load(w2_ptr + k16[:, None] * H + j64[None, :])          # [16, 64]
    b1 = tl.load(b1_ptr + j64).to(tl.float32)
    b2 = tl.load(b2_ptr + k16).to(tl.float32)
    # Activations enter each matmul in the weights' dtype (what a bf16 Linear does),
    # products accumulate in float32.
    hid = tl.dot(u.to(w1.dtype), tl.trans(w1), input_precision=DOT_PREC)
    hid = hid + b1[None, :]
    hid = 0.5 * hid * (1.0 + tl.math.erf(hid * 0.7071067811865476))
    mlp = tl.dot(hid.to(w2.dtype), tl.trans(w2), input_precision=DOT_PREC)
    out = p1 + gate2 * (mlp + b2[None, :])
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + c, out.to(out_ptr.dtype.element_ty), mask=mask)


def _configs(family: str):
    # The 16x64 and 64x16 weights are the only tensor-core operands: tiny tiles, a few KB
    # of shared memory, so one set serves every architecture (bench.compile_matrix).
    if family == INTERPRET_FAMILY:
        return [triton.Config({"BLOCK_PIX": 64}, num_warps=4)]
    return [
        triton.Config({"BLOCK_PIX": 64}, num_warps=4),
        triton.Config({"BLOCK_PIX": 128}, num_warps=4),
        triton.Config({"BLOCK_PIX": 256}, num_warps=8),
    ]


_pixel_post_tuned = ArchAutotune(_pixel_post_kernel, _configs, key=["P2", "M_BUCKET"])


def _check(name, t, device, shape=None):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but p is on {device}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def _rows3(name, t, R, P2, width):
    """t as [R, P2, width] (given [R, P2*width] or [R, P2, width]) -> (view, stride0, stride1)."""
    if t.dim() == 2 and tuple(t.shape) == (R, P2 * width) and t.stride(1) == 1:
        t = t.view(R, P2, width)
    if t.dim() != 3 or tuple(t.shape) != (R, P2, width):
        raise ValueError(f"{name} must have shape [{R}, {P2 * width}] or [{R}, {P2}, {width}] "
                         f"(channel stride 1), got {list(t.shape)} with strides {t.stride()}")
    if t.stride(2) != 1:
        raise ValueError(f"{name} must have channel stride 1, got strides {t.stride()}")
    return t, t.stride(0) if R > 1 else 0, t.stride(1) if P2 > 1 else 0


def _validate_post(p, e, m, norm2_w, fc1_w, fc1_b, fc2_w, fc2_b):
    if not isinstance(p, torch.Tensor) or p.dim() != 3 or p.shape[-1] != DP:
        raise ValueError(f"p must be a [R, P2, {DP}] tensor, got {getattr(p, 'shape', type(p).__name__)}")
    dev = p.device
    if not (p.is_cuda or _INTERPRET):
        raise ValueError(f"p is on {dev}: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1)")
    R, P2, _ = p.shape
    if R * P2 >= 2**31:
        raise ValueError(f"p has {R * P2} pixels; at most 2**31 - 1 are supported")
    _check("p", p, dev)
    _check("e", e, dev)
    _check("m", m, dev)
    _check("norm2_w", norm2_w, dev, (DP,))
    _check("fc1_w", fc1_w, dev, (HIDDEN, DP))
    _check("fc1_b", fc1_b, dev, (HIDDEN,))
    _check("fc2_w", fc2_w, dev, (DP, HIDDEN))
    _check("fc2_b", fc2_b, dev, (DP,))
    if fc1_w.dtype != fc2_w.dtype:
        raise ValueError(f"fc1_w and fc2_w must share a dtype, got {fc1_w.dtype} and {fc2_w.dtype}")
    return ([_rows3("p", p, R, P2, DP)[1:], _rows3("e", e, R, P2, DP)[1:], _rows3("m", m, R, P2, _m_width(m, R, P2))[1:]],
            _m_width(m, R, P2) - 4 * DP)


def _m_width(m, R, P2):
    """Per-pixel width of m: 96 (all six chunks) or 64 (gate1, shift2, scale2, gate2 only,
    the engine's post-attention half of the modulation)."""
    width = m.shape[-1] // P2 if m.dim() == 2 else m.shape[-1]
    if width not in (4 * DP, 6 * DP):
        raise ValueError(f"m must carry {6 * DP} (all six chunks) or {4 * DP} (gate1, shift2, scale2, gate2) "
                         f"values per pixel, got shape {list(m.shape)} for {P2} pixels")
    return width


def _pixel_post_launch(p, e, m, norm2_w, fc1_w, fc1_b, fc2_w, fc2_b, eps):
    (sp, se, sm), m_off = _validate_post(p, e, m, norm2_w, fc1_w, fc1_b, fc2_w, fc2_b)
    R, P2, _ = p.shape
    M = R * P2
    out = torch.empty((R, P2, DP), dtype=p.dtype, device=p.device)
    if M == 0:
        return out
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_PIX"]),)  # noqa: E731
    with on_device(p):
        _pixel_post_tuned.at(p.device)[grid](
            p, e, m, norm2_w.contiguous(), fc1_w.contiguous(), fc1_b.contiguous(),
            fc2_w.contiguous(), fc2_b.contiguous(), out,
            M, P2, M.bit_length(), *sp, *se, *sm, m_off, float(eps),
            D=DP, H=HIDDEN, DOT_PREC=dot_precision(fc1_w.dtype),
        )
    return out


def pixel_post(p, e, m, norm2_w, fc1_w, fc1_b, fc2_w, fc2_b, eps=1e-6):
    """p_new [R, P2, 16] in p's dtype: the CUDA implementation of torch.ops.pidkern.pixel_post
    (pidkern.custom_ops)."""
    return _pixel_post_launch(p, e, m, norm2_w, fc1_w, fc1_b, fc2_w, fc2_b, float(eps))
