"""The fused output stage (pidkern._C) vs the released PyTorch chain, bf16 tokens, batch 1,
2048^2 and 4096^2, patch 16.

Cases: explicit noise (the release's torch.Generator stream passed in), in-kernel Philox
noise (the chain then draws torch.randn, as the release does), and the last step with the
uint8 image. bytes = tokens + x_t (+ noise) read + x_next (+ uint8 image) written.
A device-copy case of the explicit-noise byte count gives the bandwidth ceiling in the
same run: the bar is fused GB/s >= 80% of it, and >= 5x the chain.
"""
from __future__ import annotations

import torch

from bench.kernels import Case
from pidkern import _ext

SIZES = (2048, 4096)
P = 16


def cases(device: str) -> list[Case]:
    if not _ext.HAS_EXT or device != "cuda":
        print("output_stage: needs pidkern._C and a CUDA device; no cases")
        return []
    g = torch.Generator(device=device).manual_seed(0)
    return [c for S in SIZES for c in _cases_at(S, device, g)]


def _cases_at(S: int, device: str, g: torch.Generator) -> list[Case]:
    """One size's cases; a function of its own so every closure binds this size's tensors."""
    ops = torch.ops.pidkern
    B, H, W = 1, S, S
    L = (H // P) * (W // P)
    r = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    tokens = (r(B * L, P * P, 16) * 1.5).to(torch.bfloat16)
    nw, lw, lb = (1 + 0.2 * r(16)).bfloat16(), (0.3 * r(3, 16)).bfloat16(), (0.1 * r(3)).bfloat16()
    x_t, noise = r(B, 3, H, W), r(B, 3, H, W)
    t, tn = torch.tensor(0.866, device=device), torch.tensor(0.634, device=device)
    seed, step = torch.tensor(1, device=device), torch.tensor(2, device=device)
    img = 3 * H * W * 4
    tok = tokens.numel() * tokens.element_size()
    tag = f"{S}x{S} bf16 B=1"

    def chain(eps):
        return _ext.reference_output_step(tokens, nw, lw, lb, x_t, t, tn, eps, P)

    n = (tok + 3 * img) // 8  # float32 elements: the copy moves the explicit case's bytes
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    return [
        Case(f"output_stage/step-explicit-{S}",
             lambda: ops.pixel_output_step(tokens, nw, lw, lb, x_t, t, tn, noise, None, None, P, 1e-6),
             lambda: chain(noise), bytes=tok + 3 * img, note=tag + ", explicit noise"),
        Case(f"output_stage/step-philox-{S}",
             lambda: ops.pixel_output_step(tokens, nw, lw, lb, x_t, t, tn, None, seed, step, P, 1e-6),
             lambda: chain(torch.randn(x_t.shape, device=device)),
             bytes=tok + 2 * img, note=tag + ", in-kernel Philox vs chain + torch.randn"),
        Case(f"output_stage/final-u8-{S}",
             lambda: ops.pixel_output_final(tokens, nw, lw, lb, x_t, t, P, 1e-6),
             lambda: _ext.reference_output_final(tokens, nw, lw, lb, x_t, t, P),
             bytes=tok + 2 * img + img // 4, note=tag + ", last step + uint8 HWC image"),
        Case(f"output_stage/device-copy-{S}", lambda: dst.copy_(src), lambda: dst.copy_(src), bytes=2 * n * 4,
             note="bandwidth ceiling: read + write as many bytes as the explicit case"),
    ]
