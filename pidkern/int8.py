"""int8 GEMMs (`precision="int8"`): the one place their math is written. See docs/int8.md.

Scheme: a weight W [N, K] is stored as int8 codes with one float32 scale per output row,
s_w[n] = amax(|W[n, :]|) / 127 (a file's single per-tensor scale is read as that scale on
every row). An activation x [M, K] is quantized the same way per row (per token) at every
call, s_x[m] = amax(|x[m, :]|) / 127, rounding half to even and clamping to [-128, 127].
Then

    y[m, n] = s_x[m] * s_w[n] * sum_k q_x[m, k] * q_w[n, k]  (+ bias[n])

with the sum an int8 x int8 -> int32 GEMM: `torch._int_mm` (cuBLASLt's IMMA tensor cores on
CUDA, Turing and later; exact int32 arithmetic on the CPU) or the Triton kernel of
pidkern.kernels.int8_gemm.

ConvRot: with a group size G (a power of 4) the weight is rotated before it is quantized,
W' = W H per run of G input columns, H the normalised regular Hadamard matrix of
`hadamard`. H is orthogonal and symmetric, so rotating the activation the same
way gives the same product, x H (W H)^T = x W^T, while each rotated row spreads its
outliers over its group: the per-row int8 grid then fits both operands better. ComfyUI's
`int8_tensorwise` files with `"convrot": true` store W' this way (comfy-kitchen's layout),
and run here without requantisation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

INT8_ROUTES = ("int_mm", "triton")
_TINY_SCALE = 1e-30      # an all-zero row: a positive scale, zero codes (comfy-kitchen's floor)


def hadamard(size: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The normalised regular Hadamard matrix of a ConvRot group (size a power of 4): the
    Kronecker powers of the 4x4 regular Hadamard matrix, over sqrt(size). Symmetric and
    orthogonal, so it is its own inverse."""
    if size < 4 or 4 ** round(math.log(size, 4)) != size:
        raise ValueError(f"size={size}: a regular Hadamard matrix exists here for powers of 4 (4, 16, 64, 256...)")
    h4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=torch.float64)
    h = h4
    while h.shape[0] < size:
        h = torch.kron(h, h4)
    return (h / math.sqrt(size)).to(device=device, dtype=dtype)


def rotate_groups(t: torch.Tensor, group: int) -> torch.Tensor:
    """t [..., K] with each run of `group` columns multiplied by the Hadamard matrix: how a
    ConvRot layer's activations are rotated, and (H being its own inverse) how its rotated
    weight goes back to the original basis."""
    k = t.shape[-1]
    if k % group:
        raise ValueError(f"width {k} is not a multiple of the ConvRot group {group}")
    h = hadamard(group, t.device, t.dtype)
    return (t.reshape(*t.shape[:-1], k // group, group) @ h).reshape(t.shape)


def convrot_group(k: int, limit: int = 256) -> int | None:
    """The ConvRot group for an input width k: the largest power of 4 up to `limit` that
    divides it (ComfyUI's writers' rule, 256 at most), None when not even 4 does."""
    g = 4
    while g * 4 <= limit and k % (g * 4) == 0:
        g *= 4
    return g if k % g == 0 else None


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale): t [..., K] as int8 codes [..., K] and float32 per-row scales
    [..., 1], t ~ codes * scale with each row's largest magnitude at 127."""
    t = t.detach().float()
    scale = (t.abs().amax(-1, keepdim=True) / 127.0).clamp_min(_TINY_SCALE)
    return (t / scale).round_().clamp_(-128, 127).to(torch.int8), scale


@dataclass(eq=False)
class Int8Weight:
    """An int8 weight [N, K] with float32 per-row scales [N, 1], its ConvRot group (None:
    not rotated) and the dtype it came from. `ops.linear(x, w, b)` takes one in place of a
    tensor once the fast path routes it (pidkern.int8.linear runs it)."""
    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype
    convrot: int | None = None

    @classmethod
    def quantize(cls, weight: torch.Tensor, convrot: int | None = None) -> "Int8Weight":
        """Quantize a float weight [N, K], rotated by Hadamard groups of `convrot` first."""
        if weight.dim() != 2:
            raise ValueError(f"weight: shape {tuple(weight.shape)}; expected [N, K]")
        w = weight.detach().float()
        if convrot:
            w = rotate_groups(w, convrot)
        data, scale = quantize_rows(w)
        return cls(data.contiguous(), scale.contiguous(), weight.dtype, convrot or None)

    @classmethod
    def from_stored(cls, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                    convrot: int | None = None) -> "Int8Weight":
        """A file's codes [N, K] and scale (one per tensor or one per row) as they are: no
        requantisation."""
        n = codes.shape[0]
        s = scale.detach().float().reshape(-1, 1)
        if s.shape[0] not in (1, n):
            raise ValueError(f"scale: {scale.numel()} values for a weight of {n} rows; expected 1 or {n}")
        return cls(codes.contiguous(), s.expand(n, 1).contiguous(), dtype, convrot or None)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def rows(self, index) -> "Int8Weight":
        """The weight of these output rows (a slice, index tensor or list): exact, each row
        keeps its scale."""
        return Int8Weight(self.data[index].contiguous(), self.scale[index].contiguous(), self.dtype, self.convrot)

    @staticmethod
    def cat(weights) -> "Int8Weight":
        """Weights with the same K and rotation stacked along N (w1 | w3 of a SwiGLU)."""
        weights = list(weights)
        if len({(w.shape[1], w.convrot) for w in weights}) != 1:
            raise ValueError(f"weights: (K, convrot) differ: {[(w.shape[1], w.convrot) for w in weights]}; "
                             f"stacked int8 weights share both")
        return Int8Weight(torch.cat([w.data for w in weights]), torch.cat([w.scale for w in weights]),
                          weights[0].dtype, weights[0].convrot)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def to(self, device) -> "Int8Weight":
        return Int8Weight(self.data.to(device), self.scale.to(device), self.dtype, self.convrot)

    def nbytes(self) -> int:
        return self.data.numel() + self.scale.numel() * self.scale.element_size()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = self.data.float() * self.scale
        if self.convrot:
            w = rotate_groups(w, self.convrot)
        return w.to(dtype or self.dtype)


def int_mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8 @ w[N, K]^T int8 -> int32 [M, N], exactly, through `torch._int_mm`. On
    CUDA cuBLASLt wants M > 16 and K, N multiples of 8 (N of 32 on Turing, whose int8
    kernels reject some narrower ones, as comfy-kitchen found): the operands are
    zero-padded to fit (zeros add nothing to the sums) and the result cut back."""
    m, k = a.shape
    n = w.shape[0]
    if not a.is_cuda:
        return torch._int_mm(a, w.t())
    n_unit = 32 if torch.cuda.get_device_capability(a.device) == (7, 5) else 8
    pm, pk, pn = max(32, -(-m // 8) * 8), -(-k // 8) * 8, -(-n // n_unit) * n_unit
    if (pm, pk) != (m, k):
        a = torch.nn.functional.pad(a, (0, pk - k, 0, pm - m))
    if (pn, pk) != (n, k):
        w = torch.nn.functional.pad(w, (0, pk - k, 0, pn - n))
    return torch._int_mm(a, w.t())[:m, :n]


def linear(x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None = None, route: str = "int_mm") -> torch.Tensor:
    """x [..., K] (any float dtype) times w^T with int8 operands, in x's dtype."""
    if route not in INT8_ROUTES:
        raise ValueError(f"route={route!r}: expected one of {INT8_ROUTES}")
    lead, k = x.shape[:-1], x.shape[-1]
    if k != w.shape[1]:
        raise ValueError(f"x: last dim {k} does not match the int8 weight's K={w.shape[1]} (weight {tuple(w.shape)})")
    u = x.reshape(-1, k)
    if w.convrot:
        u = rotate_groups(u.float(), w.convrot)
    codes, sx = quantize_rows(u)
    if route == "triton":
        from .kernels.int8_gemm import int8_gemm
        y = int8_gemm(codes, sx, w.data, w.scale, bias, x.dtype)
    else:
        # the scales' product first, then the accumulator (comfy-kitchen's order)
        y = int_mm(codes, w.data).float() * (sx * w.scale.view(1, -1))
        if bias is not None:
            y = y + bias.float()
        y = y.to(x.dtype)
    return y.view(*lead, w.shape[0])


def int8_supported(device) -> str | None:
    """None when int8 GEMMs run on `device` (the CPU; CUDA cards with int8 tensor cores:
    compute capability 7.5, Turing, or later), else why not."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.get_device_capability(dev) < (7, 5):
        cap = ".".join(map(str, torch.cuda.get_device_capability(dev)))
        return (f"{torch.cuda.get_device_name(dev)} (compute capability {cap}) has no int8 tensor cores; int8 GEMMs "
                f"need 7.5 (Turing) or later")
    return None
