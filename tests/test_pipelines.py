"""End to end with real diffusers code: a tiny FluxPipeline into PiD (`generate`, the early
exit, `decode_pipeline_latents`) and images through tiny VAEs of each family (`upscale`).

References are written here from the release's formulas (FLUX's 2x2 token packing,
FLUX.2's patchify and BatchNorm, Qwen-Image's per-channel statistics, the affine
scale/shift, `add_noise`), not taken from pidkern; every decode runs 1 PiD step on tiny
sizes, so the file costs a few seconds beyond importing diffusers."""
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import pidkern  # noqa: E402
from pidkern import pipelines  # noqa: E402
from pidkern.api import Decoder, random_net  # noqa: E402
from pidkern.config import tiny  # noqa: E402
from tiny_diffusers import (KLEIN_TEXT_LAYERS, tiny_flux2_vae, tiny_flux_pipeline, tiny_kl_vae,  # noqa: E402
                            tiny_klein_pipeline, tiny_qwen_vae, tiny_sdxl_pipeline, tiny_zimage_pipeline)
from tiny_gemma import TEXT_DIM, tiny_caption_encoder  # noqa: E402

PROMPT = "a red cat on the table"
GEN_HW = (16, 32)           # the generator's image: a 2x4 FLUX latent, 64x128 out of tiny PiD
ONE_STEP = {"steps": 1}


def tiny_decoder(base, encoder, seed=0):
    cfg = tiny(base, text_dim=TEXT_DIM, max_text=300)
    dec = Decoder(random_net(cfg, torch.device("cpu"), torch.float32, seed=seed), torch.device("cpu"),
                  torch.float32, "random")
    dec.text_encoder = encoder
    return dec


@pytest.fixture(scope="module")
def encoder():
    return tiny_caption_encoder()


@pytest.fixture(scope="module")
def dec(encoder):
    return tiny_decoder("flux-2k", encoder)


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_pipeline()


def unpack_flux(tokens, h, w):
    """FLUX's packed [B, (h/2)(w/2), 4C] tokens (2x2 cells, channel-major) -> [B, C, h, w]."""
    b, _, c4 = tokens.shape
    c = c4 // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def run_pipe(pipe, seed, steps, **kw):
    return pipe(PROMPT, height=GEN_HW[0], width=GEN_HW[1], num_inference_steps=steps, output_type="latent",
                max_sequence_length=16, generator=torch.Generator().manual_seed(seed), **kw).images


def latent_hw():
    return GEN_HW[0] // 8, GEN_HW[1] // 8


# ---------------------------------------------------------------------------------------
# Backbones.

@pytest.mark.parametrize("cls, backbone", [
    ("FluxPipeline", "flux"), ("FluxImg2ImgPipeline", "flux"), ("Flux2Pipeline", "flux2"),
    ("Flux2KleinPipeline", "flux2-klein-4b"), ("StableDiffusion3Pipeline", "sd3"),
    ("StableDiffusionXLPipeline", "sdxl"),
    ("QwenImagePipeline", "qwenimage"), ("ZImagePipeline", "zimage")])
def test_backbone_from_pipeline_class(cls, backbone):
    import diffusers
    assert pipelines.pipeline_backbone(object.__new__(getattr(diffusers, cls))) == backbone


def test_unknown_pipeline_and_wrong_decoder(pipe, encoder):
    import diffusers
    with pytest.raises(ValueError, match="StableDiffusionPipeline.*backbone="):
        pipelines.pipeline_backbone(object.__new__(diffusers.StableDiffusionPipeline))
    sdxl = tiny_decoder("sdxl-2kto4k", encoder)
    with pytest.raises(ValueError, match="'flux' backbone does not match the decoder tiny-sdxl-2kto4k"):
        pipelines.generate(pipe, PROMPT, sdxl, num_inference_steps=1)


def test_import_pidkern_does_not_import_diffusers():
    code = ("import sys, pidkern; f = pidkern.generate, pidkern.upscale, pidkern.decode_pipeline_latents; "
            "assert not [m for m in ('diffusers', 'transformers') if m in sys.modules], sys.modules.keys()")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------
# From a generator.

def test_generate_is_the_pipeline_latent_decoded(pipe, dec):
    pics = pipelines.generate(pipe, PROMPT, dec, seed=3, height=GEN_HW[0], width=GEN_HW[1], num_inference_steps=2,
                              max_sequence_length=16, decode_kwargs=ONE_STEP)
    assert len(pics) == 1 and pics[0].size == (GEN_HW[1] * 4, GEN_HW[0] * 4)   # PIL: (width, height)
    # The reference: the same pipeline run (same seed), unpacked here, decoded by hand.
    latent = unpack_flux(run_pipe(pipe, 3, 2), *latent_hw())
    want = dec.decode(latent, 0.0, prompt=[PROMPT], seed=3, steps=1)
    assert torch.equal(torch.from_numpy(np.array(pics[0])), pidkern.to_uint8(want)[0])
    # degrade_sigma: the finished latent noised as the release's add_noise, from the same seed.
    got = pipelines.generate(pipe, PROMPT, dec, seed=3, degrade_sigma=0.4, height=GEN_HW[0], width=GEN_HW[1],
                             num_inference_steps=2, max_sequence_length=16, decode_kwargs=ONE_STEP, output_type="pt")
    eps = torch.randn(latent.shape, generator=torch.Generator().manual_seed(3))
    want = dec.decode(0.6 * latent + 0.4 * eps, 0.4, prompt=[PROMPT], seed=3, steps=1)
    assert torch.allclose(got[0], want[0], atol=1e-6)


def test_stop_sigma_hands_pid_the_latent_and_sigma_of_the_stop(pipe, dec, monkeypatch):
    seen, calls, decoded = [], [], []

    def record(p, i, t, kw):   # a user's callback: generate chains it before its own
        seen.append((i, kw["latents"].clone(), float(p.scheduler.sigmas[i + 1])))
        return kw

    handle = pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    real = dec.decode
    monkeypatch.setattr(dec, "decode", lambda latent, sigma, **kw: decoded.append((latent, sigma)) or real(
        latent, sigma, **kw))
    try:
        out = pipelines.generate(pipe, PROMPT, dec, stop_sigma=0.6, seed=1, height=GEN_HW[0], width=GEN_HW[1],
                                 num_inference_steps=4, max_sequence_length=16, callback_on_step_end=record,
                                 output_type="pt", decode_kwargs=ONE_STEP)
    finally:
        handle.remove()
    sigmas = pipe.scheduler.sigmas.tolist()
    stop = next(k for k in range(1, len(sigmas)) if sigmas[k] <= 0.6)   # the first step ending at <= 0.6
    assert sigmas[stop] < 0.6 < sigmas[stop - 1] and 0 < stop < 4   # a real early exit, not the last step
    assert len(calls) == stop and [s[0] for s in seen] == list(range(stop))   # the generator did stop there
    (latent, sigma), = decoded
    assert sigma == pytest.approx(sigmas[stop])
    assert torch.equal(latent, unpack_flux(seen[stop - 1][1], *latent_hw()))
    assert out[0].shape == (3, GEN_HW[0] * 4, GEN_HW[1] * 4)


def test_zimage_early_exit_on_an_unpacked_latent(dec, monkeypatch):
    """Z-Image keeps [B, 16, h, w] latents (no packing) and uses the FLUX.1 checkpoint."""
    pipe = tiny_zimage_pipeline()
    assert pipelines.pipeline_backbone(pipe) == "zimage"
    seen, decoded = [], []
    real = dec.decode
    monkeypatch.setattr(dec, "decode", lambda latent, sigma, **kw: decoded.append((latent, sigma)) or real(
        latent, sigma, **kw))
    out = pipelines.generate(pipe, PROMPT, dec, stop_sigma=0.5, seed=0, height=16, width=32, num_inference_steps=3,
                             max_sequence_length=16, guidance_scale=0.0, output_type="pt", decode_kwargs=ONE_STEP,
                             callback_on_step_end=lambda p, i, t, kw: seen.append(kw["latents"].clone()) or kw)
    sigmas = pipe.scheduler.sigmas.tolist()
    stop = next(k for k in range(1, len(sigmas)) if sigmas[k] <= 0.5)
    (latent, sigma), = decoded
    assert len(seen) == stop < 3 and sigma == pytest.approx(sigmas[stop])
    assert torch.equal(latent, seen[-1]) and out[0].shape == (3, 64, 128)


def test_sdxl_stop_sigma_converts_euler_to_pids_frame(encoder, monkeypatch):
    """A real SDXL pipeline (Euler, variance-exploding sigmas): PiD gets the stopped latent
    and sigma divided by sqrt(s^2 + 1), as the release's to_training_frame does."""
    pipe = tiny_sdxl_pipeline()
    dec = tiny_decoder("sdxl-2kto4k", encoder)
    seen, decoded = [], []
    real = dec.decode
    monkeypatch.setattr(dec, "decode", lambda latent, sigma, **kw: decoded.append((latent, sigma)) or real(
        latent, sigma, **kw))
    out = pipelines.generate(pipe, PROMPT, dec, stop_sigma=0.7, seed=0, height=16, width=16, num_inference_steps=3,
                             callback_on_step_end=lambda p, i, t, kw: seen.append(kw["latents"].clone()) or kw,
                             output_type="pt", decode_kwargs=ONE_STEP)
    s = pipe.scheduler.sigmas.tolist()
    vp = [v / math.sqrt(v * v + 1) for v in s]
    stop = next(k for k in range(1, len(s)) if vp[k] <= 0.7)
    assert s[stop] > 0.7 and stop < len(s) - 1      # the Euler sigma alone would not have stopped here
    assert len(seen) == stop
    (latent, sigma), = decoded
    assert sigma == pytest.approx(vp[stop])
    torch.testing.assert_close(latent, seen[-1] / math.sqrt(s[stop] ** 2 + 1))
    assert out[0].shape == (3, 64, 64)


def flux2_normalise(z, vae):
    """FLUX.2's raw [B, 32, h, w] VAE latent -> PiD's [B, 128, h/2, w/2]: 2x2 patchify (channel
    c*4 + 2a + b), then the VAE's BatchNorm running statistics."""
    b, c, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
    mean, var = vae.bn.running_mean.view(1, -1, 1, 1), vae.bn.running_var.view(1, -1, 1, 1)
    return (z - mean) / torch.sqrt(var + vae.config.batch_norm_eps)


def test_flux2_klein_final_raw_latent_and_early_exit_tokens(encoder, monkeypatch):
    """FLUX.2-klein hands back the raw 32-channel VAE latent when it finishes, but its step
    callback sees normalised 128-channel tokens: both reach PiD as the same [B, 128, h, w]."""
    pipe = tiny_klein_pipeline()
    dec = tiny_decoder("flux2-2k", encoder)
    assert pipelines.pipeline_backbone(pipe) == "flux2-klein-4b"
    kw = dict(height=16, width=32, num_inference_steps=3, max_sequence_length=16, guidance_scale=1.0,
              text_encoder_out_layers=KLEIN_TEXT_LAYERS, output_type="pt", decode_kwargs=ONE_STEP)
    decoded, seen = [], []
    real = dec.decode
    monkeypatch.setattr(dec, "decode", lambda latent, sigma, **k: decoded.append((latent, sigma)) or real(
        latent, sigma, **k))
    full = pipelines.generate(pipe, PROMPT, dec, seed=4, **kw)
    raw = pipe(prompt=PROMPT, output_type="latent", generator=torch.Generator().manual_seed(4),
               **{k: v for k, v in kw.items() if k not in ("output_type", "decode_kwargs")}).images
    assert raw.shape == (1, 32, 2, 4)
    torch.testing.assert_close(decoded[0][0], flux2_normalise(raw, pipe.vae))
    assert decoded[0][1] == 0.0 and full[0].shape == (3, 64, 128)

    pipelines.generate(pipe, PROMPT, dec, seed=4, stop_sigma=0.5,
                       callback_on_step_end=lambda p, i, t, k: seen.append(k["latents"].clone()) or k, **kw)
    sigmas = pipe.scheduler.sigmas.tolist()
    stop = next(k for k in range(1, len(sigmas)) if sigmas[k] <= 0.5)
    assert len(seen) == stop < 3 and decoded[1][1] == pytest.approx(sigmas[stop])
    tokens = seen[-1]     # [B, h*w, 128], row-major over the 1x2 token grid
    assert torch.equal(decoded[1][0], tokens.transpose(1, 2).reshape(1, 128, 1, 2))


def test_decode_pipeline_latents_and_offload(pipe, dec, monkeypatch):
    moved = []
    monkeypatch.setattr(pipelines, "offload_generator", lambda p: moved.append(p) or [])
    packed = run_pipe(pipe, 5, 1)
    got = pipelines.decode_pipeline_latents(pipe, packed, dec, PROMPT, sigma=0.25, height=GEN_HW[0],
                                            width=GEN_HW[1], seed=2, output_type="pt", decode_kwargs=ONE_STEP)
    want = dec.decode(unpack_flux(packed, *latent_hw()), 0.25, prompt=[PROMPT], seed=2, steps=1)
    assert torch.equal(got[0], want[0])
    assert moved == []          # offload=None on a CPU decoder: no memory to free
    pipelines.decode_pipeline_latents(pipe, packed, dec, PROMPT, height=GEN_HW[0], width=GEN_HW[1], seed=2,
                                      offload=True, decode_kwargs=ONE_STEP)
    assert moved == [pipe]


def test_offload_generator_leaves_cpu_modules_and_the_vae(pipe):
    assert pipelines.offload_generator(pipe) == []   # nothing is on a GPU here


def test_bad_generate_arguments(pipe, dec):
    for kw, match in [({"stop_sigma": 1.5}, "stop_sigma=1.5"), ({"degrade_sigma": -0.1}, "degrade_sigma=-0.1"),
                      ({"stop_sigma": 0.5, "degrade_sigma": 0.2}, "not both"),
                      ({"output_type": "latent"}, "output_type='latent'"), ({"backbone": "sdxl"}, "does not match")]:
        with pytest.raises(ValueError, match=match):
            pipelines.generate(pipe, PROMPT, dec, **kw)
    with pytest.raises(TypeError, match="prompt=3"):
        pipelines.generate(pipe, 3, dec)


# ---------------------------------------------------------------------------------------
# From an image.

def rgb(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)


def padded(img_u8, multiple):
    """Edge-replicated padding at the bottom and right, in numpy, as [1, 3, H, W] in [-1, 1]."""
    a = img_u8.permute(1, 2, 0).numpy()
    h, w = a.shape[:2]
    a = np.pad(a, ((0, -h % multiple), (0, -w % multiple), (0, 0)), mode="edge")
    return torch.from_numpy(a).permute(2, 0, 1)[None].float() / 127.5 - 1


def decode_ref(dec, latent, sigma, seed, h, w):
    out = dec.decode(latent, sigma, prompt=[""], seed=seed, steps=1)
    return out[0, :, :4 * h, :4 * w]


def test_upscale_crops_back_to_exactly_4x(dec):
    from PIL import Image
    vae = tiny_kl_vae()
    img = rgb(13, 21)
    pic = Image.fromarray(img.permute(1, 2, 0).numpy())
    got = pipelines.upscale(pic, dec, vae, seed=5, output_type="pt", decode_kwargs=ONE_STEP)
    assert got[0].shape == (3, 52, 84)
    # Reference: pad to whole latent cells (8), encode the posterior mean, FLUX's (z - shift) * scale.
    with torch.no_grad():
        z = vae.encode(padded(img, 8)).latent_dist.mean
    latent = (z - vae.config.shift_factor) * vae.config.scaling_factor
    assert torch.equal(got[0], decode_ref(dec, latent, 0.0, 5, 13, 21))


def test_upscale_passes_the_dpm_sampler_through(dec):
    """decode_kwargs carry DPM-Solver++ and its guidance to the decode, the release's null
    caption included (a warning: tiny-flux-2k is a distilled checkpoint)."""
    vae = tiny_kl_vae()
    img = rgb(16, 16, 4)
    dpm = dict(sampler="dpm++", steps=2, cfg=2.5, shift=3.0)
    with pytest.warns(UserWarning, match="distilled checkpoint"):
        got = pipelines.upscale(img, dec, vae, prompt="a red cube", seed=2, output_type="pt", decode_kwargs=dpm)
    with torch.no_grad():
        z = vae.encode(padded(img, 8)).latent_dist.mean
    latent = (z - vae.config.shift_factor) * vae.config.scaling_factor
    with pytest.warns(UserWarning, match="distilled checkpoint"):
        want = dec.decode(latent, 0.0, prompt=["a red cube"], seed=2, **dpm)
    assert torch.equal(got[0], want[0])


def test_upscale_degrade_batch_and_input_forms(dec):
    """degrade_sigma mixes seeded noise in as the release's add_noise does; image i of a
    batch uses seed + i; uint8 and [0, 1] float tensors are the same image."""
    vae = tiny_kl_vae()
    a, b = rgb(16, 24, 1), rgb(8, 16, 2)
    got = pipelines.upscale([a, b.float() / 255], dec, vae, degrade_sigma=0.3, seed=7, output_type="pt",
                            decode_kwargs=ONE_STEP)
    assert [tuple(g.shape) for g in got] == [(3, 64, 96), (3, 32, 64)]
    for img, out, seed in ((a, got[0], 7), (b, got[1], 8)):
        with torch.no_grad():
            z = vae.encode(padded(img, 8)).latent_dist.mean
        clean = (z - vae.config.shift_factor) * vae.config.scaling_factor
        eps = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
        want = decode_ref(dec, 0.7 * clean + 0.3 * eps, 0.3, seed, *img.shape[1:])
        assert torch.allclose(out, want, atol=1e-6)


def test_upscale_sdxl_degrades_variance_preserving(encoder):
    dec = tiny_decoder("sdxl-2kto4k", encoder)
    vae = tiny_kl_vae(latent_channels=4, scaling_factor=0.13025, shift_factor=None)
    img = rgb(16, 16, 3)
    got = pipelines.upscale(img, dec, vae, degrade_sigma=0.6, seed=0, output_type="pt", decode_kwargs=ONE_STEP)
    with torch.no_grad():
        clean = vae.encode(padded(img, 8)).latent_dist.mean * 0.13025
    eps = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    want = decode_ref(dec, 0.8 * clean + 0.6 * eps, 0.6, 0, 16, 16)   # sqrt(1 - 0.36) = 0.8
    assert torch.allclose(got[0], want, atol=1e-6)


def upscale_one(encoder, base, vae, hw, seed, multiple, frames=False):
    """Upscale a random image with a tiny decoder of `base`; returns the decoder, the result
    (checked to be exactly 4x) and the VAE's posterior mean of the padded image."""
    dec = tiny_decoder(base, encoder)
    img = rgb(*hw, seed)
    got = pipelines.upscale(img, dec, vae, seed=seed, output_type="pt", decode_kwargs=ONE_STEP)
    assert got[0].shape == (3, 4 * hw[0], 4 * hw[1])
    x = padded(img, multiple)
    with torch.no_grad():   # Qwen-Image's VAE takes videos: the image is one frame
        z = vae.encode(x[:, :, None] if frames else x).latent_dist.mean
    return dec, got, z[:, :, 0] if frames else z


def test_upscale_flux2_vae(encoder):
    """AutoencoderKLFlux2: 32 channels patchified 2x2 (channel c*4 + 2a + b) and BatchNorm-
    normalised to PiD's 128; the image pads to 16."""
    vae = tiny_flux2_vae()
    dec, got, z = upscale_one(encoder, "flux2-2k", vae, (12, 14), seed=1, multiple=16)
    latent = flux2_normalise(z, vae)
    assert torch.allclose(got[0], decode_ref(dec, latent, 0.0, 1, 12, 14), atol=1e-6)


def test_upscale_qwenimage_vae(encoder):
    """AutoencoderKLQwenImage: the image as a one-frame video, per-channel mean and std."""
    vae = tiny_qwen_vae()
    dec, got, z = upscale_one(encoder, "qwenimage-2kto4k-v1.5", vae, (6, 10), seed=2, multiple=8, frames=True)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    latent = (z - mean) * (1.0 / std)      # the release scales by 1/std
    assert torch.allclose(got[0], decode_ref(dec, latent, 0.0, 2, 6, 10), atol=1e-6)


def test_upscale_rejects_a_vae_of_another_backbone(dec, tmp_path):
    for vae, match in [(tiny_kl_vae(latent_channels=4, scaling_factor=0.13025, shift_factor=None),
                        r"AutoencoderKL \(sdxl latents\) does not match the decoder tiny-flux-2k"),
                       (tiny_kl_vae(scaling_factor=1.5305, shift_factor=0.0609),   # SD3's: the same class and width
                        r"AutoencoderKL \(sd3 latents\) does not match"),
                       (tiny_flux2_vae(), "AutoencoderKLFlux2.*does not match"),
                       (torch.nn.Linear(2, 2), "a Linear is not a VAE")]:
        with pytest.raises(ValueError, match=match):
            pipelines.upscale(rgb(8, 8), dec, vae)
    vae = tiny_kl_vae()
    with pytest.raises(ValueError, match="'flux2' backbone does not match the decoder tiny-flux-2k"):
        pipelines.upscale(rgb(8, 8), dec, vae, backbone="flux2")
    with pytest.raises(ValueError, match="this AutoencoderKL makes sdxl latents, not 'flux' ones"):
        pipelines.upscale(rgb(8, 8), dec, tiny_kl_vae(latent_channels=4, scaling_factor=0.13025, shift_factor=None),
                          backbone="flux")
    with pytest.raises(ValueError, match="an AutoencoderKL with 8 latent channels, scaling_factor 0.3611 and "
                                         "shift_factor 0.1159 is not a VAE"):
        pipelines.upscale(rgb(8, 8), dec, tiny_kl_vae(latent_channels=8))


def test_upscale_bad_images(dec, tmp_path):
    vae = tiny_kl_vae()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    for image, err, match in [
            (tmp_path / "missing.png", FileNotFoundError, "missing.png' does not exist"),
            (bad, ValueError, "bad.png': cannot read it as an image"),
            (torch.rand(3, 8, 8) * 2 - 1, ValueError, r"values in \[0, 1\]"),
            (torch.zeros(8, 8, 3, dtype=torch.uint8), ValueError, r"\[3, H, W\]"),
            (torch.zeros(3, 8, 8, dtype=torch.int32), TypeError, "uint8 or floating"),
            ([], ValueError, "empty list"), (3, TypeError, "a PIL image, a path")]:
        with pytest.raises(err, match=match):
            pipelines.upscale(image, dec, vae)
    with pytest.raises(ValueError, match="2 captions for a batch of 3"):
        pipelines.upscale([rgb(8, 8)] * 3, dec, vae, prompt=["a", "b"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="needs a text encoder"):
            pipelines.upscale(rgb(8, 8), tiny_decoder("flux-2k", None), vae, prompt="a cat")
