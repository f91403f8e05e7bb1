"""The distilled sampler against a hand-written loop of SPEC §7."""
import numpy as np
import pytest
import torch

from pidkern.api import Decoder, random_net
from pidkern.config import tiny
from pidkern.sampler import make_generator, sample, schedule

SPEC_T = [0.999, 0.866, 0.634, 0.342, 0.0]


def spec_schedule(n):
    idx = np.round(np.linspace(0, 4, n + 1)).astype(int)
    times = [SPEC_T[i] for i in idx]
    if n == 1:
        times[0] = 1.0
    return times


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_schedule(n):
    got = schedule(n)
    assert got == spec_schedule(n)
    assert len(got) == n + 1 and got[-1] == 0.0


def test_schedule_examples():
    assert schedule(4) == SPEC_T
    assert schedule(1) == [1.0, 0.0]
    assert schedule(2) == [0.999, 0.634, 0.0]
    assert schedule(3) == [0.999, 0.866, 0.342, 0.0]


@pytest.mark.parametrize("bad", [0, 5, -1, 2.0, True, "4", None])
def test_schedule_rejects(bad):
    with pytest.raises(ValueError, match="steps"):
        schedule(bad)


class FakeNet:
    """A velocity that depends on x and t in a non-trivial way, and records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t):
        self.calls.append((x.clone(), t))
        xf = x.float()
        return (0.7 * xf + torch.sin(3 * xf) * t + 0.25).float()


def hand_loop(shape, seed, steps, ode=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    times = spec_schedule(steps)
    seen_t = []
    for t, t_next in zip(times[:-1], times[1:]):
        seen_t.append(t)
        v = FakeNet()(x.float(), t).double()
        if ode:
            x = x.double() + (t_next - t) * v
        else:
            x0 = x.double() - t * v
            if t_next > 0:
                eps = torch.randn(shape, generator=g, dtype=torch.float32)
                x = (1 - t_next) * x0 + t_next * eps.double()
            else:
                x = x0
        x = x.float()
    return x.clamp(-1, 1), seen_t, g.get_state()


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["sde", "ode"])
def test_sample_matches_hand_loop(steps, kind):
    shape = (2, 3, 5, 7)
    seed = 1234 + steps
    net = FakeNet()
    gen = torch.Generator().manual_seed(seed)
    got = sample(net, shape, steps=steps, sampler=kind, generator=gen, device="cpu")
    want, want_t, want_state = hand_loop(shape, seed, steps, ode=kind == "ode")
    assert got.dtype == torch.float32 and got.shape == shape
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    assert [t for _, t in net.calls] == want_t
    # exactly the SPEC's draws: initial noise + one eps per re-noising step (none for ODE)
    assert torch.equal(gen.get_state(), want_state)
    assert got.min() >= -1 and got.max() <= 1
    assert (got.abs() == 1).any()    # the clamp was reached, so it was exercised


def test_one_step_uses_t_one():
    net = FakeNet()
    gen = torch.Generator().manual_seed(7)
    got = sample(net, (1, 3, 4, 4), steps=1, generator=gen, device="cpu")
    assert [t for _, t in net.calls] == [1.0]
    x = net.calls[0][0]
    v = FakeNet()(x, 1.0)
    torch.testing.assert_close(got, (x.double() - v.double()).clamp(-1, 1).float(), rtol=0, atol=1e-6)


def test_first_call_sees_the_initial_noise():
    net = FakeNet()
    sample(net, (2, 3, 4, 6), steps=4, generator=torch.Generator().manual_seed(99), device="cpu")
    first = torch.randn((2, 3, 4, 6), generator=torch.Generator().manual_seed(99), dtype=torch.float32)
    assert torch.equal(net.calls[0][0], first)


def test_sampler_name_checked():
    with pytest.raises(ValueError, match="sampler"):
        sample(FakeNet(), (1, 3, 2, 2), sampler="euler", generator=torch.Generator(), device="cpu")


def test_make_generator():
    a = torch.randn(5, generator=make_generator(11, torch.device("cpu")))
    b = torch.randn(5, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a, b)
    for bad in (1.5, "3", True):
        with pytest.raises(TypeError, match="seed"):
            make_generator(bad, torch.device("cpu"))


def tiny_decoder():
    cfg = tiny("flux-2k")
    return Decoder(random_net(cfg, torch.device("cpu"), torch.float32, seed=3), torch.device("cpu"),
                   torch.float32, "test"), cfg


def test_decode_seed_determinism():
    dec, cfg = tiny_decoder()
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(2, cfg.latent_channels, 1, 2, generator=g)
    text = torch.randn(2, 5, cfg.text_dim, generator=g)
    a = dec.decode(latent, 0.2, text=text, seed=42)
    b = dec.decode(latent, 0.2, text=text, seed=42)
    c = dec.decode(latent, 0.2, text=text, seed=43)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_decode_is_the_spec_loop_around_the_net():
    """Decoder.decode = SPEC §7 with the net as velocity, the seed's own noise stream."""
    dec, cfg = tiny_decoder()
    g = torch.Generator().manual_seed(1)
    b = 2
    latent = torch.randn(b, cfg.latent_channels, 2, 1, generator=g)
    text = torch.randn(b, 4, cfg.text_dim, generator=g)
    sigma = torch.tensor([0.0, 0.5])
    got = dec.decode(latent, sigma, text=text, seed=5, steps=3)
    H, W = cfg.output_size(2, 1)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(b, 3, H, W, generator=gen, dtype=torch.float32)
    times = spec_schedule(3)
    with torch.no_grad():
        for t, t_next in zip(times[:-1], times[1:]):
            v = dec.net(x, torch.full((b,), t), text, latent, sigma).double()
            x0 = x.double() - t * v
            if t_next > 0:
                x = ((1 - t_next) * x0 + t_next * torch.randn(x.shape, generator=gen).double()).float()
            else:
                x = x0.float()
    torch.testing.assert_close(got, x.clamp(-1, 1), rtol=0, atol=1e-5)
