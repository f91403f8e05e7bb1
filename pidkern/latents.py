"""Every generator backbone's latent and time conventions, as the release defines them.

PiD takes a latent in the frame its student was trained on: the generator's *normalised*
latent (what a diffusers pipeline's `output_type="latent"` denoises), laid out `[B, C, h, w]`,
and a flow-matching noise level `sigma` in [0, 1]. Generators hand latents over in other
forms: FLUX.1 / Qwen-Image pack 2x2 cells into token sequences, FLUX.2 packs its
patchified 128-channel grid into tokens, FLUX.2-klein returns the raw 32-channel VAE
latent, Qwen-Image's VAE is 5-D, a VAE's `encode` gives the unnormalised latent, and
SDXL's Euler scheduler keeps a variance-exploding frame. This module converts each of
them (pure torch; diffusers is never imported here):

    z = pidkern.latents.from_pipeline("flux", out.images, height=1024, width=1024)
    z = pidkern.latents.from_vae("flux2", vae.encode(x).latent_dist.mode(), vae=vae)
    z, sigma = pidkern.latents.to_pid_frame("sdxl", z, euler_sigma)
    preset = pidkern.preset_for("flux2-klein-4b", "2kto4k-v1.5")

Sources of the facts (release `nv-tlabs/PiD`): `pid/_src/inference/pipeline_registry.py`
(channels, scale/shift, BatchNorm and per-channel normalisation, `extract_latent`,
`to_training_frame`), `pid/_src/inference/checkpoint_registry.py` (which checkpoint serves
which backbone), `pid/_src/tokenizers/*` and the diffusers pipelines/VAEs themselves.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import PiDConfig

VARIANTS = ("2k", "2kto4k", "2kto4k-v1.5")

# Qwen-Image's per-channel latent statistics: the release hard-codes them in its 2-D VAE
# tokenizer, equal to AutoencoderKLQwenImage's config defaults (latents_mean / latents_std).
QWENIMAGE_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                          0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
QWENIMAGE_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                         3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass(frozen=True)
class Backbone:
    """One generator's latent convention.

    name: as users name it (`BACKBONES`). family: backbones that share a VAE share it.
    channels: what PiD takes (`[B, channels, h, w]`); vae_channels: what the VAE's
    `encode` gives (FLUX.2: 32 raw channels, patchified 2x2 into 128).
    stride: image pixels per PiD latent cell. norm: "affine" (`(z - shift) * scale`),
    "batchnorm" (FLUX.2: patchify, then the VAE's `bn` running stats), "per_channel"
    (Qwen-Image: `(z - mean) / std`) or "none" (RAE latents come normalised by their own
    stack). packing: the pipeline's `output_type="latent"` form: "tokens2x2" (FLUX.1 /
    Qwen-Image: [B, (h/2)(w/2), 4C], 2x2 cells per token), "tokens" (FLUX.2: [B, h*w, C]),
    "grid_tokens" (Scale-RAE image embeddings [B, h*w, C]) or "none" ([B, C, h, w]).
    time_frame: "flow" (x = (1-s) x0 + s eps, s in [0, 1]) or "euler" (SDXL: x = x0 + s eps,
    s in [0, ~15], see `to_pid_frame`). presets: (variant, pidkern preset) pairs, as the
    release's checkpoint registry serves them.
    """
    name: str
    family: str
    channels: int
    vae_channels: int
    stride: int
    norm: str
    time_frame: str
    packing: str
    presets: tuple[tuple[str, str], ...]
    scale: float = 1.0
    shift: float = 0.0
    scale_from_vae: bool = False       # Z-Image: the release reads scale/shift off vae.config
    temporal: bool = False             # Qwen-Image's VAE works on [B, C, T, h, w]
    vae_class: str | None = None       # the diffusers VAE class of the family
    pipeline_class: str | None = None  # the diffusers pipeline the release generates with

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(v for v, _ in self.presets)

    def preset(self, variant: str = "2k") -> str:
        for v, p in self.presets:
            if v == variant:
                return p
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r}: expected one of {VARIANTS}")
        raise ValueError(f"variant={variant!r}: the release has no {variant} checkpoint for backbone "
                         f"{self.name!r}; it has {list(self.variants)}")


_FLUX_PRESETS = (("2k", "flux-2k"), ("2kto4k-v1.5", "flux-2kto4k-v1.5"))
_FLUX2_PRESETS = (("2k", "flux2-2k"), ("2kto4k-v1.5", "flux2-2kto4k-v1.5"))
_QWEN_PRESETS = (("2kto4k-v1.5", "qwenimage-2kto4k-v1.5"),)


def _flux1(name, pipeline, from_vae=False):
    # FLUX.1's VAE (Z-Image reuses it): scale 0.3611, shift 0.1159.
    return Backbone(name, "flux", 16, 16, 8, "affine", "flow", "tokens2x2" if pipeline == "FluxPipeline" else "none",
                    _FLUX_PRESETS, scale=0.3611, shift=0.1159, scale_from_vae=from_vae,
                    vae_class="AutoencoderKL", pipeline_class=pipeline)


def _flux2(name, pipeline):
    return Backbone(name, "flux2", 128, 32, 16, "batchnorm", "flow", "tokens", _FLUX2_PRESETS,
                    vae_class="AutoencoderKLFlux2", pipeline_class=pipeline)


def _qwen(name):
    return Backbone(name, "qwenimage", 16, 16, 8, "per_channel", "flow", "tokens2x2", _QWEN_PRESETS,
                    temporal=True, vae_class="AutoencoderKLQwenImage", pipeline_class="QwenImagePipeline")


_REGISTRY: dict[str, Backbone] = {b.name: b for b in (
    _flux1("flux", "FluxPipeline"),
    _flux1("zimage", "ZImagePipeline", from_vae=True),
    _flux1("zimage-turbo", "ZImagePipeline", from_vae=True),
    Backbone("sd3", "sd3", 16, 16, 8, "affine", "flow", "none", (("2k", "sd3-2k"), ("2kto4k", "sd3-2kto4k")),
             scale=1.5305, shift=0.0609, vae_class="AutoencoderKL", pipeline_class="StableDiffusion3Pipeline"),
    Backbone("sdxl", "sdxl", 4, 4, 8, "affine", "euler", "none", (("2kto4k", "sdxl-2kto4k"),),
             scale=0.13025, shift=0.0, vae_class="AutoencoderKL", pipeline_class="StableDiffusionXLPipeline"),
    _flux2("flux2", "Flux2Pipeline"),
    _flux2("flux2-klein-4b", "Flux2KleinPipeline"),
    _flux2("flux2-klein-9b", "Flux2KleinPipeline"),
    _qwen("qwenimage"),
    _qwen("qwenimage-2512"),
    # RAE latents: DINOv2-B features normalised by the RAE's own statistics, as its
    # stage-2 sampler produces them; SigLIP-2 image embeddings from Scale-RAE (16 px cells).
    Backbone("dinov2", "dinov2", 768, 768, 16, "none", "flow", "none", (("2k", "dinov2-2k"),)),
    Backbone("siglip", "siglip", 1152, 1152, 16, "none", "flow", "grid_tokens", (("2k", "siglip-2k"),)),
)}

BACKBONES: tuple[str, ...] = tuple(_REGISTRY)


def get_backbone(backbone: str) -> Backbone:
    """The convention of `backbone` (a name in `BACKBONES`); ValueError otherwise."""
    if isinstance(backbone, Backbone):
        return backbone
    if not isinstance(backbone, str) or backbone not in _REGISTRY:
        close = difflib.get_close_matches(str(backbone), BACKBONES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"backbone={backbone!r} is not known{hint}; expected one of {list(BACKBONES)}")
    return _REGISTRY[backbone]


def preset_for(backbone: str, variant: str = "2k") -> str:
    """The pidkern preset (a key of `pidkern.PRESETS`) whose released checkpoint serves `backbone`.

    variant: "2k" (2048-px trained), "2kto4k" (v1 multi-resolution) or "2kto4k-v1.5".
    As the release's checkpoint registry: Z-Image / Z-Image-Turbo use the FLUX.1
    checkpoints, FLUX.2-klein 4B/9B the FLUX.2 ones, Qwen-Image-2512 the Qwen-Image one.
    A variant the backbone has no checkpoint for is a ValueError that lists those it has.
    """
    return get_backbone(backbone).preset(variant)


# -- tensors in ----------------------------------------------------------------------------

def _tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    return x


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Normalisation statistics are float32 buffers; half-precision latents are lifted so
    # the affine maps keep their precision (the decoder takes float32 anyway).
    return torch.promote_types(x.dtype, torch.float32)


def _raw_latent(bb: Backbone, z) -> torch.Tensor:
    if not isinstance(z, torch.Tensor) and callable(getattr(z, "mode", None)):
        z = z.mode()        # a DiagonalGaussianDistribution: the release encodes to its mean
    z = _tensor("z", z)
    if bb.temporal and z.dim() == 5:
        if z.shape[2] != 1:
            raise ValueError(f"z: a {bb.name} image latent has one frame [B, {bb.vae_channels}, 1, h, w], "
                             f"got shape {tuple(z.shape)}")
        z = z[:, :, 0]
    form = f"[B, {bb.vae_channels}, 1, h, w] or [B, {bb.vae_channels}, h, w]" if bb.temporal \
        else f"[B, {bb.vae_channels}, h, w]"
    if z.dim() != 4 or z.shape[1] != bb.vae_channels:
        raise ValueError(f"z: a raw {bb.name} VAE latent is {form}, got shape {tuple(z.shape)}")
    return z


def _config_value(vae, key: str):
    cfg = getattr(vae, "config", None)
    if cfg is None:
        return None
    return cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)


def _affine(bb: Backbone, vae) -> tuple[float, float]:
    if vae is None:
        return bb.scale, bb.shift
    scale, shift = _config_value(vae, "scaling_factor"), _config_value(vae, "shift_factor") or 0.0
    if scale is None:
        raise ValueError(f"vae: {type(vae).__name__} has no config.scaling_factor; expected the {bb.name} "
                         f"{bb.vae_class}")
    if bb.scale_from_vae:
        return float(scale), float(shift)
    if not (math.isclose(scale, bb.scale, rel_tol=1e-6) and math.isclose(shift, bb.shift, abs_tol=1e-6)):
        raise ValueError(f"vae: scaling_factor={scale}, shift_factor={shift} is not the {bb.name} VAE "
                         f"(the release uses scale {bb.scale}, shift {bb.shift})")
    return bb.scale, bb.shift


def _bn_stats(bb: Backbone, vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    bn = getattr(vae, "bn", None)
    if vae is None or bn is None or getattr(bn, "running_mean", None) is None:
        got = "no vae" if vae is None else f"vae={type(vae).__name__} without a `bn` with running stats"
        raise ValueError(f"vae: {bb.name} latents are normalised with the BatchNorm running statistics of "
                         f"its AutoencoderKLFlux2 (`vae.bn`), which the release does not hard-code; "
                         f"pass vae=pipe.vae (got {got})")
    if bn.running_mean.numel() != bb.channels:
        raise ValueError(f"vae: bn has {bn.running_mean.numel()} channels; {bb.name} needs {bb.channels} "
                         f"({bb.vae_channels} latent channels x 2x2 patches)")
    dt = _compute_dtype(like)
    # std formed in the buffers' own dtype, then cast: as the release and diffusers do
    std = torch.sqrt(bn.running_var.detach() + bn.eps).to(like.device, dt).view(1, -1, 1, 1)
    return bn.running_mean.detach().to(like.device, dt).view(1, -1, 1, 1), std


def _mean_std(bb: Backbone, vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = QWENIMAGE_LATENTS_MEAN, QWENIMAGE_LATENTS_STD
    if vae is not None:
        mean, std = _config_value(vae, "latents_mean"), _config_value(vae, "latents_std")
        if mean is None or std is None or len(mean) != bb.vae_channels or len(std) != bb.vae_channels:
            raise ValueError(f"vae: {type(vae).__name__} has no {bb.vae_channels}-entry config.latents_mean / "
                             f"latents_std; expected the {bb.name} {bb.vae_class}")
    dt = _compute_dtype(like)
    shape = (1, bb.vae_channels, 1, 1)
    return (torch.tensor(mean, dtype=dt, device=like.device).view(shape),
            torch.tensor(std, dtype=dt, device=like.device).view(shape))


# -- VAE frame <-> PiD frame ----------------------------------------------------------------

def from_vae(backbone: str, z, *, vae=None) -> torch.Tensor:
    """A raw VAE latent (`vae.encode(x).latent_dist`, before any scaling) to PiD's frame.

    z: `[B, C_vae, h, w]` (Qwen-Image also `[B, 16, 1, h, w]`), or the latent_dist itself
    (its mode is taken, as the release encodes). Returns `[B, C, h', w']` in float32 (or
    float64 for a float64 `z`):
      - FLUX.1, Z-Image, SD3, SDXL: `(z - shift) * scale` (FLUX.1 0.3611 / 0.1159, SD3
        1.5305 / 0.0609, SDXL 0.13025 / 0). A given `vae` must carry these values in its
        config (Z-Image: the release reads them off `vae.config`, so they are used).
      - FLUX.2 (and klein): 2x2 patchify `[B, 32, h, w] -> [B, 128, h/2, w/2]`, then
        `(p - bn.running_mean) / sqrt(bn.running_var + bn.eps)` with `vae.bn` of the
        AutoencoderKLFlux2; `vae` is required (the release keeps no copy of the stats).
      - Qwen-Image: `(z - latents_mean) / latents_std` per channel (from `vae.config`, else
        the release's constants), the frame axis dropped.
      - DINOv2 / SigLIP: the RAE stack's latent is already what PiD takes; returned as is.
    """
    bb = get_backbone(backbone)
    z = _raw_latent(bb, z)
    x = z.to(_compute_dtype(z))
    if bb.norm == "affine":
        scale, shift = _affine(bb, vae)
        return (x - shift) * scale
    if bb.norm == "batchnorm":
        if x.shape[-2] % 2 or x.shape[-1] % 2:
            raise ValueError(f"z: a {bb.name} latent patchifies 2x2, so h and w must be even; got shape "
                             f"{tuple(z.shape)}")
        mean, std = _bn_stats(bb, vae, x)
        return (F.pixel_unshuffle(x, 2) - mean) / std
    if bb.norm == "per_channel":
        mean, std = _mean_std(bb, vae, x)
        return (x - mean) * (1.0 / std)      # the release and diffusers scale by 1/std
    return x


def to_vae(backbone: str, x, *, vae=None) -> torch.Tensor:
    """The exact inverse of `from_vae`: a PiD-frame latent `[B, C, h, w]` to the raw VAE latent
    its `vae.decode` takes (FLUX.2: `[B, 32, 2h, 2w]`; Qwen-Image: `[B, 16, 1, h, w]`).
    Same `vae` rules as `from_vae`."""
    bb = get_backbone(backbone)
    x = _tensor("x", x)
    if x.dim() != 4 or x.shape[1] != bb.channels:
        raise ValueError(f"x: a {bb.name} latent in PiD's frame is [B, {bb.channels}, h, w], got shape "
                         f"{tuple(x.shape)}")
    x = x.to(_compute_dtype(x))
    if bb.norm == "affine":
        scale, shift = _affine(bb, vae)
        return x / scale + shift
    if bb.norm == "batchnorm":
        mean, std = _bn_stats(bb, vae, x)
        return F.pixel_shuffle(x * std + mean, 2)
    if bb.norm == "per_channel":
        mean, std = _mean_std(bb, vae, x)
        return (x * std + mean).unsqueeze(2)
    return x


# -- pipeline output -> PiD frame -------------------------------------------------------------

def _image_size(bb: Backbone, latents: torch.Tensor, height, width) -> tuple[int, int]:
    if height is None or width is None:
        raise ValueError(f"height/width: {bb.name} pipelines return packed tokens of shape "
                         f"{tuple(latents.shape)}; unpacking needs the generated image's size in pixels: pass "
                         f"height= and width= as given to the pipeline (diffusers' default is "
                         f"pipe.default_sample_size * pipe.vae_scale_factor, 1024)")
    for arg, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{arg}={v!r}: expected a positive int (pixels)")
    return height, width


def _vae_scale_factor(bb: Backbone, pipe) -> int:
    vsf = getattr(pipe, "vae_scale_factor", None) if pipe is not None else None
    return int(vsf) if vsf else bb.stride // (2 if bb.norm == "batchnorm" else 1)


def _tokens_to_grid(tokens: torch.Tensor, h: int, w: int, what: str) -> torch.Tensor:
    b, n, c = tokens.shape
    if n != h * w:
        raise ValueError(f"latents: {n} tokens do not fill the {h}x{w} token grid of {what}; check height/width")
    return tokens.transpose(1, 2).reshape(b, c, h, w)


def from_pipeline(backbone: str, latents, *, pipe=None, height: int | None = None,
                  width: int | None = None) -> torch.Tensor:
    """A diffusers pipeline's `output_type="latent"` result (final or a callback's
    intermediate `latents`) to PiD's frame `[B, C, h, w]`.

    latents: the tensor, or the pipeline output object (its `.images` is taken).
    height, width: the generated image's size in pixels, as passed to the pipeline; needed
    to unpack token sequences. pipe: the pipeline; its `vae_scale_factor` (else 8) and, for
    FLUX.2-klein's raw output, its `vae.bn` statistics are read. Per backbone:
      - flux: `[B, (H/16)(W/16), 64]` tokens (2x2 cells per token) -> `[B, 16, H/8, W/8]`;
        needs height, width.
      - flux2 / flux2-klein-*: `[B, (H/16)(W/16), 128]` tokens -> `[B, 128, H/16, W/16]`
        (needs height, width); Flux2KleinPipeline's final output is the raw, denormalised
        `[B, 32, H/8, W/8]` VAE latent: patchified and BatchNorm-normalised as `from_vae`
        (needs pipe).
      - qwenimage / qwenimage-2512: `[B, (H/16)(W/16), 64]` tokens (needs height, width) or
        `[B, 16, 1, h, w]` -> `[B, 16, H/8, W/8]`.
      - siglip: Scale-RAE embeddings `[B, N, 1152]` in raster order -> `[B, 1152, H/16, W/16]`
        (height, width, else a square grid as the release assumes).
      - sd3, sdxl, zimage, zimage-turbo, dinov2: already `[B, C, h, w]`.
    A latent already in PiD's form `[B, C, h, w]` passes through for every backbone.
    The time frame is untouched: see `to_pid_frame` for an intermediate latent's sigma.
    """
    bb = get_backbone(backbone)
    if not isinstance(latents, torch.Tensor) and isinstance(getattr(latents, "images", None), torch.Tensor):
        latents = latents.images
    latents = _tensor("latents", latents)
    if latents.dim() == 4 and latents.shape[1] == bb.channels:
        return latents
    if latents.dim() == 3 and bb.packing in ("tokens2x2", "tokens"):
        h_px, w_px = _image_size(bb, latents, height, width)
        cell = 2 * _vae_scale_factor(bb, pipe)      # pixels per token, as diffusers packs them
        h, w = h_px // cell, w_px // cell
        per_token = bb.channels * 4 if bb.packing == "tokens2x2" else bb.channels
        if latents.shape[2] != per_token:
            raise ValueError(f"latents: {bb.name} tokens carry {per_token} channels, got shape "
                             f"{tuple(latents.shape)}")
        grid = _tokens_to_grid(latents, h, w, f"a {h_px}x{w_px} image")
        return F.pixel_shuffle(grid, 2) if bb.packing == "tokens2x2" else grid
    if latents.dim() == 3 and bb.packing == "grid_tokens" and latents.shape[2] == bb.channels:
        n = latents.shape[1]
        if height is not None or width is not None:
            h_px, w_px = _image_size(bb, latents, height, width)
            h, w = h_px // bb.stride, w_px // bb.stride
        else:
            h = w = math.isqrt(n)
            if h * h != n:
                raise ValueError(f"height/width: {n} {bb.name} tokens are not a square grid; pass the "
                                 f"image's height= and width= in pixels")
        return _tokens_to_grid(latents, h, w, f"{bb.name} embeddings")
    if latents.dim() == 5 and bb.temporal and latents.shape[1] == bb.channels:
        if latents.shape[2] != 1:
            raise ValueError(f"latents: a {bb.name} image latent has one frame, got shape {tuple(latents.shape)}")
        return latents[:, :, 0]
    if latents.dim() == 4 and bb.norm == "batchnorm" and latents.shape[1] == bb.vae_channels:
        if pipe is None or getattr(pipe, "vae", None) is None:
            raise ValueError(f"pipe: a [B, {bb.vae_channels}, h, w] {bb.name} latent is Flux2KleinPipeline's raw "
                             f"VAE output; normalising it needs the pipeline's vae.bn statistics: pass pipe=, or "
                             f"use pidkern.latents.from_vae({bb.name!r}, z, vae=vae)")
        return from_vae(bb, latents, vae=pipe.vae)
    raise ValueError(f"latents: shape {tuple(latents.shape)} is not a {bb.name} pipeline latent; expected "
                     f"{_pipeline_forms(bb)}")


def _pipeline_forms(bb: Backbone) -> str:
    forms = [f"[B, {bb.channels}, h, w]"]
    if bb.packing == "tokens2x2":
        forms.append(f"tokens [B, L, {bb.channels * 4}]")
    if bb.packing in ("tokens", "grid_tokens"):
        forms.append(f"tokens [B, L, {bb.channels}]")
    if bb.temporal:
        forms.append(f"[B, {bb.channels}, 1, h, w]")
    if bb.norm == "batchnorm":
        forms.append(f"the raw [B, {bb.vae_channels}, 2h, 2w] with pipe=")
    return " or ".join(forms)


# -- time frames ------------------------------------------------------------------------------

def to_pid_frame(backbone: str, latent: torch.Tensor, sigma):
    """Map an intermediate latent and its scheduler sigma to the frame PiD was trained on.

    Flow-matching backbones (all but SDXL) already sit at `x = (1 - s) x0 + s eps` with
    `s` in [0, 1] (diffusers' FlowMatch schedulers' `sigmas`; RAE's `t`): returned as is.
    SDXL's EulerDiscreteScheduler keeps `x = x0 + s eps` with `s = scheduler.sigmas[i]` in
    [0, ~15]; its PiD student was trained on the variance-preserving frame, so, as the
    release's `to_training_frame`: `x / sqrt(s^2 + 1)` and `s / sqrt(s^2 + 1)`.
    sigma: a float or a `[B]` tensor (one per sample); it comes back in the same kind.
    latent: `[B, C, h, w]` in PiD's layout (`from_pipeline` first if packed).
    """
    bb = get_backbone(backbone)
    latent = _tensor("latent", latent)
    is_tensor = isinstance(sigma, torch.Tensor)
    if isinstance(sigma, bool) or not (is_tensor or isinstance(sigma, (int, float))):
        raise TypeError(f"sigma={sigma!r}: expected a float or a [B] tensor")
    s = torch.as_tensor(sigma, dtype=torch.float64).detach().cpu()
    if s.dim() > 1 or (s.dim() == 1 and s.shape[0] != latent.shape[0]):
        raise ValueError(f"sigma: expected a float or a [{latent.shape[0]}] tensor, got shape {tuple(s.shape)}")
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError(f"sigma={s.tolist()}: must be finite and >= 0")
    if bb.time_frame == "flow":
        if (s > 1).any():
            raise ValueError(f"sigma={s.tolist()}: a {bb.name} flow-matching sigma lies in [0, 1] (a timestep "
                             f"t*1000 is not a sigma: divide by 1000)")
        return latent, sigma
    denom = torch.sqrt(s * s + 1.0)
    if is_tensor:
        d = denom.to(latent.device, _compute_dtype(latent)).view(-1, *([1] * (latent.dim() - 1)))
        return latent / d, (s / denom).to(sigma.device, sigma.dtype if sigma.is_floating_point() else torch.float32)
    d = float(denom)
    return latent / d, float(sigma) / d


# -- wrong forms -------------------------------------------------------------------------------

def explain_wrong_form(latent, config: PiDConfig) -> str | None:
    """Why `latent` is clearly not in the form a decoder of `config` takes, naming the
    helper that converts it; None when it looks right (or no helper applies)."""
    if not isinstance(latent, torch.Tensor):
        return None
    served = [b.name for b in _REGISTRY.values() if config.name in dict(b.presets).values()]
    if not served:      # a tiny or custom config: its channel count still says the family
        served = [b.name for b in _REGISTRY.values() if b.channels == config.latent_channels]
    example = served[0] if served else "<backbone>"
    if latent.dim() == 3:
        return (f"a 3-D latent looks like a diffusers pipeline's packed token sequence [B, L, C]; convert it "
                f"with pidkern.latents.from_pipeline({example!r}, latents, height=H, width=W) (H, W: the "
                f"generated image's size in pixels)")
    if latent.dim() == 5:
        qwen = example if example.startswith("qwenimage") else "qwenimage"
        return (f"a 5-D latent [B, C, T, h, w] looks like Qwen-Image's video-VAE form; convert it with "
                f"pidkern.latents.from_pipeline({qwen!r}, latents) (pipeline output) or "
                f"pidkern.latents.from_vae({qwen!r}, z) (a raw AutoencoderKLQwenImage latent)")
    if latent.dim() != 4 or latent.shape[1] == config.latent_channels:
        return None
    c = latent.shape[1]
    bn = [n for n in served if _REGISTRY[n].norm == "batchnorm" and _REGISTRY[n].vae_channels == c]
    if bn:
        return (f"a {c}-channel latent is FLUX.2's raw VAE latent (e.g. Flux2KleinPipeline's output); patchify "
                f"and normalise it with pidkern.latents.from_vae({bn[0]!r}, z, vae=vae) (vae: its "
                f"AutoencoderKLFlux2, whose bn statistics normalise it)")
    others = [b.name for b in _REGISTRY.values() if b.channels == c]
    if others:
        return (f"{c}-channel latents come from {', '.join(others)}; the preset for them is "
                f"pidkern.preset_for({others[0]!r}, variant)")
    return None


__all__ = ["BACKBONES", "Backbone", "QWENIMAGE_LATENTS_MEAN", "QWENIMAGE_LATENTS_STD", "VARIANTS",
           "explain_wrong_form", "from_pipeline", "from_vae", "get_backbone", "preset_for", "to_pid_frame",
           "to_vae"]
