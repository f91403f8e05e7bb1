"""The one dispatch point between the fused Triton kernels and the reference math.

Every operation FastPiD.forward runs is called through this module. Each fused op is a
`torch.ops.pidkern` op (pidkern.custom_ops) and takes the route to run as an argument:
`route="triton"` runs its Triton kernel (on CUDA, or on the CPU under TRITON_INTERPRET=1,
how the tests run the kernels), `route="torch"` its PyTorch math (the pieces of
pidkern.reference) on any device, and None leaves the choice to the dispatcher: the
kernel on CUDA, the math on the CPU. Nothing here looks at a tensor's device or keeps state
between calls. The attention's many routes are entries of pidkern.routes.TABLE, run by
their `kind`. The plain ops (linear, silu, add_scaled, rms_norm) are the PyTorch calls
themselves, named here so the fast path has one vocabulary. See docs/design.md, "Adding
a kernel".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import custom_ops, routes
from .custom_ops import HAS_TRITON, attend, interpreting, prep_qkv, sdpa  # noqa: F401  (the fast path's vocabulary)
from .reference import apply_rope, rms_norm  # noqa: F401

# Names of the ops that have a Triton kernel.
OPS = ("embed", "rms_modulate", "gate", "attention", "qkv_rope", "pixel_modulate", "swiglu")
ROUTES = ("triton", "torch")


def _run(op: str, route, *args):
    """torch.ops.pidkern.<op> by the route: None the dispatcher's choice, "triton" the kernel,
    "torch" the math."""
    if route is None:
        return getattr(torch.ops.pidkern, op)(*args)
    if route == "triton":
        return custom_ops.kernel(op, *args)
    if route == "torch":
        return custom_ops.math(op, *args)
    raise ValueError(f"route={route!r} for {op}: expected one of {ROUTES} or None")


# --- plain ops: cuBLAS / ATen, no fused kernel ---

def linear(x, weight, bias=None):
    """x W^T + b (a weight of another format is a pidkern.layers object: call it)."""
    return F.linear(x, weight, bias)


def silu(x):
    return F.silu(x)


def add_scaled(x, gate, y):
    """x + gate * y in one pass (a deferred residual update)."""
    return torch.addcmul(x, gate, y)


# --- rms_modulate / pixel_modulate (memory-bound fusions of the patch and pixel blocks) ---

def add_rms_modulate(x, weight, shift, scale, y=None, gate=None, eps=1e-6, out_dtype=None, route=None):
    """(x_new, h): x_new = x + gate * y (x itself when y is None), keeping x's dtype;
    h = RMSNorm(x_new) * weight * (1 + scale) + shift in out_dtype (default y's, else x's dtype).

    x, y: [R, N, C]; shift, scale, gate: [R, 1, C] (per sample) or [R, N, C] (per row),
    strided views welcome (channel stride 1)."""
    if (y is None) != (gate is None):
        raise ValueError("y and gate must be given together (the residual update is x + gate * y)")
    if out_dtype is None:
        out_dtype = (y if y is not None else x).dtype
    if y is None:
        return x, _run("rms_modulate", route, x, weight, shift, scale, float(eps), out_dtype)
    return tuple(_run("add_rms_modulate", route, x, weight, shift, scale, y, gate, float(eps), out_dtype))


def pixel_post(p, e, m, norm2_w, fc1_w, fc1_b, fc2_w, fc2_b, eps=1e-6, route=None):
    """The pixel block's second half (reference.pixel_post):
    p1 = p + gate1 * e; p_new = p1 + gate2 * fc2(GELU(fc1(RMSNorm16(p1) * norm2_w * (1 + scale2) + shift2))).
    p: [R, P2, 16]; e: expand_from_attn output [R, P2*16]; m: modulation [R, P2*96], or only its
    post-attention chunks (gate1, shift2, scale2, gate2) as [R, P2*64]. Returns p's dtype."""
    return _run("pixel_post", route, p, e, m, norm2_w, fc1_w, fc1_b, fc2_w, fc2_b, float(eps))


# --------------------------------------------------------------------------- attention

# every value ops.attention's `backend` takes: the attention routes of pidkern.routes
ATTENTION_BACKENDS = routes.values("attention.patch")


def attention(qkv_img, qkv_txt, q_norm_img, k_norm_img, q_norm_txt, k_norm_txt, rope_img, rope_txt, heads,
              eps=1e-6, backend: str = "triton"):
    """Joint [text; image] attention with q/k RMSNorm and RoPE, from the QKV Linear outputs.

    qkv_img [B, L, 3*heads*hd], qkv_txt [B, T, 3*heads*hd] or None; q/k norms [hd];
    rope_* = (cos, sin) float32 [N, hd/2]. Returns (o_img [B, L, heads*hd],
    o_txt [B, T, heads*hd] or None). backend: a route of pidkern.routes.TABLE's attention
    entries, run by its kind: "fused" (the flash kernel doing norm, RoPE and softmax, in the
    route's 8-bit mode if any), "prep" (the fused QK-norm/RoPE kernel, then SDPA, the Triton
    core in the route's mode, or the route's library), "torch" (the unfused chain). On
    CUDA, rows that do not start 16-byte aligned (a head dim that is not a multiple of 8
    in 16-bit types, or odd views) take the unfused chain whatever the backend.
    """
    r = routes.attention(backend)
    if r.kind == "qkv_rope":
        raise ValueError(f"backend={backend!r} starts from the block's inputs: call ops.qkv_rope, then ops.attend")
    cos_t, sin_t = rope_txt if rope_txt is not None else (None, None)
    args = (qkv_img, qkv_txt, q_norm_img, k_norm_img, q_norm_txt, k_norm_txt, *rope_img, cos_t, sin_t,
            heads, float(eps))
    if r.kind == "torch":
        o_img, o_txt = custom_ops.math("attention", *args)
    elif r.kind == "fused":
        o_img, o_txt = (custom_ops.kernel("attention", *args) if r.mode is None else
                        custom_ops.kernel("attention_8bit", *args, r.mode))
    else:
        q, k, v = custom_ops.kernel("attention_prep", *args)
        T = q.shape[1] - qkv_img.shape[1]
        if r.library is not None:
            from .attention_routes import ROUTES
            o = ROUTES[r.name](q, k, v)
        elif r.mode is not None:
            o = custom_ops.kernel("attention_core_8bit", q, k, v, r.mode)
        elif r.name == "prep+triton":
            o = custom_ops.kernel("attention_core", q, k, v)
        else:   # prep+sdpa
            return attend(q, k, v, T, qkv_txt is not None)
        o_img, o_txt = o[:, T:], o[:, :T]
    return o_img, (o_txt if qkv_txt is not None else None)


def qkv_rope(h_img, w_img, norms_img, rope_img, h_txt=None, w_txt=None, norms_txt=None, rope_txt=None, *,
             heads: int, eps: float = 1e-6, route=None):
    """The attention's QKV Linear (no bias) and its QK-norm + RoPE: q, k, v [B, T+L, H, hd],
    text first, ready for `attend`.

    h_img [B, L, D] and h_txt [B, T, D] (or None) are the normalised block inputs,
    w_* [3*heads*hd, D] the QKV weights, norms_* [2, hd] the q and k RMSNorm weights
    stacked, rope_* (cos, sin) float32 [N, hd/2]. The Triton kernel does the norm and
    RoPE in the GEMM's epilogue (power-of-two head dims, 16-byte aligned rows on CUDA);
    otherwise cuBLAS + the PyTorch chain, rounding the Linear's output the same way."""
    cos_t, sin_t = rope_txt if rope_txt is not None else (None, None)
    return tuple(_run("qkv_rope", route, h_img, w_img, norms_img, *rope_img, h_txt, w_txt, norms_txt, cos_t, sin_t,
                      heads, float(eps)))


# ------------------------------------------------- GEMMs with fused prologues/epilogues

def patch_pixel_embed(x: torch.Tensor, patch_w: torch.Tensor, patch_b: torch.Tensor, pix_w: torch.Tensor,
                      pix_b: torch.Tensor, sincos_col: torch.Tensor, sincos_row: torch.Tensor, patch: int,
                      route=None):
    """Patch tokens [B, L, D] and per-patch pixel tokens [B*L, P*P, Dp] of an image x [B, 3, H, W].

    sincos_col [W, Dp/2] / sincos_row [H, Dp/2]: the fixed float32 sin-cos tables (reference.pixel_sincos).
    Outputs take patch_w's dtype."""
    return tuple(_run("embed", route, x, patch_w, patch_b, pix_w, pix_b, sincos_col, sincos_row, patch))


def lq_gate(x: torch.Tensor, lq: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
            log_alpha: torch.Tensor, sigma: torch.Tensor, route=None) -> torch.Tensor:
    """x + sigmoid([x, lq] W^T + b - exp(log_alpha) * sigma) * lq (reference.lq_gate), in x's dtype.

    x, lq [B, N, D]; sigma [B] float32 (per sample); log_alpha a 0-d tensor;
    weight [D, 2D] and bias [D] (v1), or [1, 2D] and [1] (v1.5, one gate per token)."""
    return _run("gate", route, x, lq, weight, bias, log_alpha, sigma)


def swiglu_gate_up(u: torch.Tensor, w13: torch.Tensor, split: bool = False, route=None) -> torch.Tensor:
    """SiLU(u w1^T) * (u w3^T) for u [M, D] and w13 = cat([w1, w3]) [2*Hm, D]; the w2
    GEMM that follows stays a plain matmul. The Triton path is one GEMM with the product
    in its epilogue, or with split=True a cuBLAS GEMM against w13 and one silu_mul pass.
    (A w13 of another format, e.g. fp8, makes its own GEMM: then call silu_mul.)"""
    if split:
        return silu_mul(linear(u, w13), route)
    return _run("swiglu", route, u, w13)


def silu_mul(gu: torch.Tensor, route=None) -> torch.Tensor:
    """SiLU(g) * up for gu = [g | up] [M, 2*Hm] (a gate-up GEMM's output)."""
    return _run("silu_mul", route, gu)
