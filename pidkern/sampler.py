"""The distilled few-step sampler of the release (docs/design.md, "The sampler").

`t` runs from 0.999 (pure noise) to 0 (the image). The SDE sampler re-noises the clean
estimate x0 with fresh Gaussian noise at every intermediate time; the ODE sampler takes
an Euler step along the velocity instead. Seeds follow the release: one generator,
seeded once, draws the initial noise and then one eps per re-noising step, in order.

Two noise streams (`noise=`): "release" is that torch.Generator stream, the release's
exact numbers; "philox" is the output-stage extension's counter-based stream, draw k
being Philox(seed, step=k), which the fast engine generates inside its CUDA graph (no
noise buffers, no host work for a new seed). The two give different images for one seed.
"""
from __future__ import annotations

from typing import Callable

import torch

T_LIST = (0.999, 0.866, 0.634, 0.342, 0.0)
SAMPLERS = ("sde", "ode")
NOISE_STREAMS = ("release", "philox")


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


def resolve_seed(seed: int | None) -> int:
    """The seed as an int; None draws one from torch's global RNG."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed={seed!r}: expected an int or None")
    return seed


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator on the decode device; seed=None draws a seed from torch's global RNG."""
    return torch.Generator(device=device).manual_seed(resolve_seed(seed))


def check_noise(noise: str) -> str:
    if noise not in NOISE_STREAMS:
        raise ValueError(f"noise={noise!r}: expected one of {NOISE_STREAMS}")
    return noise


def seed_int64(seed: int | None) -> int:
    """The seed as the int64 the Philox stream keys on: None draws one (as make_generator
    does); values in [2**63, 2**64) wrap to negative, as torch.Generator accepts them."""
    seed = resolve_seed(seed)
    if not -2**63 <= seed < 2**64:
        raise ValueError(f"seed={seed}: expected a value in [-2**63, 2**64)")
    return seed - 2**64 if seed >= 2**63 else seed


def philox_key(seed: int | None, device) -> torch.Tensor:
    """The 0-d int64 device tensor the extension's Philox stream is keyed by."""
    return torch.tensor(seed_int64(seed), dtype=torch.int64, device=device)


def release_draws(seed: int | None, device) -> Callable[..., torch.Tensor]:
    """draw(k, shape, out=None): the release's stream; draws must be taken in order
    k = 0, 1, ... (`out`: a float32 buffer to draw into, e.g. a CUDA graph's input)."""
    gen = make_generator(seed, device)

    def draw(k, shape, out=None):
        if out is not None:
            return torch.randn(shape, generator=gen, out=out)
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    return draw


def renoise_count(steps: int, sampler: str) -> int:
    """How many eps a decode draws after the initial noise (one per re-noising step)."""
    return sum(1 for t in schedule(steps)[1:] if t > 0) if sampler == "sde" else 0


def ode_update(x: torch.Tensor, v: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """The ODE sampler's Euler step x + (t' - t) v, in float64 as the release does."""
    return (x.double() + (t_next - t) * v.double()).float()


def sde_update(x: torch.Tensor, v: torch.Tensor, t, t_next, eps: torch.Tensor | None) -> torch.Tensor:
    """The SDE sampler's step: x0 = x - t v, re-noised to t' with eps (x0 itself at t' = 0).

    t, t_next: Python floats, or 0-d float64 tensors (then no host branch on t_next, so the
    step can sit in a CUDA graph; eps must be given)."""
    x0 = x.double() - t * v.double()   # float64, as the release does
    if torch.is_tensor(t_next):
        return torch.where(t_next == 0, x0, (1 - t_next) * x0 + t_next * eps.double()).float()
    return ((1 - t_next) * x0 + t_next * eps.double()).float() if t_next > 0 else x0.float()


def sample(velocity: Callable[[torch.Tensor, float], torch.Tensor], shape, *, steps: int = 4,
           sampler: str = "sde", generator: torch.Generator | None = None, draw=None, device,
           progress=None) -> torch.Tensor:
    """Run the sampler; `velocity(x, t)` is the network at time t. Returns float32 in [-1, 1].

    Noise: `generator` (the release's stream) or `draw(k, shape)` (release_draws,
    _ext.philox_draws): k = 0 is the initial noise, k = 1, 2, ... the re-noising eps in order."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}: expected one of {SAMPLERS}")
    if (generator is None) == (draw is None):
        raise ValueError("sample: give exactly one of generator= and draw=")
    if draw is None:
        def draw(k, shp):
            return torch.randn(shp, generator=generator, device=device, dtype=torch.float32)
    times = schedule(steps)
    x = draw(0, shape)
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        v = velocity(x, t)
        if sampler == "ode":
            x = ode_update(x, v, t, t_next)
        else:
            x = sde_update(x, v, t, t_next, draw(i + 1, shape) if t_next > 0 else None)
        if progress:
            progress(i + 1, steps)
    return x.clamp(-1, 1)
