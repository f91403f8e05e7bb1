"""DPM-Solver++ with caption guidance (sampler="dpm++") against an independent float64
transcription of DPM-Solver++(2M) on the flow schedule (Lu et al. 2022, Algorithm 2, with
the data prediction x0 = x - t v of a velocity network), written here from the math."""
import math

import numpy as np
import pytest
import torch

from pidkern.sampler import (check_cfg, check_dpm_steps, dpm_orders, dpm_schedule, dpm_times, dynamic_shift,
                             release_draws, sample_dpm)


def ref_times(steps, shift):
    """linspace(1, 1/1000) of s = 1 - t, shifted s -> shift s / (1 + (shift - 1) s), reversed."""
    s = 1.0 - np.linspace(1.0, 0.001, steps + 1)
    return (shift * s / (1.0 + (shift - 1.0) * s))[::-1].copy()


def fake_velocity(x, t, cond):
    """A smooth velocity that depends on x, t and a per-sample caption value."""
    return 0.6 * x + torch.sin(2.0 * x + cond) * (0.3 + t) - 0.2 * cond * t


def ref_sample(x, steps, cfg, shift, velocity, times=None):
    """float64 DPM-Solver++(2M): first order at the first and the last step.
    velocity(x, t, cond) -> v: the network with the caption (cond=True) or without."""
    x = x.double()
    ts = ref_times(steps, shift) if times is None else times

    def x0(x, t):
        v = velocity(x, t, True)
        if cfg != 1.0:
            vu = velocity(x, t, False)
            v = vu + cfg * (v - vu)
        return x - t * v

    def lam(t):
        return math.log((1 - t) / t)

    hist = [x0(x, ts[0])]
    for i in range(1, steps + 1):
        s, t = ts[i - 1], ts[i]
        if t == 0.0:                 # sigma_t = 0: the step lands on the prediction itself
            x = hist[-1]
        else:
            h = lam(t) - lam(s)
            d = hist[-1]
            if 1 < i < steps:        # second order: the previous prediction gives the slope
                r = (lam(s) - lam(ts[i - 2])) / h
                d = hist[-1] + (hist[-1] - hist[-2]) / (2 * r)
            x = (t / s) * x + (1 - t) * (1 - math.exp(-h)) * d
        if i < steps:
            hist.append(x0(x, ts[i]))
    return x.clamp(-1, 1)


def rel_l2(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


class Velocity:
    """sample_dpm's velocity(x, i, guided) around fake_velocity; counts calls and batches."""

    def __init__(self, cond, uncond, schedule):
        self.cond, self.uncond, self.schedule, self.calls = cond, uncond, schedule, []

    def __call__(self, x, i, guided):
        assert x.dtype == self.schedule.times.dtype
        self.calls.append((x.shape[0], guided))
        tf = self.schedule.host_times[i]
        assert tf == float(self.schedule.times[i])
        vu = fake_velocity(x, tf, self.uncond) if guided else None
        return fake_velocity(x, tf, self.cond), vu


CASES = [(steps, cfg, shift) for steps in (1, 2, 7, 25) for cfg in (1.0, 4.5) for shift in ("explicit", "dynamic")]


def run_case(steps, cfg, shift, dtype):
    b, h, w = 2, 6, 10
    shift = 3.0 if shift == "explicit" else dynamic_shift(6.0, 2048, 3840, 2160)
    cond = torch.tensor([0.3, -0.7], dtype=dtype).view(b, 1, 1, 1)
    uncond = torch.tensor([-0.4, 0.2], dtype=dtype).view(b, 1, 1, 1)
    sched = dpm_schedule(steps, cfg, shift, "cpu", dtype)
    vel = Velocity(cond, uncond, sched)
    got = sample_dpm(vel, (b, 3, h, w), sched, release_draws(11, "cpu"))
    x = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(11))
    c64, u64 = cond.double(), uncond.double()
    want = ref_sample(x, steps, cfg, shift, lambda x, t, c: fake_velocity(x, t, c64 if c else u64))
    assert got.dtype == dtype and got.shape == (b, 3, h, w)
    assert len(vel.calls) == steps                      # one prediction per step, none after the last
    assert all(g == (cfg != 1.0) for _, g in vel.calls)  # cfg = 1: no unconditional half at all
    assert (got.abs() < 1).any()
    return got, want, shift


@pytest.mark.parametrize("steps,cfg,shift", CASES)
def test_matches_float64_transcription(steps, cfg, shift):
    """The algorithm itself (times, orders, updates, guidance) in float64 arithmetic."""
    got, want, _ = run_case(steps, cfg, shift, torch.float64)
    assert rel_l2(got, want) <= 1e-6


@pytest.mark.parametrize("steps,cfg,shift", CASES)
def test_release_float32_error_is_its_first_step_rounding(steps, cfg, shift):
    """In the release's float32 the first prediction x0 = (x - t noise) / (1 - t) is taken at
    t0 just below 1: float32 rounding of x and t*noise, divided by 1 - t0 ~ 1e-4, is the
    whole difference from exact arithmetic (about one ulp / (1 - t0), less after more steps)."""
    got, want, shift = run_case(steps, cfg, shift, torch.float32)
    t0 = float(dpm_times(steps, shift, "cpu")[0])
    assert rel_l2(got, want) <= 2 * torch.finfo(torch.float32).eps / (1 - t0)


def test_dynamic_shift_rule():
    assert dynamic_shift(6.0, 2048, 2048, 2048) == 6.0
    assert dynamic_shift(6.0, 2048, 4096, 4096) == pytest.approx(6.0 * math.sqrt(2.0), rel=1e-15)
    assert dynamic_shift(4.0, 1024, 3840, 2160) == pytest.approx(4.0 * math.sqrt(math.sqrt(3840 * 2160) / 1024))


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (7, 6.0), (25, 8.485)])
def test_times(steps, shift):
    got = dpm_times(steps, shift, "cpu")
    assert got.dtype == torch.float32 and got.shape == (steps + 1,)
    # float32 times: 1 - linspace(...) rounds at the scale of 1 (absolute), the shift map relatively
    np.testing.assert_allclose(got.double().numpy(), ref_times(steps, shift), rtol=3e-7, atol=2.5e-7)
    assert float(got[-1]) == 0.0 and 0 < float(got[0]) < 1


def test_orders():
    assert dpm_orders(1) == (1,)
    assert dpm_orders(2) == (1, 1)
    assert dpm_orders(5) == (1, 2, 2, 2, 1)


@pytest.mark.parametrize("bad", [0, 101, -3, 2.0, True, None, "25"])
def test_steps_rejected(bad):
    with pytest.raises(ValueError, match="steps"):
        check_dpm_steps(bad)


@pytest.mark.parametrize("bad", [0.99, 0, -2, float("nan"), float("inf"), True, "3", None])
def test_cfg_rejected(bad):
    with pytest.raises(ValueError, match="cfg"):
        check_cfg(bad)
