"""Prepared linear layers: each weight format is a class that owns its tensors and its GEMM.

FastPiD holds one of these for every Linear it runs (pidkern.fast). A layer is called
with the plan's GEMM route, `layer(x, gemm)`, and answers what it keeps on the device
(`owned_tensors`: the tensors it made itself; a view of the network's own weight is the
net's) and which of the network's parameters it made unread (`replaces`: the Decoder may
park those, pidkern.parking; the memory model counts what stays, pidkern.memory).

Formats: `NativeLinear` (the weight in the model's dtype, read by the fused GEMM
kernels too: `weight16`), `Fp8Linear` (e4m3 codes with per-row scales, pidkern.fp8). A
new format (int8 per token, a file's own scales, mxfp8) is a new subclass with the same
four members, and an entry in `FORMATS`; `prepare` picks the class for a weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import fp8


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


class Fp8Linear(Linear):
    """e4m3 codes [N, K] with float32 per-row scales (fp8.Fp8Weight) and the bias in the
    model's dtype; called with gemm "scaled_mm" or "torchao" (fp8.GEMM_ROUTES)."""

    def __init__(self, weight: fp8.Fp8Weight, bias: torch.Tensor | None = None, replaces: tuple = (),
                 owned_bias: bool = False):
        self.weight, self.bias, self.replaces, self.owned_bias = weight, bias, tuple(replaces), owned_bias

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias=None, replaces=(), owned_bias=False) -> "Fp8Linear":
        return cls(fp8.Fp8Weight.quantize(weight), bias, replaces, owned_bias)

    def __call__(self, x, gemm="scaled_mm"):
        if gemm == "scaled_mm":
            return fp8.scaled_mm(x, self.weight, self.bias)
        if gemm == "torchao":
            return fp8.torchao_linear(x, self.weight, self.bias)
        raise ValueError(f"gemm={gemm!r}: an fp8 layer runs one of {fp8.GEMM_ROUTES}")

    @property
    def shape(self):
        return self.weight.shape

    def owned_tensors(self):
        return [self.weight.data, self.weight.scale] + ([self.bias] if self.owned_bias and self.bias is not None
                                                        else [])


FORMATS = {"native": NativeLinear, "fp8": Fp8Linear}


def prepare(fmt: str, weight: torch.Tensor, bias=None, owned: bool = False, replaces=()) -> Linear:
    """The layer of format `fmt` for `weight` (and `bias`). owned: FastPiD made `weight`
    itself (its own layout). replaces: the net's parameters the layer supersedes (for a
    format that copies the weight; a native view of the net's weight replaces nothing).
    A weight the format cannot hold (fp8: N or K not a multiple of 16) stays native."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: expected one of {tuple(FORMATS)}")
    if fmt == "fp8" and fp8.quantizable(weight):
        return Fp8Linear.quantize(weight, bias, replaces, owned_bias=owned)
    return NativeLinear(weight, bias, owned, () if fmt == "native" and not owned else
                        (replaces if owned else ()))
