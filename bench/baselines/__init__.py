"""Cost models of the cascade decoders PiD is compared with: random weights, faithful shapes.

These are NOT the published models and say nothing about image quality. Their layer
shapes follow the published architectures, so their latency, memory and FLOPs on a card
are what the real models would cost there. Each module builds a network and a callable;
`count_flops` runs the same call on the meta device under FlopCounterMode.
"""
from __future__ import annotations

import torch

from pidkern.flops import flop_counter


def fill_random_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights quickly: a pool of Gaussian numbers copied into every weight.

    Weights are scaled by 1/sqrt(fan_in) so activations stay O(1) (finite outputs);
    norm scales are 1. Initialising a 3B-parameter model with nn.init takes tens of
    seconds on a CPU; a strided copy is memory-bound and takes well under one.
    """
    from pidkern.benchmark import fill_random_ as fill
    return fill(module, seed)


def count_flops(build, make_inputs, **kwargs) -> float:
    """FLOPs of `build(**kwargs)(*make_inputs('meta'))` counted on the meta device (no memory, no time)."""
    with torch.device("meta"):
        net = build(**kwargs)
        inputs = make_inputs("meta")
    with flop_counter() as fc, torch.no_grad():
        net(*inputs)
    return float(fc.get_total_flops())
