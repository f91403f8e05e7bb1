"""From a diffusers pipeline, or from an image, to PiD's 4x image in one call.

    pipe = diffusers.FluxPipeline.from_pretrained(...)
    dec = pidkern.load(CKPT, text_encoder=GEMMA_DIR)
    images = pidkern.generate(pipe, "a cat", dec)                  # list of PIL images
    images = pidkern.upscale("photo.png", dec, vae)                # 4x, cropped to the input

diffusers, transformers and PIL are imported inside the functions: `import pidkern`
must not pull them in (`pip install "pidkern[diffusers]"` brings them).

What follows the release (GitHub nv-tlabs/PiD, `pid/_src/inference/`):
- The early exit (`step_capture.py`): after step `i` the pipeline's latent sits at the
  scheduler's `sigmas[i + 1]`; that latent and that sigma go to PiD. SDXL's Euler-frame
  latent and sigma both change frame (`pidkern.latents.to_pid_frame`).
- From a clean image (`from_clean.py`, `decoder.add_noise`): the VAE encodes the mean of
  its posterior; `degrade_sigma > 0` mixes seeded Gaussian noise in, flow-matching
  `(1 - s) z + s eps`, SDXL variance-preserving `sqrt(1 - s^2) z + s eps`, drawn in float32
  from a generator seeded with `seed + i` for the i-th image, which PiD then decodes with
  the same seed `seed + i`.
- Where this module differs: the release centre-crops an image to a multiple of 16; here
  it is padded (edge pixels repeated, bottom and right only) and the result cropped back,
  so the output is exactly `sr_scale` times the input with no shift.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch

OUTPUT_TYPES = ("pil", "pt")


# ---------------------------------------------------------------------------------------
# Which backbone: pidkern.latents' registry knows each one's pipeline class, VAE class,
# VAE scale/shift and checkpoints.

def pipeline_backbone(pipe) -> str:
    """The backbone of a diffusers pipeline, from its class name: the backbone whose
    pipeline class it is, or whose class stem it starts with (FluxImg2ImgPipeline: flux).
    The longest stem wins (Flux2KleinPipeline is FLUX.2-klein, not FLUX.1); backbones that
    share a pipeline class share their latent conventions, so the first is taken."""
    from .latents import BACKBONES, get_backbone
    name = type(pipe).__name__
    best, best_len = None, 0
    for b in BACKBONES:
        cls = get_backbone(b).pipeline_class
        stem = cls.removesuffix("Pipeline") if cls else None
        if stem and name.startswith(stem) and len(stem) > best_len:
            best, best_len = b, len(stem)
    if best is None:
        known = sorted({get_backbone(b).pipeline_class for b in BACKBONES} - {None})
        raise ValueError(f"pipe: cannot tell the backbone of a {name}; expected one of {', '.join(known)} "
                         f"(or a variant of one), or pass backbone=")
    return best


def decoder_backbones(decoder) -> tuple[str, ...] | None:
    """The backbones whose released checkpoint the decoder's preset is (as the release's
    checkpoint registry serves them), or None for a config that is no released preset."""
    from .latents import BACKBONES, get_backbone
    preset = decoder.config.name.removeprefix("tiny-")   # config.tiny keeps its base preset's name
    return tuple(b for b in BACKBONES if preset in dict(get_backbone(b).presets).values()) or None


def check_backbone(backbone, decoder, what: str) -> str:
    """`backbone` if it names a known backbone that `decoder` serves, else ValueError
    naming `what` (the argument the caller took it from)."""
    from .latents import get_backbone
    get_backbone(backbone)      # an unknown name: ValueError listing the known ones
    served = decoder_backbones(decoder)
    if served is not None and backbone not in served:
        raise ValueError(f"{what}: the {backbone!r} backbone does not match the decoder {decoder.config.name}, "
                         f"which serves {', '.join(served)}; load the checkpoint for {backbone} "
                         f"(pidkern.preset_for({backbone!r}))")
    return backbone


def vae_backbones(vae) -> tuple[str, ...]:
    """The backbones whose latents a diffusers VAE makes: its class, and for AutoencoderKL
    its channel count and scale/shift (FLUX.1 and SD3 VAEs differ only there)."""
    from .latents import BACKBONES, get_backbone
    name = type(vae).__name__
    cfg = getattr(vae, "config", None)
    found = []
    for b in BACKBONES:
        bb = get_backbone(b)
        if bb.vae_class != name:
            continue
        if bb.norm == "affine" and not (
                getattr(cfg, "latent_channels", None) == bb.vae_channels
                and math.isclose(getattr(cfg, "scaling_factor", None) or 0.0, bb.scale, rel_tol=1e-6)
                and math.isclose(getattr(cfg, "shift_factor", None) or 0.0, bb.shift, abs_tol=1e-6)):
            continue
        found.append(b)
    if not found:
        what = (f"an AutoencoderKL with {cfg.latent_channels} latent channels, scaling_factor "
                f"{cfg.scaling_factor} and shift_factor {cfg.shift_factor}") if name == "AutoencoderKL" else f"a {name}"
        raise ValueError(f"vae: {what} is not a VAE PiD was trained on; expected the AutoencoderKL of FLUX.1 / "
                         f"Z-Image, SD3 or SDXL, an AutoencoderKLFlux2 or an AutoencoderKLQwenImage")
    return tuple(found)


def _vae_backbone(vae, decoder, backbone) -> str:
    """The backbone an image is upscaled as: the one the VAE and the decoder share."""
    made = vae_backbones(vae)
    if backbone is not None:
        check_backbone(backbone, decoder, "backbone")
        if backbone not in made:
            raise ValueError(f"vae: this {type(vae).__name__} makes {', '.join(made)} latents, not {backbone!r} ones")
        return backbone
    served = decoder_backbones(decoder)
    both = [b for b in made if served is None or b in served]
    if not both:
        raise ValueError(f"vae: a {type(vae).__name__} ({', '.join(made)} latents) does not match the decoder "
                         f"{decoder.config.name}, which decodes {', '.join(served)} latents; pass the VAE of "
                         f"that backbone")
    return both[0]   # backbones that share a VAE share its latent conventions


# ---------------------------------------------------------------------------------------
# Small checks shared by the entry points.

def _check_choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {choices}")
    return value


def _check_sigma(value, name) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value!r}: expected a float in [0, 1]")
    return float(value)


def _prompts(prompt, batch: int | None = None, name: str = "prompt") -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts) or not prompts:
        raise TypeError(f"{name}={prompt!r}: expected a str or a non-empty list of str")
    prompts = list(prompts)
    if batch is not None and len(prompts) != batch:
        if len(prompts) != 1:
            raise ValueError(f"{name}: {len(prompts)} captions for a batch of {batch}; give one, or one per image")
        prompts = prompts * batch
    return prompts


def _text_kwargs(decoder, prompts: list[str]) -> dict:
    """How a decode gets its captions: through the decoder's encoder; without one, empty
    captions take the documented zeros fallback (said aloud), others fail in Decoder.decode
    with its message."""
    if getattr(decoder, "text_encoder", None) is None and not any(prompts):
        warnings.warn("the decoder has no caption encoder: decoding with zero caption embeddings, which are not "
                      "the release's empty caption (pidkern.load(..., text_encoder=...) fixes that)", stacklevel=3)
        return {}
    return {"prompt": prompts}


def _output(images: torch.Tensor, output_type: str):
    if output_type == "pt":
        return list(images.float().cpu())
    from .api import to_pil
    return to_pil(images)


# ---------------------------------------------------------------------------------------
# From a generator.

class EarlyExit:
    """A `callback_on_step_end` that stops a diffusers pipeline once its latent is at
    `stop_sigma` or below (in PiD's frame) and keeps that latent and its sigma.

    After step `i` the latent sits at `scheduler.sigmas[scheduler.step_index]`
    (`sigmas[i + 1]` when the loop starts at 0, as the release's XtCaptureCallback reads
    it). Stopping sets `pipe._interrupt`: diffusers' loops skip the remaining steps.
    """

    def __init__(self, stop_sigma: float, backbone: str, then=None):
        self.stop_sigma = stop_sigma
        self.backbone = backbone
        self.then = then              # a user's own callback, run first
        self.latents = None           # the pipeline's latent (its own form and frame)
        self.sigma = None             # the scheduler's sigma of that latent
        self.step = None              # steps run

    def __call__(self, pipe, i, t, callback_kwargs):
        from .latents import to_pid_frame
        if self.then is not None:
            callback_kwargs = self.then(pipe, i, t, callback_kwargs)
        if self.latents is not None:
            return callback_kwargs
        sched = pipe.scheduler
        idx = getattr(sched, "step_index", None)
        sigmas = sched.sigmas
        sigma = float(sigmas[min(i + 1 if idx is None else idx, len(sigmas) - 1)])
        latents = callback_kwargs["latents"]
        _, pid_sigma = to_pid_frame(self.backbone, latents, sigma)
        if float(pid_sigma) <= self.stop_sigma:
            self.latents, self.sigma, self.step = latents.detach().clone(), sigma, i + 1
            pipe._interrupt = True
        return callback_kwargs


def offload_generator(pipe) -> list[str]:
    """Move the pipeline's denoiser and text encoders to the CPU (PiD needs the memory;
    the VAE stays: `upscale` and a baseline decode use it). Modules that diffusers'
    own CPU offload manages are left to it. Returns the names moved."""
    moved = []
    for name in ("transformer", "unet", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if not isinstance(module, torch.nn.Module) or hasattr(module, "_hf_hook"):
            continue
        if any(p.device.type != "cpu" for p in module.parameters()):
            module.to("cpu")
            moved.append(name)
    if moved and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return moved


def _memory_short(decoder, batch: int, hw) -> bool:
    """Whether the decode would not fit beside the decoder's weights (memory.shortfall)."""
    from .memory import shortfall
    return shortfall(decoder.config, decoder.device, batch, *hw) > 0


def _decode(decoder, latent, sigma, captions, seed, pipe=None, offload=None, decode_kwargs=None):
    """PiD on a latent already in its frame, after moving the generator off the GPU if asked
    (offload=True) or needed (None and the decode would not fit)."""
    if pipe is not None and (offload or (offload is None and _memory_short(
            decoder, latent.shape[0], decoder.output_size(latent.shape[-2:])))):
        offload_generator(pipe)
    return decoder.decode(latent, sigma, seed=seed, **_text_kwargs(decoder, captions), **(decode_kwargs or {}))


def _generator_size(pipe, pipe_kwargs) -> tuple[int | None, int | None]:
    """The generator's image size: the call's height/width, else the pipeline's default."""
    default = None
    if getattr(pipe, "default_sample_size", None) and getattr(pipe, "vae_scale_factor", None):
        default = pipe.default_sample_size * pipe.vae_scale_factor
    return pipe_kwargs.get("height") or default, pipe_kwargs.get("width") or default


def decode_pipeline_latents(pipe, latents, decoder, prompt, sigma: float = 0.0, *, backbone: str | None = None,
                            height: int | None = None, width: int | None = None, seed: int | None = None,
                            offload: bool | None = None, output_type: str = "pil", decode_kwargs: dict | None = None):
    """Decode what a diffusers pipeline returned with `output_type="latent"` (or a latent
    captured from its step callback) with PiD.

    pipe: the pipeline (its class names the backbone; FLUX.2-klein's raw output is
        normalised with its VAE); None needs `backbone=`.
    latents: the pipeline's latent as it gave it (packed FLUX / FLUX.2 / Qwen-Image token
        sequences included); `height`/`width`: the generator's image size, needed to unpack
        them.
    sigma: the scheduler's sigma of that latent (0 for a finished run); SDXL's Euler sigma
        is converted to PiD's frame together with the latent.
    prompt: the caption(s), encoded by the decoder's caption encoder.
    offload: move the generator's transformer and text encoders to the CPU first; None: only
        when the decode would not fit in the free GPU memory.
    Returns a list of PIL images (output_type="pil") or of [3, H, W] tensors in [-1, 1] ("pt").
    """
    from .latents import from_pipeline, to_pid_frame
    if pipe is None and backbone is None:
        raise ValueError("backbone: needed when pipe is None (e.g. backbone='flux')")
    backbone = check_backbone(backbone or pipeline_backbone(pipe), decoder, "pipe")
    _check_choice(output_type, "output_type", OUTPUT_TYPES)
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents: expected the pipeline's latent tensor, got {type(latents).__name__}")
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma={sigma!r}: expected the scheduler's sigma of the latent, finite and >= 0")
    latent = from_pipeline(backbone, latents, pipe=pipe, height=height, width=width)
    latent, sigma = to_pid_frame(backbone, latent, sigma)
    images = _decode(decoder, latent, float(sigma), _prompts(prompt, latent.shape[0]), seed, pipe, offload,
                     decode_kwargs)
    return _output(images, output_type)


def generate(pipe, prompt, decoder, *, backbone: str | None = None, stop_sigma: float | None = None,
             degrade_sigma: float = 0.0, seed: int | None = None, offload: bool | None = None,
             output_type: str = "pil", decode_kwargs: dict | None = None, **pipe_kwargs):
    """Run a diffusers pipeline (FLUX.1, Z-Image, SD3, SDXL, FLUX.2 incl. Klein, Qwen-Image)
    and decode its latent with PiD instead of the VAE.

    backbone: default from the pipeline's class. stop_sigma: stop the generator as soon as
        its latent is at this noise level or below, in PiD's frame (SDXL: the variance-
        preserving sigma), and hand PiD that partly denoised latent and its sigma (the
        paper's early exit). degrade_sigma: noise the final latent to this level first
        (seeded with `seed`, as `upscale` does), for studies of PiD's robustness.
    seed: seeds both the generator (a torch.Generator on the pipeline's device, unless
        `generator=` is given) and PiD's noise. offload: see decode_pipeline_latents.
    decode_kwargs: extra arguments of Decoder.decode (steps, backend, progress, ...).
    Other keyword arguments go to the pipeline (height, width, num_inference_steps, ...).
    Returns a list of PIL images (output_type="pil") or of [3, H, W] tensors ("pt").
    """
    from .sampler import make_generator, resolve_seed
    backbone = check_backbone(backbone or pipeline_backbone(pipe), decoder, "pipe")
    if stop_sigma is not None:
        stop_sigma = _check_sigma(stop_sigma, "stop_sigma")
    degrade_sigma = _check_sigma(degrade_sigma, "degrade_sigma")
    if stop_sigma is not None and degrade_sigma > 0:
        raise ValueError("degrade_sigma: give either stop_sigma (a latent the generator left noisy) or "
                         "degrade_sigma (noise added to the finished latent), not both")
    if "output_type" in pipe_kwargs:
        raise ValueError(f"output_type={pipe_kwargs['output_type']!r} goes to PiD (\"pil\" or \"pt\"); the "
                         f"pipeline always runs with output_type=\"latent\"")
    _check_choice(output_type, "output_type", OUTPUT_TYPES)
    prompts = _prompts(prompt)
    seed = resolve_seed(seed)
    if pipe_kwargs.get("generator") is None:
        try:
            device = pipe._execution_device
        except Exception:   # a pipeline without modules on a device
            device = torch.device("cpu")
        pipe_kwargs["generator"] = make_generator(seed, torch.device(device))
    exit_ = None
    if stop_sigma is not None:
        exit_ = EarlyExit(stop_sigma, backbone, then=pipe_kwargs.pop("callback_on_step_end", None))
        inputs = list(pipe_kwargs.pop("callback_on_step_end_tensor_inputs", None) or [])
        pipe_kwargs["callback_on_step_end"] = exit_
        pipe_kwargs["callback_on_step_end_tensor_inputs"] = inputs + ["latents"] * ("latents" not in inputs)
    out = pipe(prompt=prompts if len(prompts) > 1 else prompts[0], output_type="latent", **pipe_kwargs)
    latents = out.images if hasattr(out, "images") else out[0]
    sigma = 0.0
    if exit_ is not None and exit_.latents is not None:
        latents, sigma = exit_.latents, exit_.sigma
    per_prompt = latents.shape[0] // len(prompts)
    captions = [p for p in prompts for _ in range(per_prompt)]   # diffusers keeps each prompt's images together
    height, width = _generator_size(pipe, pipe_kwargs)
    if degrade_sigma > 0:
        from .latents import from_pipeline
        latent = from_pipeline(backbone, latents, pipe=pipe, height=height, width=width)
        latent = degrade(latent, degrade_sigma, backbone, make_generator(seed, latent.device))
        return _output(_decode(decoder, latent, degrade_sigma, captions, seed, pipe, offload, decode_kwargs),
                       output_type)
    return decode_pipeline_latents(pipe, latents, decoder, captions, sigma, backbone=backbone, height=height,
                                   width=width, seed=seed, offload=offload, output_type=output_type,
                                   decode_kwargs=decode_kwargs)


# ---------------------------------------------------------------------------------------
# From an image.

def degrade(latent: torch.Tensor, sigma: float, backbone: str, generator: torch.Generator) -> torch.Tensor:
    """A clean PiD-frame latent noised to `sigma` as the release's `add_noise` does:
    flow matching `(1 - s) z + s eps`; SDXL (variance preserving) `sqrt(1 - s^2) z + s eps`.
    eps is float32 [B, C, h, w] from `generator`; sigma 0 returns the latent unchanged."""
    if sigma <= 0:
        return latent
    z = latent.float()
    eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=torch.float32)
    keep = math.sqrt(max(0.0, 1.0 - sigma * sigma)) if backbone == "sdxl" else 1.0 - sigma
    return keep * z + sigma * eps


def _image_tensor(img, name: str) -> torch.Tensor:
    """One image as float32 [1, 3, H, W] in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError
    if isinstance(img, (str, Path)):
        p = Path(img)
        if not p.exists():
            raise FileNotFoundError(f"{name} {str(p)!r} does not exist")
        if p.is_dir():
            raise ValueError(f"{name} {str(p)!r} is a directory; expected an image file")
        try:
            with Image.open(p) as opened:
                img = opened.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ValueError(f"{name} {str(p)!r}: cannot read it as an image ({type(e).__name__}: "
                             f"{str(e)[:160]})") from None
    if isinstance(img, Image.Image):
        import numpy as np
        arr = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy())
        return arr.permute(2, 0, 1).unsqueeze(0).float() / 127.5 - 1.0
    if isinstance(img, torch.Tensor):
        t = img.unsqueeze(0) if img.dim() == 3 else img
        if t.dim() != 4 or t.shape[1] != 3:
            raise ValueError(f"{name}: expected a [3, H, W] or [B, 3, H, W] tensor (channels first), got shape "
                             f"{tuple(img.shape)}")
        if t.dtype == torch.uint8:
            return t.float() / 127.5 - 1.0
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a uint8 or floating-point tensor, got {t.dtype}")
        t = t.float()
        if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
            raise ValueError(f"{name}: a float image must hold values in [0, 1] (got {float(t.min()):.3g} to "
                             f"{float(t.max()):.3g}); for a [-1, 1] image pass (x + 1) / 2")
        return t * 2.0 - 1.0
    raise TypeError(f"{name}: expected a PIL image, a path, or a uint8 / float tensor, got {type(img).__name__}")


def load_images(image, name: str = "image") -> list[torch.Tensor]:
    """PIL image, path, tensor [3, H, W] / [B, 3, H, W] (uint8, or float in [0, 1]), or a
    list of those -> a list of float32 [1, 3, H, W] images in [-1, 1]."""
    items = image if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise ValueError(f"{name}: an empty list")
    out = []
    for k, item in enumerate(items):
        t = _image_tensor(item, name if len(items) == 1 else f"{name}[{k}]")
        out.extend(t[j:j + 1] for j in range(t.shape[0]))
    return out


def pad_multiple(decoder) -> int:
    """Image sides must be multiples of this: whole latent cells, and whole PiD patches
    in the sr_scale-times larger output."""
    cfg = decoder.config
    return math.lcm(cfg.latent_stride, cfg.patch // math.gcd(cfg.patch, cfg.sr_scale))


def pad_image(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad [B, 3, H, W] at the bottom and right, repeating the edge pixels, to multiples
    of `multiple` (top-left stays put, so cropping the output undoes it exactly)."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return x
    return torch.nn.functional.pad(x, (0, pw, 0, ph), mode="replicate")


@torch.inference_mode()
def encode_image(vae, x: torch.Tensor, backbone: str) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> the VAE's raw latent (the posterior's mean, as the release
    encodes), float32, in the latent form pidkern.latents.from_vae takes."""
    p = next(vae.parameters())
    inp = x.to(p.device, p.dtype)
    five_d = type(vae).__name__ == "AutoencoderKLQwenImage"   # a video VAE: [B, 3, T=1, H, W]
    dist = vae.encode(inp.unsqueeze(2) if five_d else inp).latent_dist
    return dist.mode().float()


def upscale(image, decoder, vae, *, prompt="", degrade_sigma: float = 0.0, seed: int | None = None,
            backbone: str | None = None, output_type: str = "pil", decode_kwargs: dict | None = None,
            progress=None):
    """Upscale image(s) by the decoder's sr_scale (4x): VAE encode, optional degradation,
    PiD decode.

    image: a PIL image, a path, a [3, H, W] / [B, 3, H, W] tensor (uint8, or float in
        [0, 1]), or a list of those. Any size: sides are padded to whole latent cells and
        the result is cropped back to exactly sr_scale times the input.
    vae: the diffusers VAE of the decoder's backbone (AutoencoderKL for FLUX.1 / SD3 / SDXL
        / Z-Image, AutoencoderKLFlux2, AutoencoderKLQwenImage); another family: ValueError.
    prompt: caption(s), one for all or one per image ("" is the encoder's empty caption;
        without an encoder on the decoder, "" decodes with zero embeddings and warns).
    degrade_sigma: noise the clean latent to this level first (see `degrade`), which PiD
        then removes, as the release's from_clean demo does. seed: image i uses seed + i
        for that noise and for PiD's noise (the release's rule); None draws one.
    progress: optional callable(done_images, total_images).
    Returns a list of PIL images ("pil") or of [3, H, W] tensors in [-1, 1] ("pt").
    """
    from .latents import from_vae
    from .sampler import make_generator, resolve_seed
    _check_choice(output_type, "output_type", OUTPUT_TYPES)
    degrade_sigma = _check_sigma(degrade_sigma, "degrade_sigma")
    backbone = _vae_backbone(vae, decoder, backbone)
    images = load_images(image)
    prompts = _prompts(prompt, len(images))
    seed = resolve_seed(seed)
    cfg = decoder.config
    multiple = pad_multiple(decoder)
    results = []
    for i, (x, caption) in enumerate(zip(images, prompts)):
        h, w = x.shape[-2:]
        padded = pad_image(x, multiple)
        latent = from_vae(backbone, encode_image(vae, padded, backbone), vae=vae)
        got = (latent.shape[-2] * cfg.latent_stride, latent.shape[-1] * cfg.latent_stride)
        if got != tuple(padded.shape[-2:]):
            raise ValueError(f"vae: encodes a {padded.shape[-2]}x{padded.shape[-1]} image to a "
                             f"{latent.shape[-2]}x{latent.shape[-1]} latent; the decoder {cfg.name} expects one "
                             f"latent cell per {cfg.latent_stride} pixels")
        latent = latent.to(decoder.device)
        latent = degrade(latent, degrade_sigma, backbone, make_generator(seed + i, latent.device))
        out = _decode(decoder, latent, degrade_sigma, [caption], seed + i, decode_kwargs=decode_kwargs)
        results.append(out[:, :, :h * cfg.sr_scale, :w * cfg.sr_scale])
        if progress:
            progress(i + 1, len(images))
    if output_type == "pt":
        return [r[0].float().cpu() for r in results]
    from .api import to_pil
    return [to_pil(r)[0] for r in results]
