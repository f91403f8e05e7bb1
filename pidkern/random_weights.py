"""Random weights for benchmarks and tests: a full-size network in seconds, not minutes."""
from __future__ import annotations

import math

import torch

from .config import PiDConfig
from .reference import PiDNet


@torch.no_grad()
def fill_random_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values quickly, in place.

    nn.init on a 1.35B-parameter model takes ~20 s on a CPU; copying a 1M-number Gaussian
    pool (rotated per tensor) into each weight is memory-bound. Matrices are scaled by
    1/sqrt(fan_in) so activations stay O(1); 1-D norm weights are 1, other vectors 0.02.
    The values only have to be finite and unstructured enough for timing.
    """
    params = list(module.named_parameters())
    if not params or params[0][1].device.type == "meta":
        return module
    dev = params[0][1].device
    gen = torch.Generator(device=dev).manual_seed(seed)
    pool = torch.randn(1 << 20, generator=gen, device=dev, dtype=torch.float32)
    for i, (name, p) in enumerate(params):
        flat = p.view(-1)
        if p.dim() >= 2:
            src = pool * (1.0 / math.sqrt(p[0].numel()))
        elif "norm" in name.lower() and name.endswith("weight"):
            flat.fill_(1.0)
            continue
        else:
            src = pool * 0.02
        src = torch.roll(src, (i * 7919) % pool.numel()).to(p.dtype)
        k, n = src.numel(), flat.numel()
        for start in range(0, n, k):
            m = min(k, n - start)
            flat[start:start + m].copy_(src[:m])
    return module


def random_net(cfg: PiDConfig, device, dtype: torch.dtype, seed: int = 0) -> PiDNet:
    """A PiDNet with random weights allocated straight in `dtype` on `device` (no nn.init
    pass: 1.35 B parameters would take ~20 s on a CPU)."""
    with torch.device("meta"):
        net = PiDNet(cfg)
    net = net.to(dtype).to_empty(device=torch.device(device))
    return fill_random_(net, seed).eval().requires_grad_(False)
