"""The `pidkern` command line: decode latents, upscale images, convert checkpoints, report the setup.

    pidkern decode latent.safetensors -o out.png --checkpoint PiD_res2k_sr4x_official_flux_distill_4step
        (a released name is fetched from Hugging Face nvidia/PiD into the Hugging Face cache)
    pidkern decode flux_latent.safetensors --backbone flux --prompt "a cat" --text-encoder GEMMA -o out.jpg ...
    pidkern upscale in.png -o out.png --checkpoint CKPT --vae VAE_DIR --text-encoder GEMMA --prompt "a cat"
    pidkern convert PiD_res2k_sr4x_official_flux_distill_4step flux-2k.safetensors [--layout comfyui] [--ema]
    pidkern info [CKPT]
    pidkern bench --size 2048

Bad input (a missing file, an unreadable image, a wrong shape, an unknown preset, a VAE
that does not match the checkpoint's backbone) prints
`pidkern: error: <message>` and exits with status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
import warnings
from pathlib import Path

USER_ERRORS = (ValueError, TypeError, FileNotFoundError)
LATENT_KEYS = ("latent", "latents")
TEXT_KEYS = ("text_embeds", "text", "prompt_embeds", "caption_embeds")


class UsageError(Exception):
    """A command that cannot run for reasons outside the user's input (e.g. a missing module)."""


# ---------------------------------------------------------------------------------------
# Reading input tensors.

def read_tensor(path, what: str, keys: tuple[str, ...]):
    """The tensor stored at `path` (.safetensors, .pt/.pth, .npy or .npz).

    A file holding several tensors must name the one meant by one of `keys`; a file
    holding exactly one tensor needs no name.
    """
    import torch
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} {str(p)!r} does not exist")
    if p.is_dir():
        raise ValueError(f"{what} {str(p)!r} is a directory; expected a .safetensors, .pt, .npy or .npz file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file
            found = load_file(str(p))
        elif suffix in (".pt", ".pth"):
            found = torch.load(str(p), map_location="cpu", weights_only=True)
        elif suffix in (".npy", ".npz"):
            import numpy as np
            arr = np.load(str(p), allow_pickle=False)
            found = {k: torch.from_numpy(arr[k]) for k in arr.files} if suffix == ".npz" else torch.from_numpy(arr)
        else:
            raise ValueError(f"{what} {str(p)!r}: unsupported file type {suffix or '(none)'}; expected "
                             f".safetensors, .pt/.pth, .npy or .npz")
    except ValueError as e:
        if str(p) in str(e):
            raise
        raise ValueError(f"{what} {str(p)!r}: cannot read it ({e})") from None
    except Exception as e:  # corrupt files raise whatever the parser meets first
        raise ValueError(f"{what} {str(p)!r}: cannot read it ({type(e).__name__}: {str(e)[:200]})") from None
    if isinstance(found, torch.Tensor):
        return found
    if not isinstance(found, dict):
        raise ValueError(f"{what} {str(p)!r}: holds a {type(found).__name__}; expected a tensor or a dict of tensors")
    tensors = {k: v for k, v in found.items() if isinstance(v, torch.Tensor)}
    for k in keys:
        if k in tensors:
            return tensors[k]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise ValueError(f"{what} {str(p)!r}: holds {len(tensors)} tensors {sorted(tensors)[:10]}; name the one to use "
                     f"{keys[0]!r}")


def _batched(t, dims: int, what: str, path):
    """Add the batch dim of 1 to an unbatched tensor ([C, h, w] latent, [T, D] text)."""
    if t.dim() == dims - 1:
        return t.unsqueeze(0)
    if t.dim() != dims:
        raise ValueError(f"{what} {str(path)!r}: expected {dims} dims (or {dims - 1} without the batch), "
                         f"got shape {tuple(t.shape)}")
    return t


# ---------------------------------------------------------------------------------------
# Commands.

def _progress(args, total: int, unit: str, desc: str):
    """A tqdm bar on stderr over `total` units (quiet with --quiet)."""
    from tqdm import tqdm
    # every step shows (steps are few, and a fast one must not be skipped)
    return tqdm(total=total, unit=unit, desc=desc, disable=args.quiet, file=sys.stderr, dynamic_ncols=True,
                leave=False, mininterval=0, miniters=1)


def _advance(bar):
    """A decode's progress(done, total) onto a tqdm bar: sampler steps, or the window
    evaluations (windows x steps) of a windowed decode, whose total the first call brings."""
    def report(done, total):
        if bar.total != total:
            bar.total = total
            bar.refresh()
        bar.update(done - bar.n)
    return report


def _window_kwargs(args) -> dict:
    """--window / --overlap as Decoder.decode's window= and overlap= (only when given)."""
    out = {}
    if args.window is not None:
        out["window"] = args.window
    if args.overlap is not None:
        out["overlap"] = args.overlap
    return out


def _window(text: str):
    if text in ("auto", "whole"):
        return text
    try:
        if "x" in text.lower():
            h, w = (int(v) for v in text.lower().split("x"))
            return (h, w)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto, whole, a size in output pixels (2048) or "
                                         f"HxW (2048x1536)") from None


def _add_window_arguments(p) -> None:
    p.add_argument("--window", default=None, type=_window, metavar="SIZE",
                   help="decode in overlapping windows blended at every step: auto (the preset's largest trained "
                        "size), a size in output pixels (2048) or HxW; whole: in one piece even past the trained "
                        "range (default: in one piece, refused past the trained range; docs/windows.md)")
    p.add_argument("--overlap", default=None, type=int, metavar="PX",
                   help="overlap of neighbouring windows in output pixels (default: a quarter of the preset's "
                        "window, 512 for the 2k presets)")


def _info(args, msg: str) -> None:
    if not args.quiet:
        _err(msg)


def _check_output(path, quality, n: int = 1, alpha: bool = False) -> list:
    """Fail on a bad -o before any work (a load can take many seconds): extension, folder,
    permission, alpha. Returns the paths the images will get."""
    from .images import check_outputs
    if not 1 <= quality <= 95:
        raise ValueError(f"--quality {quality}: expected 1 to 95 (JPEG quality)")
    return check_outputs(path, n, quality, alpha=alpha, what="-o")


def _print_path(path, bar=None) -> None:
    """An output path on its own line of stdout, clear of any progress bar on stderr."""
    if bar is not None and not getattr(bar, "disable", True):
        bar.clear()
    print(path, flush=True)
    if bar is not None and not getattr(bar, "disable", True):
        bar.refresh()


def _quiet_hub(args) -> None:
    """--quiet holds for huggingface_hub's download bars too."""
    if args.quiet:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()


def _quiet_libraries(args) -> None:
    """--quiet holds for the libraries too: transformers and diffusers draw their own loading
    bars and warnings (e.g. 'Loading weights')."""
    if not args.quiet:
        return
    import importlib
    _quiet_hub(args)
    for name in ("transformers", "diffusers"):
        try:
            logging_ = importlib.import_module(f"{name}.utils.logging")
        except ImportError:
            continue
        logging_.disable_progress_bar()
        logging_.set_verbosity_error()


def _load_decoder(args):
    import pidkern
    if args.checkpoint is None and args.preset is None:
        raise ValueError("--checkpoint: give the weights to decode with (or --preset alone for random weights, "
                         "which give noise-like images)")
    from .hub import looks_like_repo_id, names, release_name
    if args.text_encoder is not None and not Path(args.text_encoder).exists() \
            and not looks_like_repo_id(args.text_encoder):
        raise FileNotFoundError(f"--text-encoder {args.text_encoder!r} does not exist (a folder, a .safetensors "
                                f"file or a Hugging Face id such as Efficient-Large-Model/gemma-2-2b-it)")
    if args.checkpoint is not None and not Path(args.checkpoint).exists() and release_name(args.checkpoint) is None:
        raise FileNotFoundError(f"--checkpoint {args.checkpoint!r} does not exist, and is no released name "
                                f"(fetched from the Hugging Face repository nvidia/PiD): {names()}")
    t0 = time.perf_counter()
    _quiet_hub(args)
    extra = {}
    if args.text_encoder is not None:
        _quiet_libraries(args)
        extra["text_encoder"] = args.text_encoder
    if getattr(args, "sequence_parallel", False):
        extra["parallel"] = "sequence"
        extra["sp_attention"] = args.sp_attention
    elif getattr(args, "sp_attention", None) is not None:
        raise ValueError(f"--sp-attention {args.sp_attention}: needs --sequence-parallel")
    if getattr(args, "precision", None) is not None:
        extra["precision"] = args.precision
    if getattr(args, "undistilled", False):
        extra["distilled"] = False
    random = args.checkpoint is None    # --preset alone: random weights, as the flag says
    dec = pidkern.load(args.checkpoint, preset=args.preset, device=args.device, dtype=args.dtype, random=random,
                       progress=not args.quiet, **extra)
    t_load = time.perf_counter() - t0
    _info(args, f"loaded {dec.config.name} from {dec.source} on {dec.device} "
                f"({str(dec.dtype).replace('torch.', '')}; {dec.sampling.describe()}) in {t_load:.2f} s")
    return dec, t_load


def _text_for(args, dec, batch: int) -> dict:
    """The decode's caption arguments: --text-embeds, else --prompt through the encoder."""
    if args.text_embeds is not None:
        if args.prompt is not None:
            raise ValueError("--prompt: give either --prompt (encoded by --text-encoder) or --text-embeds, not both")
        text = _batched(read_tensor(args.text_embeds, "--text-embeds", TEXT_KEYS), 3, "--text-embeds",
                        args.text_embeds)
        if text.shape[0] == 1 and batch > 1:  # one caption for every latent of the batch
            text = text.expand(batch, -1, -1)
        return {"text": text}
    if args.prompt is not None:
        if getattr(dec, "text_encoder", None) is None:
            raise ValueError("--prompt: needs --text-encoder GEMMA (a Gemma-2-2B-it directory) to encode it")
        return {"prompt": [args.prompt] * batch}
    return {}


def _check_sampler_args(args) -> None:
    """What can be checked of --sampler/--steps/--cfg/--shift before the checkpoint (and so
    its default sampler) is known; the decoder checks the rest."""
    from .sampler import DPM, MAX_DPM_STEPS
    top = MAX_DPM_STEPS if args.sampler in (DPM, None) else 4
    if args.steps is not None and not 1 <= args.steps <= top:
        raise ValueError(f"--steps {args.steps}: expected 1 to {top}"
                         + (" (the distilled schedule; dpm++ takes up to 100)" if top == 4 else ""))
    if args.cfg is not None and not args.cfg >= 1.0:      # false for NaN too
        raise ValueError(f"--cfg {args.cfg}: expected a guidance scale >= 1 (1: no guidance)")
    if args.shift is not None and not 0.0 < args.shift < float("inf"):
        raise ValueError(f"--shift {args.shift}: expected a flow shift > 0")


_SAMPLER_FLAGS = (("steps", "--steps"), ("cfg", "--cfg"), ("shift", "--shift"), ("sampler", "--sampler"),
                  ("negative_prompt", "--negative-prompt"))


def _reraise_as_flag(e: Exception):
    """Re-raise an API error about a sampler argument (`steps=5: ...`) naming its flag."""
    msg = str(e)
    for api_name, flag in _SAMPLER_FLAGS:
        if msg.startswith(api_name + "="):
            raise type(e)(f"{flag} {msg[len(api_name) + 1:]}") from None
    raise e


def _sampler_kwargs(args) -> dict:
    """The decode's sampler arguments (None: the checkpoint's default)."""
    kw = dict(steps=args.steps, sampler=args.sampler, cfg=args.cfg, shift=args.shift)
    if args.negative_prompt is not None:
        kw["negative_prompt"] = args.negative_prompt
    return kw


def cmd_decode(args) -> int:
    if getattr(args, "sequence_parallel", False):
        from .parallel import torchrun_group
        with torchrun_group(args.device) as group:   # torchrun's process group, made and ended here
            import torch.distributed as dist
            if dist.get_rank(group) != 0:   # rank 0 alone reports and writes
                args.quiet = True
            return _decode(args)
    return _decode(args)


def _decode(args) -> int:
    latent = read_tensor(args.latent, "LATENT", LATENT_KEYS)
    # Checked before loading: a load can take many seconds.
    _check_sampler_args(args)
    # SDXL's scheduler sigma (Euler frame) runs to ~15; to_pid_frame maps it into [0, 1].
    if not 0.0 <= args.sigma <= (float("inf") if args.backbone == "sdxl" else 1.0):  # false for NaN too
        raise ValueError(f"--sigma {args.sigma}: expected the latent's noise level in [0, 1]"
                         f"{' (SDXL: its Euler sigma, >= 0)' if args.backbone == 'sdxl' else ''}")
    sigma = args.sigma
    if args.vae is not None and args.backbone is None:
        raise ValueError("--vae: give --backbone too (the VAE's latent conventions are the backbone's)")
    if args.gen_size is not None and args.backbone is None:
        raise ValueError("--gen-size: give --backbone too (it unpacks a generator's packed latent)")
    if args.backbone is not None:
        from .latents import get_backbone
        try:
            get_backbone(args.backbone)
        except ValueError as e:
            raise ValueError(f"--backbone: {e}") from None
    if args.vae is not None:
        if latent.dim() == 3:     # one raw [C, h, w] latent
            latent = latent.unsqueeze(0)
        from .latents import from_vae
        from .pipelines import vae_backbones
        _quiet_libraries(args)
        vae = load_vae(args.vae)
        if args.backbone not in vae_backbones(vae):
            raise ValueError(f"--vae {args.vae!r}: this {type(vae).__name__} makes {', '.join(vae_backbones(vae))} "
                             f"latents, not {args.backbone!r} ones")
        try:
            latent = from_vae(args.backbone, latent, vae=vae)
        except (ValueError, TypeError) as e:
            raise type(e)(f"LATENT {str(args.latent)!r} as a raw {args.backbone} VAE latent: {e}") from None
    elif args.backbone is not None:
        from .latents import from_pipeline
        if latent.dim() == 3 and args.gen_size is None:
            raise ValueError(f"--gen-size: LATENT {str(args.latent)!r} holds packed tokens {tuple(latent.shape)}; "
                             f"unpacking needs the generated image's size in pixels (e.g. --gen-size 1024x1024)")
        height, width = args.gen_size or (None, None)
        try:
            latent = from_pipeline(args.backbone, latent, height=height, width=width)
        except (ValueError, TypeError) as e:
            raise type(e)(f"LATENT {str(args.latent)!r} as a {args.backbone} latent: {e}") from None
    if args.backbone is not None:
        from .latents import to_pid_frame
        latent, sigma = to_pid_frame(args.backbone, latent, sigma)
        sigma = float(sigma)
    latent = _batched(latent, 4, "LATENT", args.latent)
    _check_output(args.output, args.quality, latent.shape[0])   # before any weight is read
    _check_latent_before_load(args, latent)
    dec, t_load = _load_decoder(args)
    if args.backbone is not None:
        from .pipelines import check_backbone
        check_backbone(args.backbone, dec, "--backbone")
    text = _text_for(args, dec, latent.shape[0])

    t1 = time.perf_counter()
    bar = _progress(args, args.steps or dec.sampling.steps_for(args.sampler), "step", "decode")
    seed = None if args.seed < 0 else args.seed
    try:
        with bar:
            images = dec.decode(latent, sigma, seed=seed, backend=args.backend, progress=_advance(bar),
                                noise=args.noise, **_sampler_kwargs(args), **text, **_window_kwargs(args))
    except (ValueError, TypeError) as e:
        # The API names its own arguments; say which file on the command line they came from.
        msg = str(e)
        for api_name, flag, path in (("latent", "LATENT", args.latent), ("text", "--text-embeds", args.text_embeds)):
            if msg.startswith(api_name + ":"):
                raise type(e)(f"{flag} {str(path)!r}:{msg[len(api_name) + 1:]}") from None
        _reraise_as_flag(e)
    t_dec = time.perf_counter() - t1
    if images is None:   # a rank other than 0 of a sequence-parallel decode: rank 0 has the image
        return 0
    from .images import save_images
    for p in save_images(images, args.output, quality=args.quality):
        print(p, flush=True)
    b, _, h, w = images.shape
    _info(args, f"decoded {b} image{'s' if b > 1 else ''} of {w}x{h} in {t_dec:.2f} s (load {t_load:.2f} s)")
    return 0


def _check_latent_before_load(args, latent) -> None:
    """The latent against the checkpoint's preset, from the file's index or the released
    name: a wrong latent fails before seconds of weight reading."""
    from .api import check_latent_for
    from .config import get_preset
    from .hub import preset_of, release_name
    if args.preset is not None:
        cfg = get_preset(args.preset)
    elif args.checkpoint is not None and not Path(args.checkpoint).exists() and release_name(args.checkpoint):
        cfg = get_preset(preset_of(release_name(args.checkpoint)))
    elif args.checkpoint is not None:
        from .checkpoint import AmbiguousPresetWarning, inspect_checkpoint
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AmbiguousPresetWarning)   # said once, by the load itself
            cfg = inspect_checkpoint(args.checkpoint).config
    else:
        return
    try:
        check_latent_for(latent, cfg)
    except (ValueError, TypeError) as e:
        raise type(e)(f"LATENT {str(args.latent)!r}:{str(e)[len('latent:'):]}") from None


def load_vae(path):
    """A diffusers VAE saved with save_pretrained (its config.json names the class), or a
    Hugging Face id (a VAE repository, or a pipeline's whose vae/ folder is read)."""
    import json
    from .hub import fetch_folder, looks_like_repo_id
    p = Path(path)
    if not p.exists() and looks_like_repo_id(str(path)):
        p = fetch_folder(str(path), "--vae", patterns=("vae/*.json", "vae/*.safetensors", "config.json",
                                                       "diffusion_pytorch_model*.safetensors"))
    if not p.exists():
        raise FileNotFoundError(f"--vae {str(p)!r} does not exist (a folder, or a Hugging Face id such as "
                                f"black-forest-labs/FLUX.1-dev)")
    if (p / "vae" / "config.json").is_file():   # a whole pipeline's directory
        p = p / "vae"
    cfg = p / "config.json"
    if not cfg.is_file():
        raise ValueError(f"--vae {str(p)!r}: no config.json; expected a diffusers VAE directory (save_pretrained)")
    try:
        name = json.loads(cfg.read_text()).get("_class_name")
    except (ValueError, OSError) as e:
        raise ValueError(f"--vae {str(p)!r}: unreadable config.json ({e})") from None
    try:
        import diffusers
    except ImportError as e:
        raise UsageError(f"--vae needs diffusers: pip install \"pidkern[diffusers]\" ({e})") from None
    cls = getattr(diffusers, str(name), None)
    if cls is None or not name.startswith("Autoencoder"):
        raise ValueError(f"--vae {str(p)!r}: config.json names {name!r}; expected a diffusers VAE class "
                         f"(AutoencoderKL, AutoencoderKLFlux2, AutoencoderKLQwenImage)")
    return cls.from_pretrained(str(p)).eval().requires_grad_(False)


def cmd_upscale(args) -> int:
    from . import pipelines
    from .images import save_images
    from .progress import ticking
    # Every input is read before anything loads: a bad file fails in a second, not after the models.
    alpha = False
    for path in args.images:
        alpha |= any(im.alpha is not None for im in pipelines.read_images(path, name="image"))
    outs = _check_output(args.output, args.quality, len(args.images), alpha=alpha and args.alpha == "keep")
    _check_sampler_args(args)
    if not 0.0 <= args.degrade_sigma <= 1.0:
        raise ValueError(f"--degrade-sigma {args.degrade_sigma}: expected a noise level in [0, 1]")
    if args.scale not in (4, 16, 64, 256):
        raise ValueError(f"--scale {args.scale}: expected a power of 4 (4, 16, 64, 256): one PiD pass of 4x each")
    _quiet_libraries(args)
    vae = load_vae(args.vae)
    dec, t_load = _load_decoder(args)
    vae = vae.to(dec.device)
    backbone = pipelines._vae_backbone(vae, dec, args.backbone)   # a mismatch fails before any encode
    if args.prompt and getattr(dec, "text_encoder", None) is None:
        raise ValueError("--prompt: needs --text-encoder GEMMA (a Gemma-2-2B-it directory) to encode it")

    seed = None if args.seed < 0 else args.seed
    from .sampler import resolve_seed
    seed = resolve_seed(seed)
    t1 = time.perf_counter()
    steps = args.steps or dec.sampling.steps_for(args.sampler)
    with _progress(args, len(args.images) * steps, "step", "upscale") as bar, ticking(bar):
        for i, (src, out) in enumerate(zip(args.images, outs)):
            name = Path(src).name

            def stage(what, name=name):
                bar.set_postfix_str(f"{name}: {what}")

            def on_pass(_, k, n, hw, name=name):
                # a bar per pass: its total is the pass's steps, or windows x steps when windowed
                bar.reset()
                bar.set_description("upscale" if n == 1 else f"upscale pass {k + 1}/{n}")
                bar.set_postfix_str(f"{name} -> {hw[1]}x{hw[0]}")
            # One image per call: sizes differ, and image i keeps seed + i as in a batch call.
            try:
                pic = pipelines.upscale(src, dec, vae, prompt=args.prompt or "", degrade_sigma=args.degrade_sigma,
                                        seed=seed + i, backbone=backbone, alpha=args.alpha, stage=stage,
                                        scale=args.scale, on_pass=on_pass,
                                        decode_kwargs=dict(backend=args.backend, **_sampler_kwargs(args),
                                                           progress=_advance(bar)),
                                        **_window_kwargs(args))
            except (ValueError, TypeError) as e:
                _reraise_as_flag(e)
            save_images(pic, out, quality=args.quality)
            _print_path(out, bar)
    _info(args, f"upscaled {len(outs)} image{'s' if len(outs) > 1 else ''} in "
                f"{time.perf_counter() - t1:.2f} s (load {t_load:.2f} s)")
    return 0


def cmd_convert(args) -> int:
    from .resolve import DTYPES
    from .checkpoint import convert, parameter_count
    dtype = DTYPES[args.dtype] if args.dtype else None
    t0 = time.perf_counter()
    dst, cfg = convert(args.src, args.dst, preset=args.preset, dtype=dtype, layout=args.layout, ema=args.ema,
                       quantize=args.quantize, convrot=args.convrot)
    n = parameter_count(cfg)
    print(dst)
    _err(f"wrote {cfg.name} ({args.layout} layout{', EMA weights' if args.ema else ''}): {n / 1e6:.1f} M "
         f"parameters, {dst.stat().st_size / 2**20:.1f} MiB, in {time.perf_counter() - t0:.2f} s")
    return 0


def checkpoint_lines(info) -> list[str]:
    """`pidkern info CKPT`: what a weight file holds (a `checkpoint.CheckpointInfo`)."""
    cfg = info.config
    layout = {"pidkern": "pidkern (plain keys, config in the metadata)",
              "plain": "plain (the network's own keys)",
              "release": "release (the release's net. keys)",
              "comfyui": "comfyui (ComfyUI's keys)"}[info.layout]
    prefix = f"prefix {info.prefix!r}" if info.prefix else "no prefix"
    adaln = "pixel adaLN split into msa/mlp halves" if info.split_adaln else "pixel adaLN whole"
    how = {"argument": "given", "metadata": "from the file's metadata", "shapes": "detected from the shapes"}
    preset = f"{cfg.name} ({how[info.preset_from]}"
    if info.same_network:
        preset += f"; the same network as {', '.join(info.same_network)}: --preset names it"
    weights = "EMA copy (net_ema.)" if info.ema_read else "regular"
    ema = ("an EMA copy is available (--ema)" if info.ema_available and not info.ema_read
           else "read" if info.ema_read else "no EMA copy in the file")
    lines = [f"checkpoint: {info.path}",
             f"layout: {layout}; {prefix}; {adaln}",
             f"preset: {preset})",
             f"weights: {weights}; EMA: {ema}",
             f"keys: {info.keys} network tensors"
             + (f" ({len(info.filled)} training-only ones absent, zeros on load)" if info.filled else "")
             + (f"; skipped: {', '.join(f'{k} ({n})' for k, n in sorted(info.skipped.items()))}"
                if info.skipped else ""),
             "dtype: " + ", ".join(f"{dt} ({n})" for dt, n in sorted(info.dtypes.items())),
             f"parameters: {info.parameters:,}",
             f"trained: {_trained_line(info)}"]
    if info.quantized:
        n = sum(c for group in info.quantized.values() for c in group.values())
        lines.append(f"quantized (ComfyUI markers): {n} Linears, dequantized exactly on load")
        lines += [f"  {group}: " + ", ".join(f"{fmt} ({c})" for fmt, c in sorted(fmts.items()))
                  for group, fmts in sorted(info.quantized.items())]
    return lines


def _trained_line(info) -> str:
    from .config import sampling_for
    how = {"argument": "as given", "name": "from the release's name in the path",
           "assumed": "assumed: the path carries no release name; --undistilled for an undistilled teacher"}
    return f"{sampling_for(info.config, info.distilled).describe()} ({how[info.distilled_from]})"


def info_lines() -> list[str]:
    import torch

    from . import __version__, ops
    from .resolve import BACKENDS
    from .config import PRESETS, RELEASE_DIRS
    lines = [f"pidkern {__version__}  (python {platform.python_version()}, {platform.system()} {platform.machine()})"]
    lines.append(f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none (CPU build)'}")
    try:
        import triton
        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed (fused kernels fall back to PyTorch)")
    cuda = torch.cuda.is_available()
    if cuda:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"device cuda:{i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("device: cpu (no CUDA device visible)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # _ext warns when _C is missing; said below instead
        try:
            from . import _ext
            ext = "built" if getattr(_ext, "HAS_EXT", False) else "not built (the output stage runs in PyTorch)"
        except ImportError as e:
            ext = f"not available ({e})"
    lines.append(f"pidkern._C extension: {ext}")
    fast = ("yes (auto picks it for 16-bit weights)" if cuda and ops.HAS_TRITON else
            "runs when asked (--backend fast / backend='fast'): on this machine through PyTorch math"
            + (" and the Triton interpreter" if ops.interpreting() else "") + ", slow; auto picks the reference")
    lines.append(f"backends: {', '.join(BACKENDS)}; reference: yes; fast: {fast}")
    where = ("Triton on CUDA" if cuda else "Triton interpreter on CPU (TRITON_INTERPRET=1)" if ops.interpreting()
             else "Triton needs a CUDA device; PyTorch math here")
    lines.append(f"fused kernels ({where if ops.HAS_TRITON else 'no Triton: PyTorch math'}):")
    for op in ops.OPS:
        state = "triton" if ops.HAS_TRITON and (cuda or ops.interpreting()) else "torch fallback"
        lines.append(f"  {op:<15} {state}")
    from .hub import REPO_ID, cached_checkpoint
    lines.append(f"presets and their released checkpoints (pidkern.load(NAME) / --checkpoint NAME fetch them from "
                 f"Hugging Face {REPO_ID}; 'cached': already in the Hugging Face cache):")
    for name, cfg in PRESETS.items():
        release = RELEASE_DIRS.get(name, "")
        cached = "  cached" if release and cached_checkpoint(release) else ""
        lines.append(f"  {name:<22} {cfg.latent_channels:>4} ch, {cfg.upscale:>3}x, {cfg.version:<4}  {release}{cached}")
    return lines


def plan_lines(preset: str, size: str, device=None, batch: int = 1, plan=None, precision: str = "native",
               spec=None) -> list[str]:
    """`pidkern info --plan PRESET HxW`: the fast path's plan for one output size, without
    building a model (on CUDA the raced entries are filled by the first decode; `pidkern
    bench` prints them after its run). spec: a routes.DeviceSpec to resolve the plan for
    instead of the live device (a card that is not present)."""
    import torch

    from .config import get_preset
    from .plan import parse, resolve
    from .resolve import resolve_device, resolve_dtype
    from .routes import DeviceSpec
    cfg = get_preset(preset)
    try:
        h, w = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--plan {preset} {size}: expected the output size as HxW, e.g. 2048x2048") from None
    if h <= 0 or w <= 0 or h % cfg.patch or w % cfg.patch:
        raise ValueError(f"--plan {preset} {size}: height and width must be positive multiples of {cfg.patch}")
    # a spec for a card that is not here: the plan is that card's, whatever this machine has
    dev = torch.device("cuda") if spec is not None and spec.type == "cuda" else resolve_device(device)
    dtype = resolve_dtype(None, dev)
    # the capability rules read a DeviceSpec: the live device's unless one is given
    p = resolve(cfg, batch, h, w, cfg.max_text, dev, torch.finfo(dtype).bits // 8,
                overrides=parse(plan) if plan else None, precision=precision, spec=spec or DeviceSpec.of(dev))
    return [f"{cfg.name}, {str(dtype)[6:]} weights", str(p)]


def capability_spec(text):
    """The routes.DeviceSpec of a CUDA card of capability `text` ("12.0") that is not here:
    Triton, and the route libraries that import on this machine (standing in for the card's)."""
    from .capability import parse_capability
    from .routes import LIBRARIES, DeviceSpec, importable
    libs = {"triton"} | {m for m in LIBRARIES if m != "triton" and importable(m)}
    return DeviceSpec.cuda(parse_capability(text), libraries=tuple(sorted(libs)))


def capability_plan_lines(spec, precision: str) -> list[str]:
    from .capability import precisions
    cap = f"{spec.capability[0]}.{spec.capability[1]}"
    if precision != "native" and precision not in precisions(spec.capability):
        raise UsageError(f"--precision {precision}: compute capability {cap} has no {precision} tensor cores "
                         f"(e4m3 needs 8.9 or later); it runs {', '.join(precisions(spec.capability))}")
    return [f"the plan a CUDA card of compute capability {cap} (sm_{spec.capability[0]}{spec.capability[1]}) would "
            f"get, by rule: no such card is here (libraries assumed: {', '.join(sorted(spec.libraries))})"]


def capability_notes(spec, plan_text: list[str]) -> list[str]:
    """The capability rule of every route the printed plan names (an entry's value or a
    race candidate) that is unverified there."""
    from .capability import RULES, route_support
    named = set()
    for line in "\n".join(plan_text).splitlines():
        parts = line.split()
        if len(parts) >= 2 and line.startswith("  "):
            named.add(parts[1])
        if "(candidates: " in line:
            named.update(c.strip() for c in line.split("(candidates: ", 1)[1].rstrip(")").split(","))
    notes = []
    for route in RULES:
        ok, why = route_support(route, spec.capability)
        if ok is None and route in named:
            notes.append(f"  {route}: unverified on this capability ({why})")
    return ["capability notes (docs/cards.md, 'Capability rules'):"] + notes if notes else []


def cmd_info(args) -> int:
    if getattr(args, "predict", None):
        from .cards import predict_lines
        print("\n".join(predict_lines(args.predict, preset=args.preset or "flux-2k")))
        return 0
    if getattr(args, "plan", None):
        spec = None
        if getattr(args, "device_capability", None):
            spec = capability_spec(args.device_capability)
        lines = plan_lines(*args.plan, device=args.device, precision=args.precision, spec=spec)
        if spec is not None:
            lines = capability_plan_lines(spec, args.precision) + lines + capability_notes(spec, lines)
        print("\n".join(lines))
        return 0
    if getattr(args, "device_capability", None):
        raise UsageError("--device-capability goes with --plan PRESET HxW")
    if args.checkpoint is None:
        print("\n".join(info_lines()))
        return 0
    from .checkpoint import inspect_checkpoint
    info = inspect_checkpoint(args.checkpoint, preset=args.preset, ema=args.ema,
                              distilled=False if args.undistilled else None)
    print("\n".join(checkpoint_lines(info)))
    return 0


def _benchmark():
    try:
        from . import benchmark
    except ImportError as e:
        raise UsageError(f"bench: pidkern.benchmark is not available ({e})") from None
    return benchmark


def cmd_bench(args) -> int:
    rc = _benchmark().main(args)
    return rc if isinstance(rc, int) else 0


# ---------------------------------------------------------------------------------------
# Parser and entry point.

def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HxW, e.g. 1024x768") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive sizes")
    return h, w


def _add_common_arguments(p) -> None:
    """What decode and upscale share: the output, the model, the caption, the sampler."""
    from .resolve import BACKENDS, DTYPES
    from .config import PRESETS
    from .sampler import SAMPLERS
    p.add_argument("-o", "--output", required=True, metavar="OUT.png",
                   help="image path to write (.png, .jpg, .webp, .tif, .bmp); checked before any work")
    p.add_argument("--checkpoint", default=None,
                   help="DCP directory, .pt/.pth or .safetensors weights, or a released name (flux-2k, "
                        "PiD_res2k_sr4x_official_flux_distill_4step, ...) fetched from Hugging Face nvidia/PiD")
    p.add_argument("--preset", default=None, choices=list(PRESETS), metavar="NAME",
                   help="one of " + ", ".join(PRESETS) + " (default: detected from the checkpoint); "
                        "without --checkpoint: random weights")
    p.add_argument("--text-encoder", default=None, metavar="GEMMA",
                   help="the caption encoder, Gemma-2-2B-it: a local folder or a Hugging Face id "
                        "(Efficient-Large-Model/gemma-2-2b-it)")
    p.add_argument("--prompt", default=None, help="the caption, encoded by --text-encoder")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="weight dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="auto, reference or fast (default auto)")
    p.add_argument("--precision", default=None, choices=("native", "fp8", "int8"),
                   help="fp8: the fast path's large GEMMs in 8-bit e4m3 (docs/fp8.md); int8: every GEMM group "
                        "in int8 with ConvRot (docs/int8.md); default: the checkpoint's own (int8 / fp8 for a "
                        "ComfyUI int8 / fp8 file), else native")
    p.add_argument("--undistilled", action="store_true",
                   help="the checkpoint is an undistilled teacher (needed only when its path does not carry the "
                        "release's name, e.g. PiD_v1pt5_res2kto4k_sr4x_official_flux_undistilled)")
    p.add_argument("--sampler", default=None, choices=SAMPLERS,
                   help="sde (the distilled checkpoints' 4-step sampler), ode, or dpm++ (DPM-Solver++ with caption "
                        "guidance, the undistilled checkpoints'); default: the checkpoint's")
    p.add_argument("--steps", type=int, default=None,
                   help="sampler steps: 1 to 4 for sde/ode (default 4), 1 to 100 for dpm++ (default 25)")
    p.add_argument("--cfg", type=float, default=None,
                   help="dpm++ guidance scale, >= 1 (1: none, half the network evaluations; default: the "
                        "checkpoint's, 5)")
    p.add_argument("--shift", type=float, default=None,
                   help="dpm++ flow shift (default: the checkpoint's rule at the output size)")
    p.add_argument("--negative-prompt", default=None,
                   help="dpm++ with --cfg > 1: the unconditional caption, encoded by --text-encoder (default: the "
                        "release's null caption)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality, 1 to 95 (default 95)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or timings on stderr")


def build_parser(with_bench: bool = False) -> argparse.ArgumentParser:
    from .resolve import DTYPES
    from .checkpoint import LAYOUTS
    from .comfy_quant import WRITABLE
    from .config import PRESETS
    from .sampler import NOISE_STREAMS
    parser = argparse.ArgumentParser(prog="pidkern", description="Fast inference for PiD, the pixel-diffusion decoder.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what loading and decoding do")
    sub = parser.add_subparsers(dest="command", metavar="{decode,upscale,convert,info,bench}")
    sub.required = True

    d = sub.add_parser("decode", help="decode a latent into image(s)",
                       description="Decode a latent into PNG or JPEG image(s). A [C, h, w] latent is one image (a "
                                   "batch dim of 1 is added); a batch of B writes OUT-0.png ... OUT-(B-1).png. With "
                                   "--backbone the file holds a generator's latent as its diffusers pipeline returns "
                                   "it (output_type='latent'; packed token sequences too), converted by "
                                   "pidkern.latents.")
    d.add_argument("latent", metavar="LATENT",
                   help=".safetensors (the tensor 'latent', or its only tensor), .pt (a tensor or a dict with "
                        "'latent'), .npy or .npz; shape [B, C, h, w] or [C, h, w] (with --backbone: the "
                        "generator's form)")
    _add_common_arguments(d)
    d.add_argument("--backbone", default=None, metavar="NAME",
                   help="the generator the latent comes from (flux, zimage, sd3, sdxl, flux2, flux2-klein-4b, "
                        "qwenimage, ...): its pipeline latent is converted to PiD's form and frame")
    d.add_argument("--vae", default=None, metavar="VAE_DIR",
                   help="LATENT is a raw VAE latent (what vae.encode gives, or FLUX.2-klein's final output): "
                        "normalise it with this diffusers VAE (needs --backbone)")
    d.add_argument("--gen-size", default=None, type=_size, metavar="HxW",
                   help="the generator's image size in pixels, needed to unpack a packed (3-D) latent")
    d.add_argument("--sigma", type=float, default=0.0,
                   help="noise level of the latent in [0, 1] (default 0: clean); with --backbone the scheduler's "
                        "sigma (SDXL: its Euler sigma, converted)")
    d.add_argument("--seed", type=int, default=0, help="noise seed (default 0; negative: a random seed)")
    d.add_argument("--text-embeds", default=None, metavar="FILE",
                   help="caption embeddings [B or 1, T<=300, 2304] (tensor 'text_embeds' or the only tensor); "
                        "default: --prompt, else zeros")
    d.add_argument("--noise", default="release", choices=NOISE_STREAMS,
                   help="release: the release's torch.Generator stream, its images for a seed (default); philox: "
                        "a counter-based stream drawn inside the fast path's CUDA graph (less memory, other images)")
    d.add_argument("--sequence-parallel", action="store_true",
                   help="split the decode by image rows over the processes of a torchrun job (torchrun "
                        "--nproc-per-node N -m pidkern decode ...); rank 0 writes the image, the same as one "
                        "process would")
    d.add_argument("--sp-attention", default=None, choices=("gather", "ulysses"),
                   help="with --sequence-parallel, how the bands meet in attention: gather (all-gather the "
                        "keys and values; default) or ulysses (all-to-all of heads: fewer bytes on slower links)")
    _add_window_arguments(d)
    d.set_defaults(func=cmd_decode)

    u = sub.add_parser("upscale", help="upscale image(s) 4x: VAE encode, then PiD",
                       description="Upscale images by the checkpoint's factor (4x): each is encoded by the VAE of "
                                   "the checkpoint's backbone, optionally degraded to --degrade-sigma, and decoded "
                                   "by PiD; any size (padded, then cropped back to exactly 4x). Several inputs "
                                   "write OUT-0.png, OUT-1.png, ... in order.")
    u.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG or any image PIL reads")
    _add_common_arguments(u)
    u.add_argument("--vae", required=True, metavar="VAE",
                   help="the diffusers VAE of the checkpoint's backbone: a save_pretrained directory, a pipeline's "
                        "directory with a vae/ folder, or a Hugging Face id (black-forest-labs/FLUX.1-dev, ...)")
    u.add_argument("--backbone", default=None, metavar="NAME",
                   help="the backbone whose latent conventions to use (default: the one the VAE and checkpoint share)")
    u.add_argument("--degrade-sigma", type=float, default=0.0,
                   help="noise the clean latent to this level before PiD removes it (default 0)")
    u.add_argument("--seed", type=int, default=0, help="seed of image i is SEED + i (default 0; negative: random)")
    u.add_argument("--alpha", default="keep", choices=("keep", "drop"),
                   help="an input's alpha channel: keep (default: upscaled with Lanczos and reattached; needs a .png, "
                        ".webp or .tif output) or drop")
    u.add_argument("--scale", type=int, default=4,
                   help="the factor, a power of 4: 4 (one PiD pass, default), 16 (4x, then 4x again in windows "
                        "from the VAE's tiled encode of the first result), 64")
    _add_window_arguments(u)
    u.set_defaults(func=cmd_upscale)

    c = sub.add_parser("convert", help="convert weights into one file: pidkern, release or ComfyUI layout",
                       description="Read any checkpoint `load` reads (DCP directory, .pt/.pth, .safetensors; the "
                                   "release's or ComfyUI's layout) and write the network's weights in one file.")
    c.add_argument("src", metavar="SRC", help="checkpoint to read")
    c.add_argument("dst", metavar="DST", help="file to write (.safetensors; the release layout also .pth)")
    c.add_argument("--layout", default="pidkern", choices=LAYOUTS,
                   help="pidkern: plain keys, config in the metadata (default, fastest to load); release: the "
                        "release's net. keys; comfyui: model.diffusion_model. keys, pixel adaLN split in halves")
    c.add_argument("--ema", action="store_true",
                   help="read a training checkpoint's EMA copy (net_ema.) instead of its regular weights")
    c.add_argument("--preset", default=None, choices=list(PRESETS), metavar="NAME",
                   help="one of " + ", ".join(PRESETS) + " (default: detected from the shapes)")
    c.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="cast the weights (default: keep as stored)")
    c.add_argument("--quantize", default=None, choices=("keep", *WRITABLE),
                   help="with --layout comfyui: keep a ComfyUI-quantized source's quantized layers as stored, or "
                        "quantize the blocks' Linears in this format, with ComfyUI's markers")
    c.add_argument("--convrot", type=int, default=None, metavar="G",
                   help="with --quantize int8_tensorwise: rotate by Hadamard groups of G (a power of 4, e.g. 256) "
                        "the layers whose width G divides")
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("info", help="versions, device, kernels and presets; with CKPT: what a weight file holds",
                       description="Without CKPT: versions, device, extension, kernels and presets. With CKPT: its "
                                   "layout, preset, EMA, key count, dtypes and parameter count (no weights read).")
    i.add_argument("checkpoint", metavar="CKPT", nargs="?", default=None,
                   help="DCP directory, .pt/.pth or .safetensors weights to describe")
    i.add_argument("--preset", default=None, choices=list(PRESETS), metavar="NAME",
                   help="check CKPT against this preset (default: metadata or shapes)")
    i.add_argument("--ema", action="store_true", help="describe CKPT's EMA copy (net_ema.) instead")
    i.add_argument("--undistilled", action="store_true",
                   help="CKPT is an undistilled teacher (when its path does not carry the release's name)")
    i.add_argument("--plan", nargs=2, metavar=("PRESET", "HxW"), default=None,
                   help="print the fast path's plan (routes, bands, graphs) for PRESET at output size HxW")
    i.add_argument("--device", default=None, help="device for --plan (default: cuda when available)")
    i.add_argument("--precision", default="native", choices=("native", "fp8", "int8"),
                   help="the model's precision for --plan")
    i.add_argument("--device-capability", default=None, metavar="MAJOR.MINOR",
                   help="with --plan: the plan a CUDA card of this compute capability would get, by the capability "
                        "rules, without the card (12.0: RTX 50xx, 8.9: RTX 40xx, 8.6: RTX 30xx, 10.0: B200)"),
    i.add_argument("--predict", default=None, metavar="CARD",
                   help="print the PREDICTED decode time and resident memory per precision on CARD (rtx5090, "
                        "rtx4090, rtx3090, rtx4060ti-8gb, a100, h100, h200, b200): docs/cards.md")
    i.set_defaults(func=cmd_info)

    b = sub.add_parser("bench", help="benchmark decodes (see pidkern bench --help)")
    if with_bench:
        _benchmark().add_arguments(b)
    b.set_defaults(func=cmd_bench)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    _err(f"pidkern: warning: {message}")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input, 1 other failure)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(with_bench=command == "bench")
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), message already printed
        return e.code if isinstance(e.code, int) else 0
    except UsageError as e:
        _err(f"pidkern: error: {e}")
        return 1
    logging.basicConfig(format="pidkern: %(message)s")
    logging.getLogger("pidkern").setLevel(logging.INFO if args.verbose else logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _show_warning
        try:
            return args.func(args)
        except USER_ERRORS as e:
            msg = e.strerror + f": {e.filename}" if isinstance(e, FileNotFoundError) and e.filename else str(e)
            _err(f"pidkern: error: {msg}")
            return 2
        except UsageError as e:
            _err(f"pidkern: error: {e}")
            return 1
        except KeyboardInterrupt:
            _err("pidkern: interrupted")
            return 130


if __name__ == "__main__":
    sys.exit(main())
