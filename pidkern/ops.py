"""The one dispatch point between the fused Triton kernels and the reference math.

Every operation FastPiD.forward runs is called through this module. Each fused op takes
the route to run as an argument, `route="triton"` (its kernel) or `route="torch"` (the
plain PyTorch math of pidkern.reference); None picks the kernel when its tensors live on
a CUDA device or TRITON_INTERPRET=1 (how CI runs the kernels on the CPU), the math
otherwise. The attention's many routes are entries of pidkern.routes.TABLE, run by their
`kind`. Nothing here keeps state between calls. The plain ops (linear, silu, add_scaled,
rms_norm) are the PyTorch calls themselves, named here so the fast path has one
vocabulary. See docs/design.md, "Adding a kernel".
"""
from __future__ import annotations

import importlib.util
import os

import torch

import torch.nn.functional as F

from . import reference, routes
from .reference import apply_rope, rms_norm

HAS_TRITON = importlib.util.find_spec("triton") is not None

# Names of the ops that have a Triton kernel.
OPS = ("embed", "rms_modulate", "gate", "attention", "qkv_rope", "pixel_modulate", "swiglu")
ROUTES = ("triton", "torch")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(op: str, *tensors: torch.Tensor) -> bool:
    """Whether `op` runs its Triton kernel for these tensors when no route is given."""
    if op not in OPS:
        raise ValueError(f"op={op!r} is not a fused op; expected one of {OPS}")
    if not HAS_TRITON:
        return False
    return interpreting() or all(t.is_cuda for t in tensors)


def _kernel(op: str, route, *tensors) -> bool:
    """Whether `op` runs its kernel: `route` as given, or use_triton's rule for None."""
    if route is None:
        return use_triton(op, *tensors)
    if route not in ROUTES:
        raise ValueError(f"route={route!r} for {op}: expected one of {ROUTES} or None")
    if route == "triton" and not HAS_TRITON:
        raise ValueError(f"route='triton' for {op}: Triton is not installed")
    return route == "triton"


def triton_available(device) -> bool:
    """Whether the Triton kernels can run for tensors on `device` (CUDA, or the interpreter)."""
    return HAS_TRITON and (interpreting() or getattr(device, "type", str(device).split(":")[0]) == "cuda")


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
    if _kernel("rms_modulate", route, x):
        from pidkern.kernels.rms_modulate import add_rms_modulate as fused
        return fused(x, weight, shift, scale, y, gate, eps, out_dtype)
    if out_dtype is None:
        out_dtype = (y if y is not None else x).dtype
    if (y is None) != (gate is None):
        raise ValueError("y and gate must be given together (the residual update is x + gate * y)")
    x_new = x if y is None else (x + gate * y).to(x.dtype)
    h = reference.modulate(rms_norm(x_new, weight, eps), shift, scale)
    return x_new, h.to(out_dtype)


def pixel_post(p, e, m, norm2_w, fc1_w, fc1_b, fc2_w, fc2_b, eps=1e-6, route=None):
    """The pixel block's second half (docs/design.md, "The network"):
    p1 = p + gate1 * e; p_new = p1 + gate2 * fc2(GELU(fc1(RMSNorm16(p1) * norm2_w * (1 + scale2) + shift2))).
    p: [R, P2, 16]; e: expand_from_attn output [R, P2*16]; m: modulation [R, P2*96], or only its
    post-attention chunks (gate1, shift2, scale2, gate2) as [R, P2*64]. Returns p's dtype."""
    if _kernel("pixel_modulate", route, p, e, m):
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

# every value ops.attention's `backend` takes: the attention routes of pidkern.routes
ATTENTION_BACKENDS = routes.values("attention.patch")


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


def prep_qkv(qkv_img, qkv_txt, q_norm_img, k_norm_img, q_norm_txt, k_norm_txt, rope_img, rope_txt,
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
    q, k, v = prep_qkv(qkv_img, qkv_txt, q_norm_img, k_norm_img, q_norm_txt, k_norm_txt, rope_img, rope_txt,
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
    fused = use_triton("attention", qkv_img) and _attention_rows_aligned(qkv_img, qkv_txt, heads)
    if r.kind == "torch" or not fused:
        return _attention_torch(qkv_img, qkv_txt, q_norm_img, k_norm_img, q_norm_txt, k_norm_txt,
                                rope_img, rope_txt, heads, eps)
    import pidkern.kernels.attention  # noqa: F401  (registers the torch.ops.pidkern attention ops)
    cos_t, sin_t = rope_txt if rope_txt is not None else (None, None)
    args = (qkv_img, qkv_txt, q_norm_img, k_norm_img, q_norm_txt, k_norm_txt, *rope_img, cos_t, sin_t,
            heads, float(eps))
    if r.kind == "fused":
        if r.mode is None:
            o_img, o_txt = torch.ops.pidkern.attention(*args)
        else:
            o_img, o_txt = torch.ops.pidkern.attention_8bit(*args, r.mode)
        return o_img, (o_txt if qkv_txt is not None else None)
    q, k, v = torch.ops.pidkern.attention_prep(*args)
    T = q.shape[1] - qkv_img.shape[1]
    if r.library is not None:
        from .attention_routes import ROUTES
        o = ROUTES[r.name](q, k, v)
    elif r.mode is not None:
        o = torch.ops.pidkern.attention_core_8bit(q, k, v, r.mode)
    elif r.name == "prep+triton":
        o = torch.ops.pidkern.attention_core(q, k, v)
    else:   # prep+sdpa
        return attend(q, k, v, T, qkv_txt is not None)
    return o[:, T:], (o[:, :T] if qkv_txt is not None else None)


def qkv_rope(h_img, w_img, norms_img, rope_img, h_txt=None, w_txt=None, norms_txt=None, rope_txt=None, *,
             heads: int, eps: float = 1e-6, route=None):
    """The attention's QKV Linear (no bias) and its QK-norm + RoPE: q, k, v [B, T+L, H, hd],
    text first, ready for `attend`.

    h_img [B, L, D] and h_txt [B, T, D] (or None) are the normalised block inputs,
    w_* [3*heads*hd, D] the QKV weights, norms_* [2, hd] the q and k RMSNorm weights
    stacked, rope_* (cos, sin) float32 [N, hd/2]. The Triton kernel does the norm and
    RoPE in the GEMM's epilogue (power-of-two head dims, 16-byte aligned rows on CUDA);
    otherwise cuBLAS + the PyTorch chain, rounding the Linear's output the same way."""
    hd = w_img.shape[0] // (3 * heads) if isinstance(heads, int) and heads > 0 else 0
    fused = _kernel("qkv_rope", route, h_img, w_img) and hd >= 16 and hd & (hd - 1) == 0
    if fused and h_img.is_cuda:
        from pidkern.kernels.qkv_rope import rows_aligned
        fused = rows_aligned(h_img, w_img) and (h_txt is None or rows_aligned(h_txt, w_txt))
    if fused:
        import pidkern.kernels.qkv_rope  # noqa: F401  (registers torch.ops.pidkern.qkv_rope)
        cos_t, sin_t = rope_txt if rope_txt is not None else (None, None)
        return tuple(torch.ops.pidkern.qkv_rope(h_img, w_img, norms_img, *rope_img, h_txt, w_txt, norms_txt,
                                                cos_t, sin_t, heads, float(eps)))
    qkv_txt = linear(h_txt, w_txt) if h_txt is not None else None
    return prep_qkv(linear(h_img, w_img), qkv_txt, norms_img[0], norms_img[1],
                       *((None, None) if norms_txt is None else (norms_txt[0], norms_txt[1])),
                       rope_img, rope_txt, heads, eps)


# ------------------------------------------------- GEMMs with fused prologues/epilogues

def patch_pixel_embed(x: torch.Tensor, patch_w: torch.Tensor, patch_b: torch.Tensor, pix_w: torch.Tensor,
                      pix_b: torch.Tensor, sincos_col: torch.Tensor, sincos_row: torch.Tensor, patch: int,
                      route=None):
    """Patch tokens [B, L, D] and per-patch pixel tokens [B*L, P*P, Dp] of an image x [B, 3, H, W].

    sincos_col [W, Dp/2] / sincos_row [H, Dp/2]: the fixed float32 sin-cos tables (reference.pixel_sincos).
    Outputs take patch_w's dtype."""
    if _kernel("embed", route, x, patch_w):
        from pidkern.kernels.embed import patch_pixel_embed as fused
        return fused(x, patch_w, patch_b, pix_w, pix_b, sincos_col, sincos_row, patch)
    H, W, Dp = x.shape[2], x.shape[3], pix_w.shape[0]
    tok = F.linear(F.unfold(x.to(patch_w.dtype), patch, stride=patch).transpose(1, 2), patch_w, patch_b)
    emb = torch.cat([sincos_col[None, :, :].expand(H, W, Dp // 2), sincos_row[:, None, :].expand(H, W, Dp // 2)], -1)
    pix = F.linear(x.permute(0, 2, 3, 1).to(pix_w.dtype), pix_w, pix_b) + emb.to(pix_w.dtype)
    return tok, reference.to_patch_pixels(pix, patch)


def lq_gate(x: torch.Tensor, lq: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
            log_alpha: torch.Tensor, sigma: torch.Tensor, route=None) -> torch.Tensor:
    """x + sigmoid([x, lq] W^T + b - exp(log_alpha) * sigma) * lq (reference.lq_gate), in x's dtype.

    x, lq [B, N, D]; sigma [B] float32 (per sample); log_alpha a 0-d tensor;
    weight [D, 2D] and bias [D] (v1), or [1, 2D] and [1] (v1.5, one gate per token)."""
    if _kernel("gate", route, x, lq, weight):
        from pidkern.kernels.gate import lq_gate as fused
        return fused(x, lq, weight, bias, log_alpha, sigma)
    z = torch.nn.functional.linear(torch.cat([x.to(weight.dtype), lq.to(weight.dtype)], -1), weight, bias)
    g = torch.sigmoid(z.float() - log_alpha.float().exp() * sigma.float().view(-1, 1, 1))
    return (x.float() + g * lq.float()).to(x.dtype)


def swiglu_gate_up(u: torch.Tensor, w13: torch.Tensor, split: bool = False, route=None) -> torch.Tensor:
    """SiLU(u w1^T) * (u w3^T) for u [M, D] and w13 = cat([w1, w3]) [2*Hm, D]; the w2
    GEMM that follows stays a plain matmul. The Triton path is one GEMM with the product
    in its epilogue, or with split=True a cuBLAS GEMM against w13 and one silu_mul pass.
    (A w13 of another format, e.g. fp8, makes its own GEMM: then call silu_mul.)"""
    if _kernel("swiglu", route, u, w13):
        from pidkern.kernels.swiglu import swiglu_gate_up as fused
        return silu_mul(linear(u, w13), "triton") if split else fused(u, w13)
    w1, w3 = w13.chunk(2, 0)
    return torch.nn.functional.silu(u @ w1.T) * (u @ w3.T)


def silu_mul(gu: torch.Tensor, route=None) -> torch.Tensor:
    """SiLU(g) * up for gu = [g | up] [M, 2*Hm] (a gate-up GEMM's output)."""
    if _kernel("swiglu", route, gu):
        from pidkern.kernels.swiglu import silu_mul as fused
        return fused(gu)
    g, up = gu.chunk(2, -1)
    return torch.nn.functional.silu(g) * up
