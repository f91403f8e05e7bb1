"""The one dispatch point between the fused Triton kernels and the reference math.

Every operation FastPiD.forward runs is called through this module. A fused op runs its
Triton kernel when its tensors live on a CUDA device (or when TRITON_INTERPRET=1, which
is how CI runs the kernels on the CPU) and the plain PyTorch math of pidkern.reference
otherwise; `disabled(...)` forces the PyTorch math for some ops inside a `with` block
(this is how a Plan's "torch" route runs). The plain ops (linear, silu, add_scaled,
rms_norm) are the PyTorch calls themselves, named here so the fast path has one
vocabulary. See docs/design.md, "Adding a kernel".
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading

import torch

import torch.nn.functional as F

from . import fp8, reference
from .fp8 import Fp8Weight
from .reference import apply_rope, rms_norm

HAS_TRITON = importlib.util.find_spec("triton") is not None

# Names of the ops that have a Triton kernel.
OPS = ("embed", "rms_modulate", "gate", "attention", "qkv_rope", "pixel_modulate", "swiglu")

_local = threading.local()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(op: str, *tensors: torch.Tensor) -> bool:
    """Whether `op` runs its Triton kernel for these tensors."""
    if op not in OPS:
        raise ValueError(f"op={op!r} is not a fused op; expected one of {OPS}")
    if not HAS_TRITON or op in getattr(_local, "off", ()):
        return False
    return interpreting() or all(t.is_cuda for t in tensors)


def triton_available(device) -> bool:
    """Whether the Triton kernels can run for tensors on `device` (CUDA, or the interpreter)."""
    return HAS_TRITON and (interpreting() or getattr(device, "type", str(device).split(":")[0]) == "cuda")


@contextlib.contextmanager
def disabled(*ops: str):
    """Run the PyTorch math for `ops` inside the block (this thread only)."""
    for op in ops:
        if op not in OPS:
            raise ValueError(f"op={op!r} is not a fused op; expected one of {OPS}")
    before = getattr(_local, "off", frozenset())
    _local.off = before | frozenset(ops)
    try:
        yield
    finally:
        _local.off = before


@contextlib.contextmanager
def gemm_route(route: str):
    """Run the fp8 weights' GEMMs inside the block by `route` (fp8.GEMM_ROUTES; this thread
    only): the Plan's "gemm" entry, set by FastPiD around each forward."""
    if route not in fp8.GEMM_ROUTES:
        raise ValueError(f"route={route!r}: expected one of {fp8.GEMM_ROUTES}")
    before = getattr(_local, "gemm", "scaled_mm")
    _local.gemm = route
    try:
        yield
    finally:
        _local.gemm = before


# --- plain ops: cuBLAS / ATen, no fused kernel ---

def linear(x, weight, bias=None):
    """x W^T + b; W a tensor, or an fp8.Fp8Weight (the GEMM in e4m3 by the gemm_route)."""
    if isinstance(weight, Fp8Weight):
        if getattr(_local, "gemm", "scaled_mm") == "torchao":
            return fp8.torchao_linear(x, weight, bias)
        return fp8.scaled_mm(x, weight, bias)
    return F.linear(x, weight, bias)


def silu(x):
    return F.silu(x)


def add_scaled(x, gate, y):
    """x + gate * y in one pass (a deferred residual update)."""
    return torch.addcmul(x, gate, y)


# --- rms_modulate / pixel_modulate (memory-bound fusions of the patch and pixel blocks) ---

def add_rms_modulate(x, weight, shift, scale, y=None, gate=None, eps=1e-6, out_dtype=None):
    """(x_new, h): x_new = x + gate * y (x itself when y is None), keeping x's dtype;
    h = RMSNorm(x_new) * weight * (1 + scale) + shift in out_dtype (default y's, else x's dtype).

    x, y: [R, N, C]; shift, scale, gate: [R, 1, C] (per sample) or [R, N, C] (per row),
    strided views welcome (channel stride 1)."""
    if use_triton("rms_modulate", x):
        from pidkern.kernels.rms_modulate import add_rms_modulate as fused
        return fused(x, weight, shift, scale, y, gate, eps, out_dtype)
    if out_dtype is None:
        out_dtype = (y if y is not None else x).dtype
    if (y is None) != (gate is None):
        raise ValueError("y and gate must be given together (the residual update is x + gate * y)")
    x_new = x if y is None else (x + gate * y).to(x.dtype)
    h = reference.modulate(rms_norm(x_new, weight, eps), shift, scale)
    return x_new, h.to(out_dtype)


def pixel_post(p, e, m, norm2_w, fc1_w, fc1_b, fc2_w, fc2_b, eps=1e-6):
    """The pixel block's second half (docs/design.md, "The network"):
    p1 = p + gate1 * e; p_new = p1 + gate2 * fc2(GELU(fc1(RMSNorm16(p1) * norm2_w * (1 + scale2) + shift2))).
    p: [R, P2, 16]; e: expand_from_attn output [R, P2*16]; m: modulation [R, P2*96], or only its
    post-attention chunks (gate1, shift2, scale2, gate2) as [R, P2*64]. Returns p's dtype."""
    if use_triton("pixel_modulate", p, e, m):
        from pidkern.kernels.pixel_modulate import pixel_post as fused
        return fused(p, e, m, norm2_w, fc1_w, fc1_b, fc2_w, fc2_b, eps)
    R, P2, Dp = p.shape
    e3, m3 = e.reshape(R, P2, Dp), m.reshape(R, P2, -1)
    first = m3.shape[-1] // 16 - 4   # the four chunks are the last four of m's row
    g1, sh2, sc2, g2 = (m3[..., k * 16:(k + 1) * 16] for k in range(first, first + 4))
    p1 = (p + g1 * e3).to(p.dtype)
    u = reference.modulate(rms_norm(p1, norm2_w, eps), sh2, sc2)
    hid = F.gelu(F.linear(u.to(fc1_w.dtype), fc1_w, fc1_b))
    mlp = F.linear(hid.to(fc2_w.dtype), fc2_w, fc2_b)
    return (p1 + g2 * mlp).to(p.dtype)


# --------------------------------------------------------------------------- attention

# 8-bit and library routes (docs/attention_fp8.md): "<mode>-triton" is the fused kernel and
# "prep+<mode>-triton" the prep then the core in an 8-bit mode of kernels.attention.MODES
# ("fp8": QK^T and PV in e4m3, "fp8qk": QK^T only, "int8": QK^T in int8 and PV in e4m3,
# "int8qk": QK^T in int8 only); "prep+<library>": pidkern.attention_routes
_8BIT_MODES = ("fp8", "fp8qk", "int8", "int8qk")
ATTENTION_BACKENDS = (("triton", "prep+sdpa", "prep+triton", "torch")
                      + tuple(f"{p}{m}-triton" for m in _8BIT_MODES for p in ("", "prep+"))
                      + ("prep+flash", "prep+flash3-fp8", "prep+sage", "prep+cudnn-fp8"))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA on [B, H, N, hd] preferring cuDNN (fastest on Hopper), then flash, then the rest."""
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    try:
        ctx = sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch without priorities: cuDNN is then only allowed, not first
        ctx = sdpa_kernel(order)
    with ctx:
        return F.scaled_dot_product_attention(q, k, v)


def _prep_torch(qkv_img, qkv_txt, q_norm_img, k_norm_img, q_norm_txt, k_norm_txt, rope_img, rope_txt,
                heads, eps):
    """RMSNorm + RoPE of q, k per source and [text; image] concatenation: q, k, v [B, T+L, H, hd]."""
    hd = qkv_img.shape[2] // (3 * heads)

    def prep(qkv, wq, wk, rope):
        q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, hd).unbind(2)
        cos, sin = (r[:, None, :] for r in rope)          # [N, 1, hd/2]: q, k are [B, N, H, hd]
        # the norm weights may be wider than q (float32 weights, half activations): keep q's dtype
        return (apply_rope(rms_norm(q, wq, eps).to(q.dtype), cos, sin),
                apply_rope(rms_norm(k, wk, eps).to(k.dtype), cos, sin), v)

    q, k, v = prep(qkv_img, q_norm_img, k_norm_img, rope_img)
    if qkv_txt is not None:
        qt, kt, vt = prep(qkv_txt, q_norm_txt, k_norm_txt, rope_txt)
        q, k, v = torch.cat((qt, q), 1), torch.cat((kt, k), 1), torch.cat((vt, v), 1)
    return q, k, v


def attend(q, k, v, text_len: int, has_text: bool):
    """SDPA over prepared q, k, v [B, T+L, H, hd] -> (o_img [B, L, H*hd], o_txt [B, T, H*hd] or None)."""
    B, N, H, hd = q.shape
    o = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2).reshape(B, N, H * hd)
    return o[:, text_len:], (o[:, :text_len] if has_text else None)


def _attention_torch(qkv_img, qkv_txt, q_norm_img, k_norm_img, q_norm_txt, k_norm_txt, rope_img, rope_txt,
                     heads, eps):
    """The unfused chain: RMSNorm + RoPE per source, concatenate [text; image], SDPA."""
    q, k, v = _prep_torch(qkv_img, qkv_txt, q_norm_img, k_norm_img, q_norm_txt, k_norm_txt, rope_img, rope_txt,
                          heads, eps)
    return attend(q, k, v, 0 if qkv_txt is None else qkv_txt.shape[1], qkv_txt is not None)


def _attention_rows_aligned(qkv_img, qkv_txt, heads) -> bool:
    if not qkv_img.is_cuda or not isinstance(heads, int) or heads <= 0 or qkv_img.dim() != 3:
        return True  # the interpreter has no alignment rule; bad arguments get the kernel's errors
    from pidkern.kernels.attention import rows_aligned
    return rows_aligned(qkv_img, heads) and (qkv_txt is None or rows_aligned(qkv_txt, heads))


def attention(qkv_img, qkv_txt, q_norm_img, k_norm_img, q_norm_txt, k_norm_txt, rope_img, rope_txt, heads,
              eps=1e-6, backend: str = "triton"):
    """Joint [text; image] attention with q/k RMSNorm and RoPE, from the QKV Linear outputs.

    qkv_img [B, L, 3*heads*hd], qkv_txt [B, T, 3*heads*hd] or None; q/k norms [hd];
    rope_* = (cos, sin) float32 [N, hd/2]. Returns (o_img [B, L, heads*hd],
    o_txt [B, T, heads*hd] or None). backend: "triton" (fully fused flash kernel),
    "prep+sdpa" (fused QK-norm/RoPE kernel, then SDPA/cuDNN), "prep+triton" (the same
    prep, then the Triton attention core), "torch" (the unfused chain); 8-bit:
    "fp8-triton" / "prep+fp8-triton" (the fused kernel / the prep then the core, QK^T and PV
    on e4m3), "fp8qk-triton" / "prep+fp8qk-triton" (QK^T only), "int8-triton",
    "prep+int8-triton" (QK^T in int8, PV in e4m3), "int8qk-triton", "prep+int8qk-triton"
    (QK^T in int8 only); the prep then a library:
    "prep+flash" (FA2), "prep+flash3-fp8" (FA3 fp8), "prep+sage" (SageAttention),
    "prep+cudnn-fp8" (cuDNN fp8 SDPA), see pidkern.attention_routes. On CUDA, rows that
    do not start 16-byte aligned (a head dim that is not a multiple of 8 in 16-bit types,
    or odd views) take the unfused chain whatever the backend.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"backend={backend!r}; expected one of {ATTENTION_BACKENDS}")
    fused = use_triton("attention", qkv_img) and _attention_rows_aligned(qkv_img, qkv_txt, heads)
    if backend == "torch" or not fused:
        return _attention_torch(qkv_img, qkv_txt, q_norm_img, k_norm_img, q_norm_txt, k_norm_txt,
                                rope_img, rope_txt, heads, eps)
    import pidkern.kernels.attention  # noqa: F401  (registers the torch.ops.pidkern attention ops)
    cos_t, sin_t = rope_txt if rope_txt is not None else (None, None)
    args = (qkv_img, qkv_txt, q_norm_img, k_norm_img, q_norm_txt, k_norm_txt, *rope_img, cos_t, sin_t,
            heads, float(eps))
    mode = backend.removeprefix("prep+").removesuffix("-triton")
    if backend in ("triton", f"{mode}-triton"):
        if backend == "triton":
            o_img, o_txt = torch.ops.pidkern.attention(*args)
        else:
            o_img, o_txt = torch.ops.pidkern.attention_8bit(*args, mode)
        return o_img, (o_txt if qkv_txt is not None else None)
    q, k, v = torch.ops.pidkern.attention_prep(*args)
    T = q.shape[1] - qkv_img.shape[1]
    if backend == "prep+sdpa":
        return attend(q, k, v, T, qkv_txt is not None)
    if backend == "prep+triton":
        o = torch.ops.pidkern.attention_core(q, k, v)
    elif mode in _8BIT_MODES:
        o = torch.ops.pidkern.attention_core_8bit(q, k, v, mode)
    else:
        from .attention_routes import ROUTES
        o = ROUTES[backend](q, k, v)
    return o[:, T:], (o[:, :T] if qkv_txt is not None else None)


def qkv_rope(h_img, w_img, norms_img, rope_img, h_txt=None, w_txt=None, norms_txt=None, rope_txt=None, *,
             heads: int, eps: float = 1e-6):
    """The attention's QKV Linear (no bias) and its QK-norm + RoPE: q, k, v [B, T+L, H, hd],
    text first, ready for `attend`.

    h_img [B, L, D] and h_txt [B, T, D] (or None) are the normalised block inputs,
    w_* [3*heads*hd, D] the QKV weights, norms_* [2, hd] the q and k RMSNorm weights
    stacked, rope_* (cos, sin) float32 [N, hd/2]. The Triton kernel does the norm and
    RoPE in the GEMM's epilogue (power-of-two head dims, 16-byte aligned rows on CUDA);
    otherwise cuBLAS + the PyTorch chain, rounding the Linear's output the same way."""
    hd = w_img.shape[0] // (3 * heads) if isinstance(heads, int) and heads > 0 else 0
    # the fused GEMM reads 16-bit weights: fp8 ones take the unfused chain
    fused = (not isinstance(w_img, Fp8Weight) and use_triton("qkv_rope", h_img, w_img) and hd >= 16
             and hd & (hd - 1) == 0)
    if fused and h_img.is_cuda:
        from pidkern.kernels.qkv_rope import rows_aligned
        fused = rows_aligned(h_img, w_img) and (h_txt is None or rows_aligned(h_txt, w_txt))
    if fused:
        import pidkern.kernels.qkv_rope  # noqa: F401  (registers torch.ops.pidkern.qkv_rope)
        cos_t, sin_t = rope_txt if rope_txt is not None else (None, None)
        return tuple(torch.ops.pidkern.qkv_rope(h_img, w_img, norms_img, *rope_img, h_txt, w_txt, norms_txt,
                                                cos_t, sin_t, heads, float(eps)))
    qkv_txt = linear(h_txt, w_txt) if h_txt is not None else None
    return _prep_torch(linear(h_img, w_img), qkv_txt, norms_img[0], norms_img[1],
                       *((None, None) if norms_txt is None else (norms_txt[0], norms_txt[1])),
                       rope_img, rope_txt, heads, eps)


# ------------------------------------------------- GEMMs with fused prologues/epilogues

def patch_pixel_embed(x: torch.Tensor, patch_w: torch.Tensor, patch_b: torch.Tensor, pix_w: torch.Tensor,
                      pix_b: torch.Tensor, sincos_col: torch.Tensor, sincos_row: torch.Tensor, patch: int):
    """Patch tokens [B, L, D] and per-patch pixel tokens [B*L, P*P, Dp] of an image x [B, 3, H, W].

    sincos_col [W, Dp/2] / sincos_row [H, Dp/2]: the fixed float32 sin-cos tables (reference.pixel_sincos).
    Outputs take patch_w's dtype."""
    if use_triton("embed", x, patch_w):
        from pidkern.kernels.embed import patch_pixel_embed as fused
        return fused(x, patch_w, patch_b, pix_w, pix_b, sincos_col, sincos_row, patch)
    H, W, Dp = x.shape[2], x.shape[3], pix_w.shape[0]
    tok = F.linear(F.unfold(x.to(patch_w.dtype), patch, stride=patch).transpose(1, 2), patch_w, patch_b)
    emb = torch.cat([sincos_col[None, :, :].expand(H, W, Dp // 2), sincos_row[:, None, :].expand(H, W, Dp // 2)], -1)
    pix = F.linear(x.permute(0, 2, 3, 1).to(pix_w.dtype), pix_w, pix_b) + emb.to(pix_w.dtype)
    return tok, reference.to_patch_pixels(pix, patch)


def lq_gate(x: torch.Tensor, lq: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
            log_alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x + sigmoid([x, lq] W^T + b - exp(log_alpha) * sigma) * lq (reference.lq_gate), in x's dtype.

    x, lq [B, N, D]; sigma [B] float32 (per sample); log_alpha a 0-d tensor;
    weight [D, 2D] and bias [D] (v1), or [1, 2D] and [1] (v1.5, one gate per token)."""
    if use_triton("gate", x, lq, weight):
        from pidkern.kernels.gate import lq_gate as fused
        return fused(x, lq, weight, bias, log_alpha, sigma)
    z = torch.nn.functional.linear(torch.cat([x.to(weight.dtype), lq.to(weight.dtype)], -1), weight, bias)
    g = torch.sigmoid(z.float() - log_alpha.float().exp() * sigma.float().view(-1, 1, 1))
    return (x.float() + g * lq.float()).to(x.dtype)


def swiglu_gate_up(u: torch.Tensor, w13: torch.Tensor, split: bool = False) -> torch.Tensor:
    """SiLU(u w1^T) * (u w3^T) for u [M, D] and w13 = cat([w1, w3]) [2*Hm, D]; the w2
    GEMM that follows stays a plain matmul. The Triton path is one GEMM with the product
    in its epilogue, or with split=True a cuBLAS GEMM against w13 and one silu_mul pass.
    An fp8 w13 (fp8.Fp8Weight) always takes the split form: its GEMM is the fp8 one."""
    eight = isinstance(w13, Fp8Weight)
    if use_triton("swiglu", u, w13.data if eight else w13):
        from pidkern.kernels.swiglu import silu_mul, swiglu_gate_up as fused
        return silu_mul(linear(u, w13)) if split or eight else fused(u, w13)
    if eight:
        g, up = linear(u, w13).chunk(2, -1)
        return torch.nn.functional.silu(g) * up
    w1, w3 = w13.chunk(2, 0)
    return torch.nn.functional.silu(u @ w1.T) * (u @ w3.T)
