"""Generator latents and time frames (pidkern.latents) against the release's formulas and
diffusers' own packing code, on random tensors and tiny random VAEs (CPU, offline)."""
import math
import types

import pytest
import torch

import pidkern
from pidkern import latents as L
from pidkern.api import Decoder, random_net
from pidkern.config import PRESETS, RELEASE_DIRS, tiny

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, AutoencoderKLFlux2, AutoencoderKLQwenImage  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline  # noqa: E402
from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline  # noqa: E402

CPU = torch.device("cpu")
ALL = ("flux", "zimage", "zimage-turbo", "sd3", "sdxl", "flux2", "flux2-klein-4b", "flux2-klein-9b",
       "qwenimage", "qwenimage-2512", "dinov2", "siglip")

# The release's checkpoint registry (pid/_src/inference/checkpoint_registry.py), keyed by
# (backbone, ckpt_type) -> experiment directory, aliases expanded.
_DIR = {
    "flux2k": "PiD_res2k_sr4x_official_flux_distill_4step",
    "flux15": "PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step",
    "flux22k": "PiD_res2k_sr4x_official_flux2_distill_4step",
    "flux215": "PiD_v1pt5_res2kto4k_sr4x_official_flux2_distill_4step",
    "qwen15": "PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_distill_4step",
}
RELEASE_REGISTRY = {
    ("flux", "2k"): _DIR["flux2k"], ("flux", "2kto4k_v1pt5"): _DIR["flux15"],
    ("zimage", "2k"): _DIR["flux2k"], ("zimage", "2kto4k_v1pt5"): _DIR["flux15"],
    ("zimage-turbo", "2k"): _DIR["flux2k"], ("zimage-turbo", "2kto4k_v1pt5"): _DIR["flux15"],
    ("flux2", "2k"): _DIR["flux22k"], ("flux2", "2kto4k_v1pt5"): _DIR["flux215"],
    ("flux2-klein-4b", "2k"): _DIR["flux22k"], ("flux2-klein-4b", "2kto4k_v1pt5"): _DIR["flux215"],
    ("flux2-klein-9b", "2k"): _DIR["flux22k"], ("flux2-klein-9b", "2kto4k_v1pt5"): _DIR["flux215"],
    ("sd3", "2k"): "PiD_res2k_sr4x_official_sd3_distill_4step",
    ("sd3", "2kto4k"): "PiD_res2kto4k_sr4x_official_sd3_distill_4step",
    ("sdxl", "2kto4k"): "PiD_res2kto4k_sr4x_official_sdxl_distill_4step",
    ("qwenimage", "2kto4k_v1pt5"): _DIR["qwen15"], ("qwenimage-2512", "2kto4k_v1pt5"): _DIR["qwen15"],
    ("dinov2", "2k"): "PiD_res2k_sr4x_official_dinov2_distill_4step",
    ("siglip", "2k"): "PiD_res2k_sr8x_official_siglip_distill_4step",
}
OUR_VARIANT = {"2k": "2k", "2kto4k": "2kto4k", "2kto4k_v1pt5": "2kto4k-v1.5"}

# pipeline_registry.py: affine scale/shift per backbone (Z-Image: FLUX.1's VAE config).
AFFINE = {"flux": (0.3611, 0.1159), "zimage": (0.3611, 0.1159), "zimage-turbo": (0.3611, 0.1159),
          "sd3": (1.5305, 0.0609), "sdxl": (0.13025, 0.0)}


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# -- registry -----------------------------------------------------------------------------

def test_backbone_names():
    assert L.BACKBONES == ALL


@pytest.mark.parametrize("backbone", ALL)
@pytest.mark.parametrize("ckpt_type", ["2k", "2kto4k", "2kto4k_v1pt5"])
def test_preset_for_matches_release_registry(backbone, ckpt_type):
    variant = OUR_VARIANT[ckpt_type]
    expected = RELEASE_REGISTRY.get((backbone, ckpt_type))
    if expected is None:
        have = sorted(OUR_VARIANT[t] for b, t in RELEASE_REGISTRY if b == backbone)
        with pytest.raises(ValueError, match="variant") as e:
            pidkern.preset_for(backbone, variant)
        assert all(repr(v) in str(e.value) for v in have)
        return
    preset = pidkern.preset_for(backbone, variant)
    assert preset in PRESETS and RELEASE_DIRS[preset] == expected


def test_unknown_backbone_and_variant():
    with pytest.raises(ValueError, match=r"backbone='fluxx'.*did you mean 'flux'"):
        pidkern.preset_for("fluxx")
    with pytest.raises(ValueError, match=r"backbone='zimage_turbo'.*'zimage-turbo'"):
        L.from_vae("zimage_turbo", rand(1, 16, 2, 2))
    with pytest.raises(ValueError, match=r"variant='4k'.*expected one of"):
        pidkern.preset_for("flux", "4k")
    for f in (lambda: L.from_pipeline("sd4", rand(1, 16, 2, 2)), lambda: L.to_pid_frame("sd4", rand(1, 16, 2, 2), 0.1)):
        with pytest.raises(ValueError, match="backbone='sd4'"):
            f()


def test_channels_fit_their_presets():
    for name in ALL:
        bb = L.get_backbone(name)
        for _, preset in bb.presets:
            assert PRESETS[preset].latent_channels == bb.channels
            assert PRESETS[preset].latent_stride == bb.stride


# -- VAE frame ----------------------------------------------------------------------------

@pytest.mark.parametrize("backbone", sorted(AFFINE))
def test_affine_from_vae_and_back(backbone):
    scale, shift = AFFINE[backbone]
    c = 4 if backbone == "sdxl" else 16
    z = rand(2, c, 3, 5)
    x = L.from_vae(backbone, z)
    torch.testing.assert_close(x, scale * (z - shift), rtol=0, atol=1e-12)     # the release's encode
    torch.testing.assert_close(L.to_vae(backbone, x), x / scale + shift, rtol=0, atol=1e-12)  # denormalize
    torch.testing.assert_close(L.to_vae(backbone, x), z, rtol=0, atol=1e-12)


def tiny_kl(scale, shift, latent=4):
    return AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=latent,
                         scaling_factor=scale, shift_factor=shift)


def test_affine_vae_config_is_checked_or_read():
    z = rand(1, 4, 2, 2)
    torch.testing.assert_close(L.from_vae("sdxl", z, vae=tiny_kl(0.13025, None)), 0.13025 * z)
    with pytest.raises(ValueError, match=r"vae: scaling_factor=0.18215.*sdxl"):
        L.from_vae("sdxl", z, vae=tiny_kl(0.18215, None))      # SD 1.5's VAE is not SDXL's
    # Z-Image: the release reads scale/shift off the pipeline's vae.config at run time.
    z16 = rand(1, 16, 2, 2)
    vae = tiny_kl(0.5, 0.25, latent=16)
    torch.testing.assert_close(L.from_vae("zimage", z16, vae=vae), 0.5 * (z16 - 0.25))
    torch.testing.assert_close(L.to_vae("zimage-turbo", L.from_vae("zimage-turbo", z16, vae=vae), vae=vae), z16)


def tiny_flux2(seed=0):
    vae = AutoencoderKLFlux2(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4)
    g = torch.Generator().manual_seed(seed)
    vae.bn.running_mean.copy_(torch.randn(128, generator=g))
    vae.bn.running_var.copy_(torch.rand(128, generator=g) * 3 + 0.1)
    return vae.eval()


def release_flux2_normalise(raw, vae):
    """extract_latent's Flux2-klein branch: patchify, then BN-normalise with vae.bn."""
    p = Flux2Pipeline._patchify_latents(raw)
    bn = vae.bn
    mean = bn.running_mean.view(1, -1, 1, 1).to(p.dtype)
    std = (bn.running_var.view(1, -1, 1, 1) + bn.eps).sqrt().to(p.dtype)
    return (p - mean) / std


def release_flux2_denormalise(x, vae):
    """Flux2Pipeline's tail before vae.decode: BN-denormalise (std formed in float32), unpatchify."""
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(x.dtype)
    raw = x * std + vae.bn.running_mean.view(1, -1, 1, 1).to(x.dtype)
    return Flux2Pipeline._unpatchify_latents(raw)


@pytest.mark.parametrize("backbone", ["flux2", "flux2-klein-4b", "flux2-klein-9b"])
def test_flux2_from_vae_batchnorm(backbone):
    vae = tiny_flux2()
    z = rand(2, 32, 6, 10)
    x = L.from_vae(backbone, z, vae=vae)
    assert x.shape == (2, 128, 3, 5)
    torch.testing.assert_close(x, release_flux2_normalise(z, vae), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(L.to_vae(backbone, x, vae=vae), release_flux2_denormalise(x, vae), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(L.to_vae(backbone, x, vae=vae), z, rtol=1e-10, atol=1e-10)


def test_flux2_encode_output_of_a_real_vae():
    vae = tiny_flux2(seed=3)
    with torch.no_grad():
        dist = vae.encode(rand(1, 3, 16, 16, dtype=torch.float32)).latent_dist
    x = L.from_vae("flux2", dist, vae=vae)           # the distribution: its mode, as the release encodes
    torch.testing.assert_close(x, release_flux2_normalise(dist.mode(), vae).float())


def test_flux2_needs_the_vae_statistics():
    with pytest.raises(ValueError, match=r"vae: .*bn.*pass vae=pipe.vae"):
        L.from_vae("flux2", rand(1, 32, 4, 4))
    with pytest.raises(ValueError, match=r"vae: .*bn"):
        L.to_vae("flux2-klein-4b", rand(1, 128, 2, 2), vae=tiny_kl(0.3611, 0.1159, latent=16))
    with pytest.raises(ValueError, match=r"z: .*even"):
        L.from_vae("flux2", rand(1, 32, 3, 4), vae=tiny_flux2())
    with pytest.raises(ValueError, match=r"z: a raw flux2 VAE latent is \[B, 32, h, w\]"):
        L.from_vae("flux2", rand(1, 128, 4, 4), vae=tiny_flux2())


def tiny_qwen(mean=None, std=None):
    kw = {} if mean is None else dict(latents_mean=mean, latents_std=std)
    return AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1,
                                  temperal_downsample=[False], **kw).eval()


@pytest.mark.parametrize("backbone", ["qwenimage", "qwenimage-2512"])
def test_qwenimage_per_channel(backbone):
    default = tiny_qwen()          # diffusers' config defaults: the release's constants
    mean = torch.tensor(default.config.latents_mean, dtype=torch.float64).view(1, 16, 1, 1, 1)
    std = torch.tensor(default.config.latents_std, dtype=torch.float64).view(1, 16, 1, 1, 1)
    z5 = rand(2, 16, 1, 3, 4)
    expected = ((z5 - mean) / std)[:, :, 0]
    for vae in (None, default):
        for z in (z5, z5[:, :, 0]):
            torch.testing.assert_close(L.from_vae(backbone, z, vae=vae), expected, rtol=1e-12, atol=1e-12)
    x = L.from_vae(backbone, z5)
    back = L.to_vae(backbone, x)
    torch.testing.assert_close(back, x.unsqueeze(2) * std + mean, rtol=1e-12, atol=1e-12)   # release denormalize
    torch.testing.assert_close(back, z5, rtol=1e-10, atol=1e-10)
    # Statistics are read off the given VAE's config.
    g = torch.Generator().manual_seed(5)
    m2, s2 = torch.randn(16, generator=g).tolist(), (torch.rand(16, generator=g) + 0.5).tolist()
    got = L.from_vae(backbone, z5, vae=tiny_qwen(m2, s2))
    m2t, s2t = torch.tensor(m2, dtype=torch.float64).view(1, 16, 1, 1), torch.tensor(s2, dtype=torch.float64).view(1, 16, 1, 1)
    torch.testing.assert_close(got, (z5[:, :, 0] - m2t) / s2t, rtol=1e-12, atol=1e-12)


def test_qwenimage_encode_of_a_real_vae_and_bad_frames():
    vae = tiny_qwen()
    with torch.no_grad():
        z = vae.encode(rand(1, 3, 1, 16, 16, dtype=torch.float32)).latent_dist.mode()
    assert z.shape == (1, 16, 1, 8, 8)
    assert L.from_vae("qwenimage", z, vae=vae).shape == (1, 16, 8, 8)
    with pytest.raises(ValueError, match=r"z: a qwenimage image latent has one frame"):
        L.from_vae("qwenimage", rand(1, 16, 2, 4, 4))
    with pytest.raises(ValueError, match="latents_mean"):
        L.from_vae("qwenimage", z, vae=tiny_kl(0.3611, 0.1159))


@pytest.mark.parametrize("backbone,c", [("dinov2", 768), ("siglip", 1152)])
def test_rae_latents_pass_through(backbone, c):
    z = rand(1, c, 2, 3)
    assert torch.equal(L.from_vae(backbone, z), z) and torch.equal(L.to_vae(backbone, z), z)


def test_bad_vae_latents_name_the_argument():
    with pytest.raises(TypeError, match="z: expected a torch.Tensor"):
        L.from_vae("flux", [[0.0]])
    with pytest.raises(TypeError, match="z: expected a floating-point"):
        L.from_vae("flux", torch.zeros(1, 16, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"z: a raw sd3 VAE latent is \[B, 16, h, w\], got shape \(1, 4, 2, 2\)"):
        L.from_vae("sd3", rand(1, 4, 2, 2))
    with pytest.raises(ValueError, match=r"x: a sdxl latent in PiD's frame is \[B, 4, h, w\]"):
        L.to_vae("sdxl", rand(1, 16, 2, 2))


# -- pipeline output ----------------------------------------------------------------------

@pytest.mark.parametrize("hw", [(96, 160), (100, 72)])     # 100 is not a multiple of 16: diffusers floors
def test_flux_tokens_unpack_like_diffusers(hw):
    h, w = hw
    n = (h // 16) * (w // 16)
    tokens = rand(2, n, 64, seed=1)
    got = L.from_pipeline("flux", tokens, height=h, width=w)
    torch.testing.assert_close(got, FluxPipeline._unpack_latents(tokens, h, w, 8), rtol=0, atol=0)
    z = rand(2, 16, 2 * (h // 16), 2 * (w // 16))
    packed = FluxPipeline._pack_latents(z, 2, 16, z.shape[2], z.shape[3])
    assert torch.equal(L.from_pipeline("flux", packed, height=h, width=w), z)


def test_qwenimage_tokens_unpack_like_diffusers():
    tokens = rand(1, 6 * 4, 64, seed=2)
    ref = QwenImagePipeline._unpack_latents(tokens, 96, 64, 8)      # [B, 16, 1, h, w]
    for name in ("qwenimage", "qwenimage-2512"):
        torch.testing.assert_close(L.from_pipeline(name, tokens, height=96, width=64), ref.squeeze(2), rtol=0, atol=0)
        assert torch.equal(L.from_pipeline(name, ref), ref[:, :, 0])


@pytest.mark.parametrize("backbone", ["flux2", "flux2-klein-4b", "flux2-klein-9b"])
def test_flux2_tokens_unpack_like_diffusers(backbone):
    b, h, w = 2, 96, 64                         # pixels; 6 x 4 tokens of 128 channels
    tokens = rand(b, (h // 16) * (w // 16), 128, seed=3)
    # The release's extract_latent: position ids of a dummy [B, 1, H/16, W/16] grid, scattered.
    ids = Flux2Pipeline._prepare_latent_ids(torch.zeros(b, 1, h // 16, w // 16))
    ref = torch.stack(list(Flux2Pipeline._unpack_latents_with_ids(tokens, ids)))
    pipe = types.SimpleNamespace(vae_scale_factor=8)
    torch.testing.assert_close(L.from_pipeline(backbone, tokens, pipe=pipe, height=h, width=w), ref, rtol=0, atol=0)


def test_klein_raw_output_is_normalised_with_the_pipeline_bn():
    """Flux2KleinPipeline's output_type="latent" is the denormalised, unpatchified latent;
    converting it back must give the packed tokens' grid (what the student trained on)."""
    vae = tiny_flux2(seed=7)
    h, w = 64, 96
    tokens = rand(1, (h // 16) * (w // 16), 128, seed=4)
    ids = Flux2KleinPipeline._prepare_latent_ids(torch.zeros(1, 1, h // 16, w // 16))
    grid = Flux2KleinPipeline._unpack_latents_with_ids(tokens, ids, h // 16, w // 16)
    grid = torch.stack(list(grid)) if not isinstance(grid, torch.Tensor) else grid
    # the pipeline's tail before `if output_type == "latent"`
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).double()
    raw = Flux2KleinPipeline._unpatchify_latents(grid * std + vae.bn.running_mean.view(1, -1, 1, 1).double())
    pipe = types.SimpleNamespace(vae=vae, vae_scale_factor=8)
    got = L.from_pipeline("flux2-klein-4b", raw, pipe=pipe)
    torch.testing.assert_close(got, L.from_pipeline("flux2", tokens, height=h, width=w), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match=r"pipe: .*Flux2KleinPipeline.*from_vae\('flux2-klein-4b'"):
        L.from_pipeline("flux2-klein-4b", raw)


def test_siglip_tokens_like_the_release():
    emb = rand(2, 256, 1152, seed=5)
    # scale_rae_generation: reshape(grid, grid, dim).permute(2, 0, 1) per sample
    ref = torch.stack([e.reshape(16, 16, 1152).permute(2, 0, 1) for e in emb])
    assert torch.equal(L.from_pipeline("siglip", emb), ref)
    rect = rand(1, 8 * 4, 1152)
    assert torch.equal(L.from_pipeline("siglip", rect, height=128, width=64),
                       rect[0].reshape(8, 4, 1152).permute(2, 0, 1)[None])
    with pytest.raises(ValueError, match="height/width: 32 siglip tokens are not a square"):
        L.from_pipeline("siglip", rect)


@pytest.mark.parametrize("backbone", ["sd3", "sdxl", "zimage", "zimage-turbo", "dinov2"])
def test_plain_pipelines_pass_through(backbone):
    c = L.get_backbone(backbone).channels
    z = rand(1, c, 2, 3)
    assert L.from_pipeline(backbone, z) is z
    out = types.SimpleNamespace(images=z)       # the pipeline output object itself
    assert L.from_pipeline(backbone, out) is z
    with pytest.raises(ValueError, match=rf"latents: shape \(1, 4, {c}\) is not a {backbone} pipeline latent"):
        L.from_pipeline(backbone, rand(1, 4, c))


def test_bad_pipeline_latents():
    tokens = rand(1, 24, 64)
    with pytest.raises(ValueError, match=r"height/width: flux pipelines return packed tokens.*height= and width="):
        L.from_pipeline("flux", tokens)
    with pytest.raises(ValueError, match=r"latents: 24 tokens do not fill the 4x4"):
        L.from_pipeline("flux", tokens, height=64, width=64)
    with pytest.raises(ValueError, match=r"latents: flux2 tokens carry 128 channels"):
        L.from_pipeline("flux2", tokens, height=96, width=64)
    with pytest.raises(ValueError, match=r"height=96.0: expected a positive int"):
        L.from_pipeline("qwenimage", tokens, height=96.0, width=64)
    with pytest.raises(TypeError, match="latents: expected a torch.Tensor"):
        L.from_pipeline("flux", None)


# -- time frames --------------------------------------------------------------------------

def test_sdxl_euler_sigma_to_training_frame():
    x = rand(3, 4, 2, 2)
    for s in (0.0, 0.3, 14.6):
        got, gs = L.to_pid_frame("sdxl", x, s)
        d = math.sqrt(s * s + 1.0)                  # the release's to_training_frame
        torch.testing.assert_close(got, x / d, rtol=0, atol=1e-15)
        assert isinstance(gs, float) and gs == pytest.approx(s / d, abs=1e-15)
    s = torch.tensor([0.0, 1.0, 10.0])
    got, gs = L.to_pid_frame("sdxl", x, s)
    for i in range(3):
        d = math.sqrt(float(s[i]) ** 2 + 1.0)
        torch.testing.assert_close(got[i], x[i] / d, rtol=1e-7, atol=1e-12)
        assert float(gs[i]) == pytest.approx(float(s[i]) / d, rel=1e-6)
    assert gs.dtype == torch.float32 and (gs <= 1).all()


@pytest.mark.parametrize("backbone", [b for b in ALL if b != "sdxl"])
def test_flow_matching_sigma_passes_through(backbone):
    x = rand(2, L.get_backbone(backbone).channels, 1, 1)
    for s in (0.0, 0.5, torch.tensor([0.2, 1.0])):
        got, gs = L.to_pid_frame(backbone, x, s)
        assert got is x and gs is s


def test_bad_sigmas():
    x = rand(2, 16, 1, 1)
    with pytest.raises(ValueError, match=r"sigma=500.0: .*timestep"):
        L.to_pid_frame("flux", x, 500.0)
    with pytest.raises(ValueError, match="sigma=.*>= 0"):
        L.to_pid_frame("sdxl", x[:, :4], -0.1)
    with pytest.raises(ValueError, match=r"sigma: expected a float or a \[2\] tensor"):
        L.to_pid_frame("sd3", x, torch.zeros(3))
    with pytest.raises(TypeError, match="sigma="):
        L.to_pid_frame("sd3", x, "0.1")


# -- wrong forms reach the decoder's error -------------------------------------------------

@pytest.fixture(scope="module")
def decoders():
    return {base: Decoder(random_net(tiny(base), CPU, torch.float32, seed=1), CPU, torch.float32, "test")
            for base in ("flux-2k", "flux2-2k", "qwenimage-2kto4k-v1.5")}


@pytest.mark.parametrize("base,latent,match", [
    ("flux-2k", rand(1, 4, 16), r"latent: shape \(1, 4, 16\).*from_pipeline\('flux', latents, height=H"),
    ("flux2-2k", rand(1, 4, 128), r"from_pipeline\('flux2'"),
    ("qwenimage-2kto4k-v1.5", rand(1, 16, 1, 2, 2), r"5-D.*from_pipeline\('qwenimage', latents\)"),
    ("flux-2k", rand(1, 16, 1, 2, 2), r"from_pipeline\('qwenimage'"),
    ("flux2-2k", rand(1, 32, 4, 4), r"FLUX.2's raw VAE latent.*from_vae\('flux2', z, vae=vae\)"),
    ("flux2-2k", rand(1, 16, 4, 4), r"16-channel latents come from flux, zimage.*preset_for\('flux'"),
    ("flux-2k", rand(1, 4, 4, 4), r"4-channel latents come from sdxl.*preset_for\('sdxl'"),
])
def test_decoder_names_the_helper(decoders, base, latent, match):
    with pytest.raises(ValueError, match=match):
        decoders[base].decode(latent.float(), 0.0, steps=1, seed=0)


@pytest.mark.parametrize("backbone", ALL)
def test_pipeline_latent_decodes(decoders, backbone):
    """From a pipeline's output form to an image through the preset preset_for names."""
    bb = L.get_backbone(backbone)
    base = pidkern.preset_for(backbone, bb.variants[0])
    if base not in decoders:
        decoders[base] = Decoder(random_net(tiny(base), CPU, torch.float32, seed=1), CPU, torch.float32, "test")
    dec = decoders[base]
    h = w = 16                                     # generator pixels: one 16-px token (order: tests above)
    if bb.packing == "none":
        out = rand(1, bb.channels, h // bb.stride, w // bb.stride, dtype=torch.float32)
    else:
        out = rand(1, 1, bb.channels * 4 if bb.packing == "tokens2x2" else bb.channels, dtype=torch.float32)
    z = L.from_pipeline(backbone, out, height=h, width=w)
    assert z.shape == (1, bb.channels, h // bb.stride, w // bb.stride)
    z, sigma = L.to_pid_frame(backbone, z, 0.25)
    img = dec.decode(z, sigma, steps=1, seed=0)
    cfg = dec.config
    assert img.shape == (1, 3, h * cfg.sr_scale, w * cfg.sr_scale) and torch.isfinite(img).all()
