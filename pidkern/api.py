"""The public API: `load` a decoder, `decode` latents into images.

Everything a caller passes in is checked, once, with errors that name the argument, the
value and what was expected (pidkern.resolve, and the Decoder's own checks in
pidkern.decoder). The only silent changes are the documented ones: inputs move to the
decoder's device, the latent and text take the compute dtype, and sigma becomes a float32
[B] tensor. Images in and out live in pidkern.images (importable from here as before).
"""
from __future__ import annotations

import logging
import threading
import warnings
import weakref
from pathlib import Path

import torch

from .config import PRESETS, PiDConfig, get_preset, sampling_for
from .decoder import Decoder
# The image functions live in pidkern.images; importable from here as before.
from .images import IMAGE_FORMATS, numbered_paths, save_images, save_png, to_pil, to_uint8  # noqa: F401
from .latents import explain_wrong_form
from .progress import busy
from .random_weights import fill_random_, random_net  # noqa: F401  (re-exported: benchmarks and tests use them)
from .reference import PiDNet
from .resolve import (BACKENDS, DTYPES, resolve_config, resolve_device, resolve_dtype,  # noqa: F401  (re-exported)
                      resolve_precision)
from .text import resolve_text_encoder

log = logging.getLogger("pidkern")


def load(checkpoint=None, preset=None, device=None, dtype=None, autocast=None, ema: bool = False,
         text_encoder=None, parallel=None, group=None, sp_attention=None, precision: str | None = None,
         distilled: bool | None = None, *, random: bool = False, revision: str | None = None,
         progress: bool = True) -> Decoder:
    """Load a decoder.

    checkpoint: a DCP directory, .pt/.pth or .safetensors file of released weights; or the
        name of a released checkpoint (`PiD_res2k_sr4x_official_flux_distill_4step`, ...) or
        of its preset (`flux-2k`, ...), fetched from the Hugging Face repository nvidia/PiD
        into the Hugging Face cache (`pidkern.hub`; `revision=` pins a commit, HF_TOKEN and
        HF_HUB_OFFLINE apply). A local path of that name wins over the hub.
    random: build random weights instead (images are noise-like; for timing and tests),
        of `preset` (default "flux-2k"). The only way to random weights, except a PiDConfig
        that is no released preset, which has no weights to fetch (a warning says so).
    preset: a preset name of `pidkern.config.PRESETS` or a PiDConfig. With a checkpoint and
        no preset, the preset is detected from tensor shapes (a release name in the path
        picks among presets that are one network).
    device: default CUDA when available, else CPU. dtype: weight dtype, default bfloat16
        on CUDA and float32 on CPU. autocast: compute dtype for float32 weights (the
        release runs float32 weights under bfloat16 autocast).
    ema: read a training checkpoint's EMA copy (`net_ema.` keys) instead of its regular
        weights (`net.`, the release's default); see `pidkern.checkpoint.load_checkpoint`.
    text_encoder: None, a pidkern.CaptionEncoder, a path to Gemma-2-2B-it (a Hugging Face
        directory or ComfyUI .safetensors) or a hub id such as
        "Efficient-Large-Model/gemma-2-2b-it" (loaded on `device`) for `decode(prompt=...)`.
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
        "int8": int8 GEMMs with per-token activations and ConvRot rotation for every group
        of GEMMs (docs/int8.md), Turing or later on CUDA, exact int32 arithmetic on the CPU.
        None (default): the checkpoint's own precision: "int8" for a ComfyUI int8 file,
        "fp8" for an e4m3 one (their quantized layers run from the file's codes and scales,
        not requantized), else "native". An mxfp8 or 4-bit file runs dequantized
        (docs/comfy_quant.md).
    distilled: True (the 4-step checkpoints), False (the undistilled v1.5 teachers, decoded
        with DPM-Solver++ and guidance by default), or None: from a released name in the
        checkpoint's path (the two kinds have the same tensors), else True.
        `decoder.sampling` holds the resulting defaults (docs/samplers.md).
    progress: bars on stderr while weights are fetched, read or built.

    The Decoder returned is also what `pidkern.decode` uses when given no `model=`.
    """
    dec = _load(checkpoint, preset, device, dtype, autocast, ema, text_encoder, parallel, group, sp_attention,
                precision, distilled, random=random, revision=revision, progress=progress)
    global _last_loaded
    _last_loaded = weakref.ref(dec)
    return dec


def _random_config(preset, random: bool) -> PiDConfig:
    """The config to build random weights of, when load() got no checkpoint."""
    if random:
        return resolve_config(preset or "flux-2k")
    from .hub import names
    if preset is None:
        raise ValueError(f"checkpoint: none given. Name a released checkpoint, e.g. pidkern.load('flux-2k') "
                         f"(fetched from the Hugging Face repository nvidia/PiD; released: {names()}), pass a "
                         f"local file, or ask for random weights: pidkern.load(preset='flux-2k', random=True)")
    cfg = resolve_config(preset)
    if cfg.name in PRESETS and PRESETS[cfg.name] == cfg:
        raise ValueError(f"preset={cfg.name!r} without a checkpoint: pidkern.load({cfg.name!r}) loads the "
                         f"release's weights; pidkern.load(preset={cfg.name!r}, random=True) builds random ones "
                         f"(noise-like images). Random weights are no longer the default")
    return cfg


def _load(checkpoint, preset, device, dtype, autocast, ema, text_encoder, parallel, group, sp_attention, precision,
          distilled=None, random=False, revision=None, progress=True) -> Decoder:
    if precision is not None:
        precision = resolve_precision(precision)
    if not isinstance(random, bool):
        raise TypeError(f"random={random!r}: expected True (random weights) or False")
    if random and checkpoint is not None:
        raise ValueError(f"random=True with checkpoint={str(checkpoint)!r}: give one or the other")
    if parallel is not None or group is not None or sp_attention is not None:
        from .parallel import sequence_parallel, setup
        group, device = setup(parallel, group, device, sp_attention)
        dec = _load(checkpoint, preset, device, dtype, autocast, ema, text_encoder, None, None, None, precision,
                    distilled, random=random, revision=revision, progress=progress)
        sp = sequence_parallel(dec, group, attention=sp_attention or "gather")
        sp.sampling = dec.sampling
        return sp
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if autocast is not None:
        autocast = resolve_dtype(autocast, dev, "autocast")
    cfg = resolve_config(preset) if preset is not None else None
    if checkpoint is None:
        cfg = _random_config(preset, random)
        if distilled is not None and not isinstance(distilled, bool):
            raise TypeError(f"distilled={distilled!r}: expected True, False or None")
        if not random:
            warnings.warn(f"pidkern.load: {cfg.name} is no released preset, so there are no weights to fetch; "
                          f"building it with RANDOM weights (noise-like images)", stacklevel=3)
        enc = resolve_text_encoder(text_encoder, dev)
        n = sum(p.numel() for p in _meta_net(cfg).parameters())
        with busy(f"building random {cfg.name} weights ({_count(n)} parameters)", progress):
            net = random_net(cfg, dev, dt)
        return Decoder(net, dev, dt, "random", autocast, enc, precision or "native",
                       sampling_for(cfg, distilled is not False))
    path = checkpoint
    from .hub import fetch_checkpoint, release_name
    if isinstance(checkpoint, str) and not Path(checkpoint).expanduser().exists() and release_name(checkpoint):
        path = fetch_checkpoint(checkpoint, revision=revision)
    elif revision is not None:
        raise ValueError(f"revision={revision!r}: applies to a released checkpoint fetched by name, not to the local "
                         f"path {str(checkpoint)!r}")
    enc = resolve_text_encoder(text_encoder, dev)
    from .checkpoint import file_precision, load_quantized, trained_for
    with busy(f"reading {Path(path).name}", progress):
        state, cfg, stored = load_quantized(path, preset=cfg, ema=ema)
        with torch.device("meta"):
            net = PiDNet(cfg)
        net.load_state_dict(state, assign=True, strict=True)
        net = net.to(dev, dt)
    if precision is None:
        precision = file_precision(stored)
    trained, _ = trained_for(checkpoint, cfg, distilled)
    return Decoder(net, dev, dt, str(checkpoint), autocast, enc, precision, sampling_for(cfg, trained),
                   stored=stored)


def _meta_net(cfg: PiDConfig) -> PiDNet:
    with torch.device("meta"):
        return PiDNet(cfg)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"


_cache: dict = {}
_cache_lock = threading.Lock()
_last_loaded = None      # weakref to the Decoder pidkern.load returned last


def check_latent_for(latent, cfg: PiDConfig, what: str = "latent") -> None:
    """The cheap checks of a latent against a preset, made before any weight is read: a
    generator's own form (named helper), dims, channels."""
    if not isinstance(latent, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor [B, {cfg.latent_channels}, h, w], got "
                        f"{type(latent).__name__}")
    hint = explain_wrong_form(latent, cfg)
    if hint:
        raise ValueError(f"{what}: shape {tuple(latent.shape)} does not fit preset {cfg.name}: {hint}")
    if latent.dim() != 4 or latent.shape[1] != cfg.latent_channels:
        raise ValueError(f"{what}: preset {cfg.name} takes [B, {cfg.latent_channels}, h, w], got shape "
                         f"{tuple(latent.shape)}")


def _default_decoder(latent, backbone):
    """The decoder `pidkern.decode` uses without model=: the release checkpoint of
    `backbone`, else the one pidkern.load returned last (while it is alive)."""
    if backbone is not None:
        from .latents import get_backbone
        return get_backbone(backbone).presets[0][1]
    dec = _last_loaded() if _last_loaded is not None else None
    if dec is not None:
        return dec
    chans = latent.shape[1] if isinstance(latent, torch.Tensor) and latent.dim() >= 2 else "?"
    raise ValueError(
        f"model: none given and nothing loaded. Pass model= (a Decoder from pidkern.load, a checkpoint path, or a "
        f"released name such as 'flux-2k') or backbone= (the generator: 'flux', 'sd3', 'qwenimage', ...). A "
        f"{chans}-channel latent cannot name its decoder: FLUX.1, SD3 and Qwen-Image latents all have 16 "
        f"channels and need different weights. Random weights only on request: "
        f"model=pidkern.load(preset='flux-2k', random=True)")


def decode(latent, sigma=0.0, *, model=None, backbone=None, device=None, dtype=None, text_encoder=None,
           precision=None, **kwargs) -> torch.Tensor:
    """One call from latent to image, reusing a cached Decoder.

    model: a Decoder, a checkpoint path, or a released checkpoint's name or preset name
    (fetched from the hub as `load` does). Without model=: the release checkpoint of
    `backbone` (e.g. "flux": `pidkern.preset_for(backbone)`'s first variant), else the
    Decoder `pidkern.load` returned last in this process (while you hold it); otherwise a
    ValueError at once. The latent's shape is checked against the preset before any
    weight is read. text_encoder, precision: as in `load` (a Decoder brings its own; a
    precision given with one must be its own). Other keyword arguments go to
    `Decoder.decode`.
    """
    if precision is not None:
        precision = resolve_precision(precision)
    if model is None:
        model = _default_decoder(latent, backbone)
    elif backbone is not None:
        raise ValueError(f"backbone={backbone!r}: picks the release checkpoint when model= is not given; pass one "
                         f"of them, not both")
    if isinstance(model, Decoder):
        if precision is not None and precision != model.precision:
            raise ValueError(f"precision={precision!r}: model is a Decoder loaded with precision="
                             f"{model.precision!r}; load another with pidkern.load(..., precision={precision!r})")
        if text_encoder is not None and text_encoder is not model.text_encoder:
            raise ValueError("text_encoder: model is a Decoder with its own encoder; attach this one with "
                             "decoder.text_encoder = ... instead")
        dec = model
    else:
        from .hub import release_name
        dev = resolve_device(device)
        # Decoders with different encoders are different decoders: the encoder is in the key.
        enc_key = str(Path(text_encoder).expanduser().resolve()) if isinstance(text_encoder, (str, Path)) else text_encoder
        # None (the checkpoint's own precision) and an explicit one are different decoders
        key = (str(model), str(dev), str(resolve_dtype(dtype, dev)), enc_key, precision)
        with _cache_lock:
            dec = _cache.get(key)
            if dec is None:
                is_path = isinstance(model, Path) or (isinstance(model, str) and Path(model).exists())
                release = None if is_path else release_name(model)
                if not is_path and release is None:
                    raise ValueError(f"model={model!r}: neither a released name ({', '.join(sorted(PRESETS))} or "
                                     f"their release names) nor an existing checkpoint path")
                if release is not None:
                    from .hub import preset_of
                    check_latent_for(latent, get_preset(preset_of(release)))
                where = dict(checkpoint=model)
                if precision is not None:
                    where["precision"] = precision
                dec = load(**where, device=dev, dtype=dtype, text_encoder=text_encoder)
                _cache[key] = dec
    return dec.decode(latent, sigma, **kwargs)
