"""The public API: `load` a decoder, `decode` latents into images, turn images into bytes.

Everything a caller passes in is checked, once, with errors that name the argument, the
value and what was expected (pidkern.resolve, and the Decoder's own checks in
pidkern.decoder). The only silent changes are the documented ones: inputs move to the
decoder's device, the latent and text take the compute dtype, and sigma becomes a float32
[B] tensor.
"""
from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path

import torch

from .config import PRESETS
from .decoder import Decoder
from .random_weights import fill_random_, random_net  # noqa: F401  (re-exported: benchmarks and tests use them)
from .reference import PiDNet
from .resolve import (BACKENDS, DTYPES, resolve_config, resolve_device, resolve_dtype,  # noqa: F401  (re-exported)
                      resolve_precision)
from .text import resolve_text_encoder

log = logging.getLogger("pidkern")


def load(checkpoint=None, preset=None, device=None, dtype=None, autocast=None, ema: bool = False,
         text_encoder=None, parallel=None, group=None, sp_attention=None, precision: str = "native") -> Decoder:
    """Load a decoder.

    checkpoint: a DCP directory, .pt/.pth or .safetensors file of released weights, or
        None for random weights (a loud warning: images will be noise-like).
    preset: a preset name of `pidkern.config.PRESETS` or a PiDConfig. With a checkpoint and
        no preset, the preset is detected from tensor shapes; without a checkpoint the
        default is "flux-2k".
    device: default CUDA when available, else CPU. dtype: weight dtype, default bfloat16
        on CUDA and float32 on CPU. autocast: compute dtype for float32 weights (the
        release runs float32 weights under bfloat16 autocast).
    ema: read a training checkpoint's EMA copy (`net_ema.` keys) instead of its regular
        weights (`net.`, the release's default); see `pidkern.checkpoint.load_checkpoint`.
    text_encoder: None, a pidkern.CaptionEncoder, or a path to Gemma-2-2B-it (a Hugging
        Face directory or ComfyUI .safetensors; loaded on `device`) for `decode(prompt=...)`.
    parallel: None (one process) or "sequence": every rank of `group` (default: the
        initialised default process group, e.g. torchrun's) calls this and then `decode`
        with the same arguments, and each decodes a band of image rows
        (pidkern.parallel; the device defaults to the rank's own GPU under NCCL).
    sp_attention: how the bands meet in attention under parallel="sequence": "gather"
        (default; all-gather the other bands' keys and values) or "ulysses" (all-to-all
        of heads against sequence: fewer bytes from N = 3 on, for slower links).
    precision: "native" (the GEMMs in `dtype`) or "fp8": the fast path's large GEMMs in
        8-bit e4m3 with per-row scales (docs/fp8.md), quantized once when the fast model is
        built; the 8-bit copies replace the originals in device memory during fast decodes.
        Needs an Ada/Hopper or later GPU on CUDA; on the CPU the same math runs emulated.
    """
    precision = resolve_precision(precision)
    if parallel is not None or group is not None or sp_attention is not None:
        from .parallel import sequence_parallel, setup
        group, device = setup(parallel, group, device, sp_attention)
        dec = load(checkpoint, preset, device, dtype, autocast, ema, text_encoder, precision=precision)
        return sequence_parallel(dec, group, attention=sp_attention or "gather")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if autocast is not None:
        autocast = resolve_dtype(autocast, dev, "autocast")
    enc = resolve_text_encoder(text_encoder, dev)
    if checkpoint is None:
        cfg = resolve_config(preset or "flux-2k")
        msg = (f"pidkern.load: no checkpoint given, building {cfg.name} with RANDOM weights; "
               f"its images are not real decodes")
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)
        return Decoder(random_net(cfg, dev, dt), dev, dt, "random", autocast, enc, precision)
    from .checkpoint import load_checkpoint
    state, cfg = load_checkpoint(checkpoint, preset=None if preset is None else resolve_config(preset), ema=ema)
    with torch.device("meta"):
        net = PiDNet(cfg)
    net.load_state_dict(state, assign=True, strict=True)
    net = net.to(dev, dt)
    return Decoder(net, dev, dt, str(checkpoint), autocast, enc, precision)


_cache: dict = {}
_cache_lock = threading.Lock()


def decode(latent, sigma=0.0, *, model=None, device=None, dtype=None, text_encoder=None, precision=None,
           **kwargs) -> torch.Tensor:
    """One call from latent to image, reusing a cached Decoder.

    model: a Decoder, a preset name (random weights), or a checkpoint path; default
    "flux-2k". text_encoder, precision: as in `load` (a Decoder brings its own; a
    precision given with one must be its own). Other keyword arguments go to
    `Decoder.decode`.
    """
    if precision is not None:
        precision = resolve_precision(precision)
    if isinstance(model, Decoder):
        if precision is not None and precision != model.precision:
            raise ValueError(f"precision={precision!r}: model is a Decoder loaded with precision="
                             f"{model.precision!r}; load another with pidkern.load(..., precision={precision!r})")
        if text_encoder is not None and text_encoder is not model.text_encoder:
            raise ValueError("text_encoder: model is a Decoder with its own encoder; attach this one with "
                             "decoder.text_encoder = ... instead")
        dec = model
    else:
        model = model or "flux-2k"
        dev = resolve_device(device)
        # Decoders with different encoders are different decoders: the encoder is in the key.
        enc_key = str(Path(text_encoder).expanduser().resolve()) if isinstance(text_encoder, (str, Path)) else text_encoder
        key = (str(model), str(dev), str(resolve_dtype(dtype, dev)), enc_key, precision or "native")
        with _cache_lock:
            dec = _cache.get(key)
            if dec is None:
                is_path = isinstance(model, Path) or (isinstance(model, str) and Path(model).exists())
                if not is_path and model not in PRESETS:
                    raise ValueError(f"model={model!r}: neither a preset name ({', '.join(sorted(PRESETS))}) "
                                     f"nor an existing checkpoint path")
                where = dict(checkpoint=model) if is_path else dict(preset=model)
                if precision not in (None, "native"):
                    where["precision"] = precision
                dec = load(**where, device=dev, dtype=dtype, text_encoder=text_encoder)
                _cache[key] = dec
    return dec.decode(latent, sigma, **kwargs)


# -- turning results into bytes -------------------------------------------------------------

def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] on the CPU: round((clamp(x) + 1) * 127.5),
    half to even; the same rule as the fused output stage's uint8 image."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected a [B, 3, H, W] tensor, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    from ._ext import to_uint8 as rule
    return rule(images).permute(0, 2, 3, 1).cpu()


def to_pil(images: torch.Tensor) -> list:
    from PIL import Image
    return [Image.fromarray(a.numpy()) for a in to_uint8(images)]


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def numbered_paths(path, n: int) -> list[Path]:
    """`path` itself for one image, path-0.png, path-1.png... for more."""
    path = Path(path)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(n)]


def save_png(images: torch.Tensor, path) -> list[Path]:
    """Write one PNG per image: `path` itself for one image, path-0.png, path-1.png... for more."""
    return save_images(images, path, format="PNG")


def save_images(images, path, quality: int = 95, format: str | None = None) -> list[Path]:
    """Write images ([B, 3, H, W] in [-1, 1], or a list of PIL images), named as save_png
    names them, as PNG or JPEG by the path's extension (.png, .jpg, .jpeg); `quality`
    (1..95) is JPEG's."""
    path = Path(path)
    if format is None:
        format = IMAGE_FORMATS.get(path.suffix.lower())
        if format is None:
            raise ValueError(f"output {str(path)!r}: unknown image extension {path.suffix or '(none)'!r}; "
                             f"expected one of {', '.join(IMAGE_FORMATS)}")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
        raise ValueError(f"quality={quality!r}: expected an int from 1 to 95 (JPEG quality)")
    pics = to_pil(images) if isinstance(images, torch.Tensor) else list(images)
    outs = numbered_paths(path, len(pics))
    for pic, out in zip(pics, outs):
        out.parent.mkdir(parents=True, exist_ok=True)
        if format == "JPEG":
            pic.save(out, format="JPEG", quality=quality)
        else:
            pic.save(out, format="PNG")
    return outs

