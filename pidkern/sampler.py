"""The release's two samplers (docs/design.md, "The sampler"; docs/samplers.md).

"sde" / "ode": the distilled few-step sampler of the ten 4-step checkpoints.
"dpm++": DPM-Solver++ with classifier-free guidance on the caption, the sampler of the
undistilled teachers (the bottom of this file).

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

import math
from dataclasses import dataclass
from typing import Callable

import torch

T_LIST = (0.999, 0.866, 0.634, 0.342, 0.0)
DPM = "dpm++"
SAMPLERS = ("sde", "ode", DPM)
DISTILLED_SAMPLERS = ("sde", "ode")
MAX_DPM_STEPS = 100
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
    if sampler != "sde":     # the ODE and DPM-Solver++ draw only the initial noise
        return 0
    return sum(1 for t in schedule(steps)[1:] if t > 0)


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
           progress=None, band_rows: int | None = None) -> torch.Tensor:
    """Run the sampler; `velocity(x, t)` is the network at time t. Returns float32 in [-1, 1].

    Noise: `generator` (the release's stream) or `draw(k, shape)` (release_draws,
    _ext.philox_draws): k = 0 is the initial noise, k = 1, 2, ... the re-noising eps in order.
    band_rows: update x in place, this many image rows at a time (the same numbers: the
    update is elementwise), so a large canvas's float64 temporaries stay one band's."""
    if sampler not in DISTILLED_SAMPLERS:
        raise ValueError(f"sampler={sampler!r}: expected one of {DISTILLED_SAMPLERS} (sample_dpm runs {DPM!r})")
    if (generator is None) == (draw is None):
        raise ValueError("sample: give exactly one of generator= and draw=")
    if draw is None:
        def draw(k, shp):
            return torch.randn(shp, generator=generator, device=device, dtype=torch.float32)
    times = schedule(steps)
    x = draw(0, shape)
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        v = velocity(x, t)
        eps = draw(i + 1, shape) if sampler == "sde" and t_next > 0 else None
        if band_rows is None:
            x = ode_update(x, v, t, t_next) if sampler == "ode" else sde_update(x, v, t, t_next, eps)
        else:
            for r in range(0, x.shape[-2], band_rows):
                rows = slice(r, r + band_rows)
                x[..., rows, :] = (ode_update(x[..., rows, :], v[..., rows, :], t, t_next) if sampler == "ode" else
                                   sde_update(x[..., rows, :], v[..., rows, :], t, t_next,
                                              None if eps is None else eps[..., rows, :]))
        del v, eps
        if progress:
            progress(i + 1, steps)
    return x.clamp(-1, 1)


# -- DPM-Solver++ (the undistilled checkpoints' sampler) ------------------------------------
#
# The release's `generate_samples_from_batch` of its teacher model (docs/samplers.md has
# every value and where it comes from): DPM-Solver++ multistep of order min(steps, 2),
# lower order at the last step, on the flow schedule alpha_t = 1 - t, sigma_t = t, with
# the network's output read as a velocity. Timesteps: linspace(1, 1/1000, steps+1) mapped
# by the flow shift s -> shift*s / (1 + (shift-1)*s) of s = 1 - t, reversed, so they run
# from just below 1 to exactly 0. Everything after the network is float32 in the release
# (its 0-d timestep tensors and its float32 noise); the functions below do the same
# operations in the same order, so the same device gives the same numbers.

T_END = 0.001        # the release's t_0 = 1 / total_N with total_N = 1000


@dataclass(frozen=True)
class Guidance:
    """The checked DPM-Solver++ inputs of a decode: the guidance scale, the resolved flow
    shift, and the unconditional caption embeddings [B, T, 2304] (None when cfg = 1)."""
    cfg: float
    shift: float
    negative: torch.Tensor | None = None


def check_dpm_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_DPM_STEPS:
        raise ValueError(f"steps={steps!r}: expected an integer from 1 to {MAX_DPM_STEPS} (sampler={DPM!r})")
    return steps


def check_cfg(cfg) -> float:
    """The guidance scale as a float >= 1 (1 = no guidance)."""
    if isinstance(cfg, bool) or not isinstance(cfg, (int, float)):
        raise ValueError(f"cfg={cfg!r}: expected a number >= 1 (1 = no guidance)")
    cfg = float(cfg)
    if not math.isfinite(cfg) or cfg < 1:
        raise ValueError(f"cfg={cfg!r}: expected a finite number >= 1 (1 = no guidance)")
    return cfg


def check_shift(shift):
    """None (the checkpoint's rule) or a finite flow shift > 0."""
    if shift is None:
        return None
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift={shift!r}: expected None (the checkpoint's rule) or a finite number > 0")
    return float(shift)


def dynamic_shift(base_shift: float, base_size: int, h: int, w: int) -> float:
    """The release's resolution-dependent shift: base_shift * sqrt(sqrt(H*W) / base_size), in
    float64 on the host as the release computes it (H, W: the output image's size)."""
    return base_shift * math.sqrt(math.sqrt(h * w) / base_size)


def dpm_times(steps: int, shift: float, device, dtype=torch.float32) -> torch.Tensor:
    """The steps+1 times of a DPM-Solver++ decode on `device`, from just below 1 to 0.
    The linspace runs on the CPU and the rest on `device`, as in the release (float32)."""
    check_dpm_steps(steps)
    if isinstance(shift, bool) or not isinstance(shift, (int, float)):
        raise TypeError(f"shift={shift!r}: expected a number (resolve None with the checkpoint's rule first)")
    betas = torch.linspace(1, T_END, steps + 1, dtype=dtype).to(device)
    s = 1.0 - betas
    return (shift * s / (1 + (shift - 1) * s)).flip(dims=[0])


def dpm_orders(steps: int) -> tuple[int, ...]:
    """The order of each of the `steps` updates: first order to start (no history yet) and
    at the last step (the release's lower_order_final), second order in between."""
    check_dpm_steps(steps)
    return tuple(1 if i in (1, steps) else 2 for i in range(1, steps + 1))


def _half_log_snr(t: torch.Tensor) -> torch.Tensor:
    return torch.log(1 - t) - torch.log(t)     # log(alpha_t) - log(sigma_t); +inf at t = 0


def dpm_coefficients(times: torch.Tensor, i: int, order: int) -> tuple:
    """0-d float32 coefficients of update i (times[i-1] -> times[i]) of `order`:
    (a, b) for x = a*x - b*m0, or (a, b, c, half_b) for
    x = a*x - b*m0 - half_b * (c * (m0 - m1)), m0 and m1 the data predictions at
    times[i-1] and times[i-2]. Computed on the times' device, in the release's order."""
    t, s = times[i], times[i - 1]
    lam_t, lam_s = _half_log_snr(t), _half_log_snr(s)
    h = lam_t - lam_s
    alpha_t = torch.exp(torch.log(1 - t))
    b = alpha_t * torch.expm1(-h)
    a = t / s
    if order == 1:
        return a, b
    if order != 2:
        raise ValueError(f"order={order!r}: expected 1 or 2")
    h_0 = lam_s - _half_log_snr(times[i - 2])
    r0 = h_0 / h
    return a, b, 1.0 / r0, 0.5 * b


def dpm_update(x: torch.Tensor, m0: torch.Tensor, m1, coef: tuple) -> torch.Tensor:
    """One multistep DPM-Solver++ update with the coefficients of `dpm_coefficients`."""
    if len(coef) == 2:
        a, b = coef
        return a * x - b * m0
    a, b, c, half_b = coef
    d = c * (m0 - m1)
    return a * x - b * m0 - half_b * d


def dpm_guided(t: float, cfg: float) -> bool:
    """Whether the step at time t runs the unconditional half: guidance on, t strictly inside
    the release's guidance interval (0, 1)."""
    return cfg != 1.0 and 0.0 < t < 1.0


def dpm_x0(x: torch.Tensor, t: torch.Tensor, v_cond: torch.Tensor, v_uncond, cfg: float) -> torch.Tensor:
    """The data prediction at time t (a 0-d tensor) from the network's velocities.

    As the release: each velocity becomes the noise (1 - t) v + x in x's dtype (float32),
    the guided noise is uncond + cfg * (cond - uncond), and x0 = (x - t * noise) / (1 - t).
    (Near t = 1 this loses digits: 1 - t is ~1e-3 there; the release's images carry it.)"""
    noise = (1 - t) * v_cond.to(x.dtype) + x
    if v_uncond is not None:
        noise_u = (1 - t) * v_uncond.to(x.dtype) + x
        noise = noise_u + cfg * (noise - noise_u)
    return (x - t * noise) / (1 - t)


@dataclass(frozen=True)
class DpmSchedule:
    """A DPM-Solver++ decode's fixed parts, made before it runs (a CUDA graph captures the
    loop around them): the times on the device and on the host (the same float32 values),
    which steps run the unconditional half, the order of each update, the guidance scale."""
    times: torch.Tensor
    host_times: tuple[float, ...]
    guided: tuple[bool, ...]
    orders: tuple[int, ...]
    cfg: float

    @property
    def steps(self) -> int:
        return len(self.orders)


def dpm_schedule(steps: int, cfg: float, shift: float, device, dtype=torch.float32) -> DpmSchedule:
    """dtype: the solver's arithmetic; float32 is the release's, float64 checks the algorithm."""
    steps = check_dpm_steps(steps)
    cfg = check_cfg(cfg)
    times = dpm_times(steps, shift, device, dtype)
    host = tuple(times.tolist())
    return DpmSchedule(times, host, tuple(dpm_guided(t, cfg) for t in host[:steps]), dpm_orders(steps), cfg)


def sample_dpm(velocity: Callable, shape, schedule: DpmSchedule, draw, progress=None) -> torch.Tensor:
    """DPM-Solver++ with caption guidance; returns the schedule's dtype (the release: float32)
    in [-1, 1].

    velocity(x, i, guided) -> (v_cond, v_uncond): the network at time schedule.times[i]
        (host_times[i] on the host; the network takes it expanded to the batch), v_uncond
        None unless `guided`.
    draw(0, shape): the initial noise (release_draws, _ext.philox_draws); nothing else is drawn.
    Nothing here reads the device back, so a CUDA graph can capture it."""
    times, cfg, steps = schedule.times, schedule.cfg, schedule.steps

    def data(x, i):
        guided = schedule.guided[i]
        v_cond, v_uncond = velocity(x, i, guided)
        return dpm_x0(x, times[i], v_cond, v_uncond if guided else None, cfg)

    x = draw(0, shape).to(times.dtype)
    m0, m1 = data(x, 0), None
    for i, order in enumerate(schedule.orders, start=1):
        x = dpm_update(x, m0, m1, dpm_coefficients(times, i, order))
        if i < steps:            # the last update needs no new prediction
            m0, m1 = data(x, i), m0
        if progress:
            progress(i, steps)
    return x.clamp(-1, 1)
