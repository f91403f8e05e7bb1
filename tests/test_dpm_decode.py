"""Decoder.decode(sampler="dpm++"): the network inside DPM-Solver++ with caption guidance,
the release's null caption, the checkpoint's defaults, and the errors."""
import copy
import warnings

import numpy as np
import pytest
import torch

import pidkern
from pidkern import ops
from pidkern.api import Decoder, random_net
from pidkern.checkpoint import inspect_checkpoint, save_checkpoint
from pidkern.config import UNDISTILLED_DIRS, sampling_for, tiny
from pidkern._ext import philox_draws
from pidkern.sampler import dpm_times, dynamic_shift
from test_dpm import ref_sample, ref_times, rel_l2

CPU = torch.device("cpu")
# The release's default negative prompt (PixelDiTModelConfig.negative_prompt), written out here.
RELEASE_NEGATIVE = ("low quality, worst quality, over-saturated, three legs, six fingers, cartoon, anime, cgi, "
                    "low res, blurry, deformed, distortion, duplicated limbs, plastic skin, jpeg artifacts, watermark")


def decoder(distilled=False, encoder=None, **over):
    cfg = tiny("flux-2kto4k-v1.5", **over)
    net = random_net(cfg, CPU, torch.float32, seed=3)
    return Decoder(net, CPU, torch.float32, "test", text_encoder=encoder, sampling=sampling_for(cfg, distilled))


def inputs(dec, b=2, tokens=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = dec.config
    latent = torch.randn(b, cfg.latent_channels, 1, 2, generator=g)
    text = torch.randn(b, tokens, cfg.text_dim, generator=g)
    neg = torch.randn(1, tokens, cfg.text_dim, generator=g)
    return latent, torch.tensor([0.0, 0.4])[:b], text, neg


class Calls:
    """The network's forward calls: (batch, t, caption) of each."""

    def __init__(self, net):
        self.seen = []
        self.handle = net.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        x, t, text = args[:3]
        self.seen.append((x.shape[0], t.clone(), text.clone(), x.clone()))


@pytest.mark.parametrize("steps, cfg", [(1, 1.0), (1, 4.5), (7, 1.0), (7, 4.5), (25, 4.5)])
def test_decode_matches_float64_transcription(steps, cfg):
    """The decode against the float64 DPM-Solver++(2M) transcription around a float64 copy of
    the network, at the release's float32 timesteps. What remains is the float32 arithmetic
    of the release's first data prediction (see test_dpm)."""
    dec = decoder()
    latent, sigma, text, neg = inputs(dec)
    kw = dict(negative_text=neg) if cfg != 1 else {}
    got = dec.decode(latent, sigma, text=text, sampler="dpm++", steps=steps, cfg=cfg, shift=3.0, seed=5, **kw)
    net64 = copy.deepcopy(dec.net).double()
    b = latent.shape[0]
    neg64, text64, lat64, sig64 = neg.double().expand(b, -1, -1), text.double(), latent.double(), sigma.double()

    def velocity(x, t, cond):
        with torch.no_grad():
            return net64(x, torch.full((b,), t, dtype=torch.float64), text64 if cond else neg64, lat64, sig64)

    H, W = dec.config.output_size(1, 2)
    x = torch.randn(b, 3, H, W, generator=torch.Generator().manual_seed(5))
    times = dpm_times(steps, 3.0, CPU).double().numpy()
    np.testing.assert_allclose(times, ref_times(steps, 3.0), rtol=3e-7, atol=2.5e-7)
    want = ref_sample(x, steps, cfg, 3.0, velocity, times=times)
    assert rel_l2(got, want) <= 2 * torch.finfo(torch.float32).eps / (1 - times[0])
    # and a wrong sampler is far off: the check can fail
    other = dec.decode(latent, sigma, text=text, negative_text=neg, sampler="dpm++", steps=steps, cfg=cfg + 1,
                       shift=3.0, seed=5)     # another guidance scale
    assert rel_l2(other, want) > 1e-3


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_network_calls(cfg):
    """cfg = 1: one batch of B per step and no unconditional caption; else the unconditional
    half (the negative caption) then the conditional one, each a batch of B, per step."""
    dec = decoder()
    latent, sigma, text, neg = inputs(dec)
    calls = Calls(dec.net)
    kw = dict(negative_text=neg) if cfg != 1 else {}
    dec.decode(latent, sigma, text=text, sampler="dpm++", steps=4, cfg=cfg, seed=1, **kw)
    per_step = 1 if cfg == 1 else 2
    assert len(calls.seen) == 4 * per_step
    assert all(n == 2 for n, *_ in calls.seen)
    for i, (_, t, caption, _) in enumerate(calls.seen):
        cond = cfg == 1 or i % 2 == 1
        want = text if cond else neg.expand(2, -1, -1)
        assert torch.equal(caption, want), i
        assert t.shape == (2,) and t.dtype == torch.float32
    ts = dpm_times(4, dec.sampling.shift.shift(*dec.config.output_size(1, 2)), CPU)
    assert torch.equal(torch.stack([t[0] for _, t, _, _ in calls.seen[per_step - 1::per_step]]), ts[:4])


def test_initial_noise_is_the_seeds():
    dec = decoder()
    latent, sigma, text, neg = inputs(dec)
    H, W = dec.config.output_size(1, 2)
    for noise, want in (("release", torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(7))),
                        ("philox", philox_draws(7, CPU)(0, (2, 3, H, W)))):
        calls = Calls(dec.net)
        dec.decode(latent, sigma, text=text, sampler="dpm++", steps=2, cfg=1, seed=7, noise=noise)
        calls.handle.remove()
        assert torch.equal(calls.seen[0][3], want), noise


def test_null_caption_is_the_release_recipe():
    """Without a negative, the unconditional half gets the release's null caption: its caption
    recipe applied to its default negative prompt (tiny Gemma fixture, recipe written here)."""
    pytest.importorskip("transformers")
    from tiny_gemma import TEXT_DIM, tiny_caption_encoder, tiny_gemma, tiny_tokenizer

    from pidkern.text import NEGATIVE_PROMPT, PREFIX
    assert NEGATIVE_PROMPT == RELEASE_NEGATIVE
    dec = decoder(encoder=tiny_caption_encoder(), text_dim=TEXT_DIM, max_text=300)
    latent, sigma, _, _ = inputs(dec)
    calls = Calls(dec.net)
    dec.decode(latent[:1], sigma[:1], prompt="a cat", sampler="dpm++", steps=1, cfg=3.0, seed=0)
    tok, gemma = tiny_tokenizer(), tiny_gemma(0)
    n = len(tok(PREFIX)["input_ids"])
    ids = tok([PREFIX + RELEASE_NEGATIVE], max_length=n + 298, padding="max_length", truncation=True,
              return_tensors="pt")
    with torch.no_grad():
        hidden = gemma(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])[0]
    want = torch.cat([hidden[:, :1], hidden[:, -299:]], dim=1).float()
    uncond = calls.seen[0][2]
    assert uncond.shape == (1, 300, TEXT_DIM)
    torch.testing.assert_close(uncond, want, rtol=0, atol=1e-5)
    assert not torch.allclose(calls.seen[1][2], uncond)       # the conditional half has the caption


def test_dynamic_shift_default():
    dec = decoder()
    latent, sigma, text, neg = inputs(dec)
    args = dec.prepare(latent, sigma, text, sampler="dpm++", negative_text=neg)
    H, W = dec.config.output_size(1, 2)
    assert args.guidance.shift == dynamic_shift(6.0, 2048, H, W)
    assert args.guidance.cfg == 5.0 and args.steps == 25 and args.sampler == "dpm++"
    assert dec.prepare(latent, sigma, text, sampler="dpm++", shift=2.5, cfg=1).guidance.shift == 2.5


@pytest.mark.parametrize("kw, match", [
    (dict(steps=0), "steps=0"),
    (dict(steps=101), "steps=101"),
    (dict(cfg=0.9), "cfg"),
    (dict(cfg=float("nan")), "cfg"),
    (dict(shift=0.0), "shift"),
    (dict(shift=float("inf")), "shift"),
    (dict(negative_text=torch.zeros(2, 5, 7)), "negative_text.*2304|negative_text.*40"),
    (dict(negative_text=torch.zeros(3, 5, 40)), "negative_text: batch 3"),
    (dict(negative_text=torch.zeros(1, 4, 40)), "4 tokens"),
    (dict(negative_text=torch.full((1, 5, 40), float("nan"))), "negative_text.*NaN"),
    (dict(negative_text=torch.zeros(1, 5, 40), negative_prompt="x"), "both given"),
    (dict(cfg=1, negative_text=torch.zeros(1, 5, 40)), "negative_text.*cfg=1"),
    (dict(cfg=2.0, negative_text=None), "cfg=2.*text encoder"),
    (dict(sampler="sde", cfg=2.0), "cfg=2.0.*dpm"),
    (dict(sampler="sde", shift=3.0), "shift=3.0"),
    (dict(sampler="sde", shift=1.0, cfg=1), "shift=1.0"),
    (dict(sampler="ode", negative_prompt="bad"), "negative_prompt"),
])
def test_bad_input(kw, match):
    dec = decoder()
    latent, sigma, text, neg = inputs(dec)
    args = dict(sampler="dpm++", steps=2, cfg=2.0, negative_text=neg)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        dec.decode(latent, sigma, text=text, seed=0, **args)


def test_warnings_for_the_other_kind_of_checkpoint():
    latent, sigma, text, neg = inputs(decoder())
    with pytest.warns(UserWarning, match="distilled checkpoint.*not for sampler='dpm\\+\\+'"):
        decoder(distilled=True).decode(latent, sigma, text=text, sampler="dpm++", steps=1, cfg=1, seed=0)
    with pytest.warns(UserWarning, match="undistilled checkpoint.*not for the 4-step sampler"):
        decoder().decode(latent, sigma, text=text, sampler="sde", steps=1, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoder(distilled=True).decode(latent, sigma, text=text, steps=1, seed=0)


def test_undistilled_known_by_name_and_by_argument(tmp_path, capsys):
    from tiny_gemma import TEXT_DIM, tiny_caption_encoder
    cfg = tiny("flux-2kto4k-v1.5", text_dim=TEXT_DIM, max_text=300)
    state = random_net(cfg, CPU, torch.float32, seed=1).state_dict()
    named = tmp_path / UNDISTILLED_DIRS["flux-2kto4k-v1.5"] / "model.safetensors"
    plain = tmp_path / "teacher.safetensors"
    save_checkpoint(state, cfg, named)
    save_checkpoint(state, cfg, plain)

    dec = pidkern.load(named, device="cpu", text_encoder=tiny_caption_encoder())
    assert not dec.sampling.distilled and dec.sampling.sampler == "dpm++" and dec.sampling.steps == 25
    calls = Calls(dec.net)
    latent = torch.randn(1, cfg.latent_channels, 1, 1, generator=torch.Generator().manual_seed(0))
    out = dec.decode(latent, 0.0, prompt="a cat", seed=0)      # the undistilled defaults: 25 steps, cfg 5
    assert out.shape == (1, 3, 32, 32) and len(calls.seen) == 50
    assert pidkern.load(plain, device="cpu").sampling.distilled
    assert not pidkern.load(plain, device="cpu", distilled=False).sampling.distilled

    info = inspect_checkpoint(named)
    assert (info.distilled, info.distilled_from) == (False, "name")
    assert (inspect_checkpoint(plain).distilled, inspect_checkpoint(plain, distilled=False).distilled_from) == \
        (True, "argument")
    from pidkern.cli import main
    assert main(["info", str(named)]) == 0
    out = capsys.readouterr().out
    assert "trained: undistilled: dpm++, 25 steps, cfg 5, shift 6 * sqrt(sqrt(H*W) / 2048)" in out
    assert "from the release's name" in out
    assert main(["info", str(plain)]) == 0
    assert "trained: distilled" in capsys.readouterr().out


def test_undistilled_release_file_may_lack_the_training_only_head(tmp_path):
    cfg = tiny("qwenimage-2kto4k-v1.5")
    state = random_net(cfg, CPU, torch.float32, seed=2).state_dict()
    aux = [k for k in state if k.startswith("lq_proj.lq_aux_rgb_head.")]
    assert aux
    from safetensors.torch import save_file
    kept = {f"net.{k}": v for k, v in state.items() if k not in aux}
    path = tmp_path / UNDISTILLED_DIRS["qwenimage-2kto4k-v1.5"] / "model_ema_bf16.safetensors"
    path.parent.mkdir()
    save_file(kept, path)
    dec = pidkern.load(path, preset=cfg, device="cpu")
    assert not dec.sampling.distilled
    got = dec.net.state_dict()
    assert all(torch.equal(got[k], torch.zeros_like(state[k])) for k in aux)
    assert all(torch.equal(got[k], state[k]) for k in state if k not in aux)
    save_file(kept, tmp_path / "other.safetensors")       # without the name: strict, as before
    with pytest.raises(ValueError, match="missing key.*lq_aux_rgb_head"):
        pidkern.load(tmp_path / "other.safetensors", preset=cfg, device="cpu")


class EagerGraph:
    """Stands in for a CUDA graph on the CPU: replay runs the captured function again into
    the same output tensor (what a replay does with the static buffers)."""

    def __init__(self, run, out):
        self.run, self.out = run, out

    def replay(self):
        self.out.copy_(self.run(False))


@pytest.mark.skipif(not ops.HAS_TRITON, reason="needs triton (kernels under its interpreter)")
def test_fast_path_matches_reference(monkeypatch):
    """The fast path (interpreted kernels; one batch of 2B per guided step) against the
    reference path (two network calls of B per guided step), float32, guided (the solver's
    second-order steps are sample_dpm's own, shared by both paths: test_dpm); then the graph runner's buffers (the negative caption's, one noise
    buffer) with an eager stand-in for the capture, fed as Engine.decode feeds them."""
    from pidkern import engine as engine_module
    with pytest.warns(UserWarning, match="RANDOM weights"):
        dec = pidkern.load(preset=tiny("flux-2k"), device="cpu", distilled=False)
    g = torch.Generator().manual_seed(4)
    latent = torch.randn(2, dec.config.latent_channels, 1, 1, generator=g)
    text, neg = torch.randn(2, 5, dec.config.text_dim, generator=g), torch.randn(1, 5, dec.config.text_dim, generator=g)
    sigma = torch.tensor([0.0, 0.3])
    kw = dict(sampler="dpm++", steps=2, cfg=3.0, shift=4.0, seed=3, negative_text=neg)
    ref = dec.decode(latent, sigma, text, backend="reference", **kw)
    fast = dec.decode(latent, sigma, text, backend="fast", **kw)
    assert rel_l2(fast, ref) <= 1e-5
    other = dec.decode(latent, sigma, text, backend="reference", **{**kw, "cfg": 2.0})
    assert rel_l2(other, ref) > 1e-3

    def capture(run, device, warm_ups=2):
        out = torch.empty_like(ref)      # no warm-up: on the CPU the plan races nothing
        return EagerGraph(run, out), out
    monkeypatch.setattr(engine_module, "capture", capture)
    eng = dec.engine()
    runner = eng._build_runner(eng.graph_key(dec.prepare(latent, sigma, text, **kw)))
    assert sorted(runner.bufs) == ["latent", "negative", "noise", "sigma", "text"] and len(runner.bufs["noise"]) == 1
    eng.draw_noise(tuple(ref.shape), 2, "dpm++", 3, out=runner.bufs["noise"])
    replayed = runner.replay(latent=latent, sigma=sigma, text=text, negative=neg.expand(2, -1, -1))
    assert rel_l2(replayed, ref) <= 1e-5


def test_memory_estimate_knows_the_doubled_batch():
    from pidkern.config import get_preset
    from pidkern.memory import estimate_memory
    cfg = get_preset("flux-2kto4k-v1.5")
    h = w = 2048
    image = 3 * h * w * 4
    sde1, sde2 = (estimate_memory(cfg, b, h, w) for b in (1, 2))
    dpm1 = estimate_memory(cfg, 1, h, w, sampler="dpm++", cfg_scale=1.0)
    dpm_guided = estimate_memory(cfg, 1, h, w, sampler="dpm++", cfg_scale=3.0)
    assert dpm1 - sde1 == 4 * image        # the multistep history, the velocity, the new prediction
    # guided: the network's terms of a batch of 2 (the images stay the decode's one)
    assert abs((dpm_guided - dpm1) - (sde2 - sde1)) <= 8 * image
    assert dpm_guided - dpm1 > 0.5 * (sde2 - sde1)
