"""The `torch.ops.pidkern` ops of the fused kernels: each op's schema, its PyTorch math and
which device runs what (docs/design.md, "Adding a kernel").

Every op is declared here, in a module that imports no Triton, from its math: a function
built from the pieces of `pidkern.reference` (where the network's math is written once),
laid out as the kernel's inputs and outputs. That function is the op's implementation on
every device without another one (the CPU) and its fake (Meta) implementation, which
torch.compile and CUDA-graph capture trace. Where Triton is installed, the op's CUDA
implementation is its Triton launcher in `pidkern.kernels`, imported on the first CUDA call.
So the dispatcher picks the fallback by device, as pytorch/extension-cpp does:
`torch.ops.pidkern.gate(...)` runs the kernel on CUDA and the math on the CPU.

Two routes name an implementation instead (`pidkern.ops`, with the plan's value):
`math(op, ...)` runs the PyTorch math on any device ("torch"); `kernel(op, ...)` runs the
Triton launcher on any device the kernels take ("triton"), the CPU included under
TRITON_INTERPRET=1, which is how the tests run the kernels without a GPU. A kernel with a
shape rule (`fusable`: the QKV epilogue's power-of-two head dims, 16-byte aligned rows on
CUDA) hands the shapes it does not take to the math, on either path.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference

HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------- the math, per op
# reference's pieces take the layers as callables: these are the fused ops' layers

def _linear(weight: Tensor, bias: Tensor | None = None):
    """x W^T + b with x in W's dtype (activations may be wider than the weights)."""
    return lambda x: F.linear(x.to(weight.dtype), weight, bias)


def _norm(weight: Tensor, eps: float):
    return lambda x: reference.rms_norm(x, weight, eps)


def _gate(x: Tensor, lq: Tensor, weight: Tensor, bias: Tensor, log_alpha: Tensor, sigma: Tensor) -> Tensor:
    return reference.lq_gate(x, lq, weight, bias, log_alpha, sigma).to(x.dtype).contiguous()


def _embed(x: Tensor, patch_w: Tensor, patch_b: Tensor, pix_w: Tensor, pix_b: Tensor, sincos_col: Tensor,
           sincos_row: Tensor, patch: int) -> tuple[Tensor, Tensor]:
    tok = reference.patch_tokens(x, _linear(patch_w, patch_b), patch)
    pix = reference.pixel_tokens(x, _linear(pix_w, pix_b), reference.join_sincos(sincos_col, sincos_row), patch)
    return tok.contiguous(), pix.contiguous()


def _modulated(x, weight, shift, scale, eps, out_dtype):
    return reference.modulate(reference.rms_norm(x, weight, eps), shift, scale).to(out_dtype).contiguous()


def _rms_modulate(x: Tensor, weight: Tensor, shift: Tensor, scale: Tensor, eps: float,
                  out_dtype: torch.dtype) -> Tensor:
    return _modulated(x, weight, shift, scale, eps, out_dtype)


def _add_rms_modulate(x: Tensor, weight: Tensor, shift: Tensor, scale: Tensor, y: Tensor, gate: Tensor,
                      eps: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    x_new = reference.residual(x, gate, y).to(x.dtype).contiguous()
    return x_new, _modulated(x_new, weight, shift, scale, eps, out_dtype)


def _pixel_post(p: Tensor, e: Tensor, m: Tensor, norm2_w: Tensor, fc1_w: Tensor, fc1_b: Tensor, fc2_w: Tensor,
                fc2_b: Tensor, eps: float) -> Tensor:
    R, P2, Dp = p.shape
    m3 = m.reshape(R, P2, -1)
    first = m3.shape[-1] // Dp - 4     # gate1, shift2, scale2, gate2: the last four chunks of m's row
    g1, sh2, sc2, g2 = (m3[..., k * Dp:(k + 1) * Dp] for k in range(first, first + 4))
    mlp = lambda u: reference.pixel_mlp(u, _linear(fc1_w, fc1_b), _linear(fc2_w, fc2_b))  # noqa: E731
    return reference.pixel_post(p, e.reshape(R, P2, Dp), g1, sh2, sc2, g2, _norm(norm2_w, eps), mlp).contiguous()


def _swiglu(u: Tensor, w13: Tensor) -> Tensor:
    w1, w3 = w13.chunk(2, 0)
    return reference.swiglu_hidden(u, _linear(w1), _linear(w3))


def _silu_mul(ab: Tensor) -> Tensor:
    return reference.silu_mul(*ab.chunk(2, -1))


def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
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


def prep_qkv(qkv_img, qkv_txt, q_norm_img, k_norm_img, q_norm_txt, k_norm_txt, rope_img, rope_txt, heads, eps):
    """QK-norm + RoPE of q, k per source and [text; image] concatenation: q, k, v [B, T+L, H, hd]."""
    hd = qkv_img.shape[2] // (3 * heads)

    def prep(qkv, wq, wk, rope):
        q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, hd).unbind(2)
        cos, sin = (r[:, None, :] for r in rope)          # [N, 1, hd/2]: q, k are [B, N, H, hd]
        return (reference.qk_norm_rope(q, _norm(wq, eps), cos, sin),
                reference.qk_norm_rope(k, _norm(wk, eps), cos, sin), v)

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


def _pair(a, b):
    return None if a is None else (a, b)


def _attention_prep(qkv_img: Tensor, qkv_txt: Optional[Tensor], q_norm_img: Tensor, k_norm_img: Tensor,
                    q_norm_txt: Optional[Tensor], k_norm_txt: Optional[Tensor], cos_img: Tensor, sin_img: Tensor,
                    cos_txt: Optional[Tensor], sin_txt: Optional[Tensor], heads: int,
                    eps: float) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v = prep_qkv(qkv_img, qkv_txt, q_norm_img, k_norm_img, q_norm_txt, k_norm_txt, (cos_img, sin_img),
                       _pair(cos_txt, sin_txt), heads, eps)
    # without text v is a view of the input: an op's outputs are its own tensors
    return q.contiguous(), k.contiguous(), v.clone(memory_format=torch.contiguous_format)


def _attention(qkv_img: Tensor, qkv_txt: Optional[Tensor], q_norm_img: Tensor, k_norm_img: Tensor,
               q_norm_txt: Optional[Tensor], k_norm_txt: Optional[Tensor], cos_img: Tensor, sin_img: Tensor,
               cos_txt: Optional[Tensor], sin_txt: Optional[Tensor], heads: int, eps: float) -> tuple[Tensor, Tensor]:
    q, k, v = prep_qkv(qkv_img, qkv_txt, q_norm_img, k_norm_img, q_norm_txt, k_norm_txt, (cos_img, sin_img),
                       _pair(cos_txt, sin_txt), heads, eps)
    o_img, o_txt = attend(q, k, v, q.shape[1] - qkv_img.shape[1], True)
    # as the kernel's: o_txt [B, T, C] (T = 0 without text), its own tensor, not a view beside o_img
    return o_img.contiguous(), o_txt.clone(memory_format=torch.contiguous_format)


def _attention_8bit(qkv_img: Tensor, qkv_txt: Optional[Tensor], q_norm_img: Tensor, k_norm_img: Tensor,
                    q_norm_txt: Optional[Tensor], k_norm_txt: Optional[Tensor], cos_img: Tensor, sin_img: Tensor,
                    cos_txt: Optional[Tensor], sin_txt: Optional[Tensor], heads: int, eps: float,
                    mode: str) -> tuple[Tensor, Tensor]:
    # the math has no 8-bit arithmetic: exact attention is what the 8-bit modes approximate
    return _attention(qkv_img, qkv_txt, q_norm_img, k_norm_img, q_norm_txt, k_norm_txt, cos_img, sin_img,
                      cos_txt, sin_txt, heads, eps)


def _attention_core(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return attend(q, k, v, 0, False)[0].contiguous()


def _attention_core_8bit(q: Tensor, k: Tensor, v: Tensor, mode: str) -> Tensor:
    return _attention_core(q, k, v)


def _qkv_rope(h_img: Tensor, w_img: Tensor, norms_img: Tensor, cos_img: Tensor, sin_img: Tensor,
              h_txt: Optional[Tensor], w_txt: Optional[Tensor], norms_txt: Optional[Tensor],
              cos_txt: Optional[Tensor], sin_txt: Optional[Tensor], heads: int,
              eps: float) -> tuple[Tensor, Tensor, Tensor]:
    qkv_txt = F.linear(h_txt, w_txt) if h_txt is not None else None
    q, k, v = prep_qkv(F.linear(h_img, w_img), qkv_txt, norms_img[0], norms_img[1],
                       *((None, None) if norms_txt is None else (norms_txt[0], norms_txt[1])),
                       (cos_img, sin_img), _pair(cos_txt, sin_txt), heads, eps)
    return q.contiguous(), k.contiguous(), v.contiguous()


# ------------------------------------------------------- the kernels' shape rules

def _aligned_attention(qkv_img, qkv_txt, *args) -> bool:
    heads = args[8]
    if not qkv_img.is_cuda or not isinstance(heads, int) or heads <= 0 or qkv_img.dim() != 3:
        return True  # the interpreter has no alignment rule; bad arguments get the kernel's errors
    from pidkern.kernels.attention import rows_aligned
    return rows_aligned(qkv_img, heads) and (qkv_txt is None or rows_aligned(qkv_txt, heads))


def _aligned_core(q, k, v, *mode) -> bool:
    if not q.is_cuda or q.dim() != 4:
        return True
    from pidkern.kernels._common import aligned_rows
    return aligned_rows([q, k, v], q.stride(0), q.stride(1), q.shape[-1])[1]


def _qkv_rope_fusable(h_img, w_img, norms_img, cos_img, sin_img, h_txt, w_txt, *rest) -> bool:
    heads = rest[-2]
    hd = w_img.shape[0] // (3 * heads) if isinstance(heads, int) and heads > 0 else 0
    if hd < 16 or hd & (hd - 1):
        return False      # the epilogue holds power-of-two heads only (the pixel blocks' 72 are not)
    if not h_img.is_cuda:
        return True
    from pidkern.kernels.qkv_rope import rows_aligned
    return rows_aligned(h_img, w_img) and (h_txt is None or rows_aligned(h_txt, w_txt))


# --------------------------------------------------------------- the op table

@dataclass(frozen=True)
class Op:
    """One `torch.ops.pidkern` op: its math, its Triton launcher (module, function: looked
    up at each call, so a test can count launches by wrapping it) and its shape rule."""
    name: str
    math: Callable
    module: str
    launcher: str
    fusable: Callable | None = None


OPS = {op.name: op for op in (
    Op("gate", _gate, "gate", "lq_gate"),
    Op("embed", _embed, "embed", "patch_pixel_embed"),
    Op("rms_modulate", _rms_modulate, "rms_modulate", "add_rms_modulate"),
    Op("add_rms_modulate", _add_rms_modulate, "rms_modulate", "add_rms_modulate"),
    Op("pixel_post", _pixel_post, "pixel_modulate", "pixel_post"),
    Op("swiglu", _swiglu, "swiglu", "swiglu_gate_up"),
    Op("silu_mul", _silu_mul, "swiglu", "silu_mul"),
    Op("qkv_rope", _qkv_rope, "qkv_rope", "qkv_rope", _qkv_rope_fusable),
    Op("attention", _attention, "attention", "attention_fused", _aligned_attention),
    Op("attention_8bit", _attention_8bit, "attention", "attention_fused", _aligned_attention),
    Op("attention_prep", _attention_prep, "attention", "attention_prep", _aligned_attention),
    Op("attention_core", _attention_core, "attention", "attention_core", _aligned_core),
    Op("attention_core_8bit", _attention_core_8bit, "attention", "attention_core", _aligned_core),
)}


def math(name: str, *args):
    """The op's PyTorch math on the arguments' device (the "torch" route)."""
    return OPS[name].math(*args)


def kernel(name: str, *args):
    """The op's Triton kernel (the "triton" route): on CUDA, or on the CPU under
    TRITON_INTERPRET=1; shapes outside the kernel's rule take the math."""
    op = OPS[name]
    if not HAS_TRITON:
        raise ValueError(f"route='triton' for {name}: Triton is not installed")
    first = args[0]
    if isinstance(first, Tensor) and not (first.is_cuda or interpreting()):
        raise ValueError(f"route='triton' for {name}: the kernel runs on CUDA tensors (or on the CPU under "
                         f"TRITON_INTERPRET=1), got {first.device}")
    if op.fusable is not None and not op.fusable(*args):
        return op.math(*args)
    launch = getattr(importlib.import_module(f"pidkern.kernels.{op.module}"), op.launcher)
    if name == "rms_modulate":      # the launcher takes the residual-free form as y = gate = None
        x, weight, shift, scale, eps, out_dtype = args
        return launch(x, weight, shift, scale, None, None, eps, out_dtype)[1]
    return launch(*args)


def _define(op: Op):
    d = torch.library.custom_op(f"pidkern::{op.name}", op.math, mutates_args=())
    d.register_fake(op.math)
    if HAS_TRITON:
        d.register_kernel("cuda")(lambda *args, _name=op.name: kernel(_name, *args))
    return d


DEFS = {name: _define(op) for name, op in OPS.items()}
