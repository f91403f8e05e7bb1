"""8-bit (e4m3) GEMMs: the one place their math is written. See docs/fp8.md.

Scheme: a weight W [N, K] is stored as e4m3 (`torch.float8_e4m3fn`) with one float32
scale per output row, s_w[n] = amax(|W[n, :]|) / 448, so every row uses the format's
whole range. An activation x [M, K] is quantized the same way per row (per token) at
every call, s_x[m] = amax(|x[m, :]|) / 448. Then

    y[m, n] = s_x[m] * s_w[n] * sum_k q_x[m, k] * q_w[n, k]  (+ bias[n])

which is `torch._scaled_mm` with rowwise scales: scale_a [M, 1], scale_b [1, N], float32.
On CUDA (Ada/Hopper and later) that is cuBLAS's or CUTLASS's fp8 tensor-core GEMM; on the
CPU the same call runs emulated, so the CPU tests exercise the same code and numbers.

Layout rules of `torch._scaled_mm` on CUDA, met here by construction: the first operand
row-major, the second column-major (q_w [N, K] row-major, passed transposed), K and N
multiples of 16, scales float32 and contiguous, and with rowwise scales an output in
bfloat16 (other output dtypes only with cuBLAS >= 12.9 on sm90). A weight whose N or K is not a
multiple of 16 is never quantized (`quantizable`): it stays native on every device, so
the CPU and the GPU run the same layers in 8-bit.

Two routes run the product (the Plan's "gemm" entry): "scaled_mm" (the call above) and
"torchao" (torchao's Float8Tensor over the same bytes and scales: its own activation
quantization and, on sm90 with its kernels installed, its own GEMM). torchao is optional.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)          # 448
# An all-zero row (or tensor slice) gets this amax: its scale stays positive, its codes 0.
TINY_AMAX = 1e-30
GEMM_ROUTES = ("scaled_mm", "torchao")


def amax(t: torch.Tensor, dims, keepdim: bool = True) -> torch.Tensor:
    """max |t| over `dims` in float32, never below TINY_AMAX: the one amax every e4m3
    scale in pidkern is made from (weights, activations, attention's q, k, v)."""
    return t.detach().abs().amax(dims, keepdim=keepdim).float().clamp_min(TINY_AMAX)


def quantize(t: torch.Tensor, dims=-1) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale): t as e4m3 codes and float32 scales (size 1 along `dims`) with
    t ~ codes * scale, the largest magnitude of each slice over `dims` mapped to 448."""
    scale = amax(t, dims) / E4M3_MAX
    # the clamp only catches |t| / scale rounding a hair above 448 (a cast past the
    # largest finite e4m3 value would give NaN)
    codes = (t.float() / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return codes, scale


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale): t [..., K] as e4m3 codes [..., K] and float32 per-row scales [..., 1]."""
    return quantize(t, -1)


def quantizable(weight: torch.Tensor) -> bool:
    """Whether `weight` [N, K] meets the GEMM's layout rule: N and K multiples of 16."""
    return weight.dim() == 2 and weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0


@dataclass(eq=False)
class Fp8Weight:
    """An e4m3 weight [N, K] with its float32 per-row scales [N, 1] and the dtype it came from.

    `ops.linear(x, w, b)` takes one in place of a tensor."""
    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype
    _ao: object = None       # torchao's view of the same bytes, built on first use

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> "Fp8Weight":
        if not quantizable(weight):
            raise ValueError(f"weight: shape {tuple(weight.shape)} cannot be an fp8 GEMM operand; "
                             f"expected [N, K] with N and K multiples of 16")
        data, scale = quantize_rows(weight)
        return cls(data.contiguous(), scale.contiguous(), weight.dtype)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def torchao(self):
        """torchao's Float8Tensor over these codes and scales (no copy), or ImportError."""
        if self._ao is None:
            self._ao = _torchao_tensor(self)
        return self._ao


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    # rowwise-scaled fp8 GEMMs write only bfloat16 on some CUDA builds (CUTLASS's kernel;
    # float16 and float32 need cuBLAS >= 12.9 on sm90): the product is made in bfloat16
    # there and cast to x's dtype
    return torch.bfloat16 if x.is_cuda else x.dtype


def scaled_mm(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (any float dtype) times w^T, rowwise fp8, in x's dtype: the "scaled_mm" route."""
    lead, k = x.shape[:-1], x.shape[-1]
    if k != w.shape[1]:
        raise ValueError(f"x: last dim {k} does not match the fp8 weight's K={w.shape[1]} (weight {tuple(w.shape)})")
    codes, sx = quantize_rows(x.reshape(-1, k))
    out_dtype = _out_dtype(x)
    y = torch._scaled_mm(codes, w.data.t(), scale_a=sx, scale_b=w.scale.view(1, -1),
                         bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype)
    return y.to(x.dtype).view(*lead, w.shape[0])


def _torchao_tensor(w: Fp8Weight):
    from torchao.float8.inference import Float8MMConfig
    from torchao.quantization.granularity import PerRow
    from torchao.quantization.quantize_.common import KernelPreference
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import (Float8Tensor,
                                                                               QuantizeTensorToFloat8Kwargs)
    # AUTO picks torchao's own kernels where they run (sm90 with mslk); elsewhere the torch
    # path, which on the CPU is the emulated _scaled_mm
    pref = KernelPreference.AUTO if w.data.is_cuda else KernelPreference.TORCH
    act = QuantizeTensorToFloat8Kwargs(E4M3, PerRow(), kernel_preference=pref)
    # full-precision accumulation on both routes: Hopper's "fast accumulation" is a speed
    # lever whose accuracy CPU emulation cannot show, left for a GPU session to measure
    return Float8Tensor(w.data, w.scale, [1, w.shape[1]], Float8MMConfig(use_fast_accum=False),
                        act_quant_kwargs=act, kernel_preference=pref, dtype=w.dtype)


def torchao_linear(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The "torchao" route: torchao's float8 inference linear over the same weight bytes."""
    import torch.nn.functional as F
    out_dtype = _out_dtype(x)
    y = F.linear(x.to(out_dtype), w.torchao(), None if bias is None else bias.to(out_dtype))
    return y.to(x.dtype)


def torchao_available(device) -> bool:
    """Whether the torchao route can run on `device`: torchao imports, and on CUDA the card
    has fp8 tensor cores (compute capability 8.9 or later)."""
    import importlib.util
    if importlib.util.find_spec("torchao") is None:
        return False
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_capability(dev) >= (8, 9)
    return True


def fp8_supported(device) -> str | None:
    """None when fp8 GEMMs can run on `device`, else why not."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.get_device_capability(dev) < (8, 9):
        return (f"{torch.cuda.get_device_name(dev)} (compute capability "
                f"{'.'.join(map(str, torch.cuda.get_device_capability(dev)))}) has no fp8 tensor cores; "
                f"fp8 GEMMs need 8.9 (Ada) or later")
    return None
