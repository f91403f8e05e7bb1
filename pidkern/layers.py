"""Prepared linear layers: each weight format is a class that owns its tensors and its GEMM.

FastPiD holds one of these for every Linear it runs (pidkern.fast). A layer is called
with the plan's GEMM route, `layer(x, gemm)`, and answers what it keeps on the device
(`owned_tensors`: the tensors it made itself; a view of the network's own weight is the
net's) and which of the network's parameters it made unread (`replaces`: the Decoder may
park those, pidkern.parking; the memory model counts what stays, pidkern.memory).

Formats: `NativeLinear` (the weight in the model's dtype, read by the fused GEMM
kernels too: `weight16`), `Fp8Linear` (e4m3 codes with per-row scales, pidkern.fp8),
`Int8Linear` (int8 codes with per-row scales, per-token activations, optionally ConvRot
rotated, pidkern.int8), `Mxfp8Linear` (an mxfp8 file's codes and block scales, on cards
with block-scaled fp8, pidkern.mxfp8). A new format is a new subclass with the same
four members, and an entry in `FORMATS`; `prepare` picks the class for a weight, and
`from_stored` builds one from a ComfyUI file's quantized weight as stored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import fp8, int8, mxfp8


class Linear:
    """x W^T + b in some weight format. Subclasses set `bias` and `replaces` and define the
    members below."""
    bias: torch.Tensor | None = None
    replaces: tuple = ()     # names (net.named_parameters) of the net's parameters it supersedes

    def __call__(self, x: torch.Tensor, gemm: str = "native") -> torch.Tensor:
        raise NotImplementedError

    @property
    def weight16(self) -> torch.Tensor | None:
        """The weight as a plain matrix for the kernels that fuse this GEMM (QKV + RoPE,
        SwiGLU gate-up), or None: then the GEMM is this layer's own and the fusion is split."""
        return None

    @property
    def shape(self) -> torch.Size:
        raise NotImplementedError

    def owned_tensors(self) -> list:
        """The device tensors this layer made (not views of the network's parameters)."""
        return []

    def owned_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.owned_tensors())


class NativeLinear(Linear):
    """The weight in the model's dtype: the net's own Linear's (owned=False, a reference),
    or one FastPiD laid out itself (owned=True: w1|w3 stacked, regrouped modulation)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, owned: bool = False,
                 replaces: tuple = ()):
        self.weight, self.bias, self.owned, self.replaces = weight, bias, owned, tuple(replaces)

    def __call__(self, x, gemm="native"):
        # the gemm route only picks among 8-bit GEMMs; a native layer has one GEMM
        return F.linear(x, self.weight, self.bias)

    @property
    def weight16(self):
        return self.weight

    @property
    def shape(self):
        return self.weight.shape

    def owned_tensors(self):
        return [self.weight] + ([self.bias] if self.bias is not None else []) if self.owned else []


class _RowScaledLinear(Linear):
    """An 8-bit weight object with `data` codes [N, K] and float32 per-row `scale`, and the
    bias in the model's dtype (owned when FastPiD made it: the regrouped modulation's)."""

    def __init__(self, weight, bias: torch.Tensor | None = None, replaces: tuple = (), owned_bias: bool = False):
        self.weight, self.bias, self.replaces, self.owned_bias = weight, bias, tuple(replaces), owned_bias

    @property
    def shape(self):
        return self.weight.shape

    def owned_tensors(self):
        return [self.weight.data, self.weight.scale] + ([self.bias] if self.owned_bias and self.bias is not None
                                                        else [])


class Fp8Linear(_RowScaledLinear):
    """e4m3 codes [N, K] with float32 per-row scales (fp8.Fp8Weight) and the bias in the
    model's dtype; called with gemm "scaled_mm" or "torchao" (fp8.GEMM_ROUTES)."""

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias=None, replaces=(), owned_bias=False) -> "Fp8Linear":
        return cls(fp8.Fp8Weight.quantize(weight), bias, replaces, owned_bias)

    def __call__(self, x, gemm="scaled_mm"):
        if gemm == "scaled_mm":
            return fp8.scaled_mm(x, self.weight, self.bias)
        if gemm == "torchao":
            return fp8.torchao_linear(x, self.weight, self.bias)
        raise ValueError(f"gemm={gemm!r}: an fp8 layer runs one of {fp8.GEMM_ROUTES}")


class Int8Linear(_RowScaledLinear):
    """int8 codes [N, K] with float32 per-row scales and an optional ConvRot group
    (int8.Int8Weight), the bias in the model's dtype; called with gemm "int_mm" or
    "int8-triton" (docs/int8.md)."""

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias=None, replaces=(), owned_bias=False) -> "Int8Linear":
        """Quantized per row, rotated first by the ConvRot group of its width where it has one."""
        return cls(int8.Int8Weight.quantize(weight, int8.convrot_group(weight.shape[1])), bias, replaces, owned_bias)

    def __call__(self, x, gemm="int_mm"):
        if gemm not in ("int_mm", "int8-triton"):
            raise ValueError(f"gemm={gemm!r}: an int8 layer runs one of ('int_mm', 'int8-triton')")
        return int8.linear(x, self.weight, self.bias, route="triton" if gemm == "int8-triton" else "int_mm")


class Mxfp8Linear(Linear):
    """An mxfp8 file's e4m3 codes and e8m0 block scales as stored (mxfp8.Mxfp8Weight), run
    on block-scaled fp8 tensor cores (compute capability 10.0 / 12.0) whatever the gemm
    route: the format has one GEMM."""

    def __init__(self, weight: mxfp8.Mxfp8Weight, bias: torch.Tensor | None = None, replaces: tuple = ()):
        self.weight, self.bias, self.replaces = weight, bias, tuple(replaces)

    def __call__(self, x, gemm="native"):
        return mxfp8.linear(x, self.weight, self.bias)

    @property
    def shape(self):
        return torch.Size(self.weight.shape)

    def owned_tensors(self):
        return [self.weight.data, self.weight.scale]


FORMATS = {"native": NativeLinear, "fp8": Fp8Linear, "int8": Int8Linear}


def prepare(fmt: str, weight: torch.Tensor, bias=None, owned: bool = False, replaces=()) -> Linear:
    """The layer of format `fmt` for `weight` (and `bias`). owned: FastPiD made `weight`
    itself (its own layout). replaces: the net's parameters the layer supersedes (for a
    format that copies the weight; a native view of the net's weight replaces nothing).
    A weight the format cannot hold (fp8: N or K not a multiple of 16) stays native; int8
    holds any."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: expected one of {tuple(FORMATS)}")
    if fmt == "fp8" and fp8.quantizable(weight):
        return Fp8Linear.quantize(weight, bias, replaces, owned_bias=owned)
    if fmt == "int8":
        return Int8Linear.quantize(weight, bias, replaces, owned_bias=owned)
    return NativeLinear(weight, bias, owned, () if fmt == "native" and not owned else
                        (replaces if owned else ()))


def from_stored(fmt: str, stored, dtype: torch.dtype, device, bias=None, replaces=(), owned: bool = False):
    """The layer of format `fmt` ("fp8" or "int8") over a file's quantized weight as stored
    (`stored`: an int8.Int8Weight, or the (codes, row scales) of an e4m3 weight), moved to
    `device`; no requantisation."""
    if fmt == "int8":
        return Int8Linear(stored.to(device), bias, replaces, owned_bias=owned)
    if fmt == "fp8":
        codes, scale = stored
        return Fp8Linear(fp8.Fp8Weight(codes.to(device).contiguous(), scale.to(device).contiguous(), dtype), bias,
                         replaces, owned_bias=owned)
    raise ValueError(f"format={fmt!r}: a stored weight runs as 'fp8' or 'int8'")
