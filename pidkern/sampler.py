"""The distilled few-step sampler of the release (SPEC §7).

`t` runs from 0.999 (pure noise) to 0 (the image). The SDE sampler re-noises the clean
estimate x0 with fresh Gaussian noise at every intermediate time; the ODE sampler takes
an Euler step along the velocity instead. Seeds follow the release: one generator,
seeded once, draws the initial noise and then one eps per re-noising step, in order.
"""
from __future__ import annotations

from typing import Callable

import torch

T_LIST = (0.999, 0.866, 0.634, 0.342, 0.0)
SAMPLERS = ("sde", "ode")


def schedule(steps: int) -> list[float]:
    """The `steps + 1` times of a decode: t_list[round(linspace(0, 4, n+1))], t=1.0 for one step."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 4:
        raise ValueError(f"steps={steps!r}: expected an integer from 1 to 4 (the distilled schedule)")
    last = len(T_LIST) - 1
    # round half to even, as torch/numpy round do; linspace(0, 4, n+1) never lands on .5
    idx = [round(last * i / steps) for i in range(steps + 1)]
    times = [T_LIST[i] for i in idx]
    if steps == 1:
        times[0] = 1.0
    return times


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator on the decode device; seed=None draws a seed from torch's global RNG."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed={seed!r}: expected an int or None")
    return torch.Generator(device=device).manual_seed(seed)


def sample(velocity: Callable[[torch.Tensor, float], torch.Tensor], shape, *, steps: int = 4,
           sampler: str = "sde", generator: torch.Generator, device, progress=None) -> torch.Tensor:
    """Run the sampler; `velocity(x, t)` is the network at time t. Returns float32 in [-1, 1]."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}: expected one of {SAMPLERS}")
    times = schedule(steps)
    x = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        v = velocity(x, t)
        if sampler == "ode":
            x = (x.double() + (t_next - t) * v.double()).float()
        else:
            x0 = x.double() - t * v.double()   # float64, as the release does
            if t_next > 0:
                eps = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
                x = ((1 - t_next) * x0 + t_next * eps.double()).float()
            else:
                x = x0.float()
        if progress:
            progress(i + 1, steps)
    return x.clamp(-1, 1)
