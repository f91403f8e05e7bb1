"""The kernel tolerance rule (flash-attention's): a fused kernel's error against a
float64 reference may be at most twice PyTorch's own error in the same precision,
plus rounding noise of the output dtype."""
from __future__ import annotations

import torch

NOISE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item()


def assert_within_rule(out: torch.Tensor, torch_out: torch.Tensor, ref64: torch.Tensor, what: str = ""):
    """out: the kernel's result; torch_out: PyTorch's result in the same precision;
    ref64: the same math in float64."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{what}: output has NaN/Inf (unwritten elements?)"
    scale = ref64.abs().max().item() or 1.0
    allowed = 2 * max_err(torch_out, ref64) + NOISE[out.dtype] * scale
    got = max_err(out, ref64)
    assert got <= allowed, f"{what}: max error {got:.3e} > allowed {allowed:.3e} (torch's own {max_err(torch_out, ref64):.3e})"


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN so unwritten elements show."""
    return t.fill_(float("nan"))
