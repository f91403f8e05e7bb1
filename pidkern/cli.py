"""The `pidkern` command line: decode latents to PNGs, convert checkpoints, report the setup.

    pidkern decode latent.safetensors -o out.png --checkpoint PiD_res2k_sr4x_official_flux_distill_4step
    pidkern convert PiD_res2k_sr4x_official_flux_distill_4step flux-2k.safetensors [--layout comfyui] [--ema]
    pidkern info [CKPT]
    pidkern bench --size 2048

Bad input (a missing file, a wrong shape, an unknown preset) prints
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

def cmd_decode(args) -> int:
    import pidkern
    if args.checkpoint is None and args.preset is None:
        raise ValueError("--checkpoint: give the weights to decode with (or --preset alone for random weights, "
                         "which give noise-like images)")
    latent = _batched(read_tensor(args.latent, "LATENT", LATENT_KEYS), 4, "LATENT", args.latent)
    text = None
    if args.text_embeds is not None:
        text = _batched(read_tensor(args.text_embeds, "--text-embeds", TEXT_KEYS), 3, "--text-embeds",
                        args.text_embeds)
        if text.shape[0] == 1 and latent.shape[0] > 1:  # one caption for every latent of the batch
            text = text.expand(latent.shape[0], -1, -1)
    # Checked before loading: a load can take many seconds.
    if not 1 <= args.steps <= 4:
        raise ValueError(f"--steps {args.steps}: expected 1 to 4 (the distilled schedule)")
    if not 0.0 <= args.sigma <= 1.0:  # also false for NaN
        raise ValueError(f"--sigma {args.sigma}: expected the latent's noise level in [0, 1]")

    t0 = time.perf_counter()
    dec = pidkern.load(args.checkpoint, preset=args.preset, device=args.device, dtype=args.dtype)
    t_load = time.perf_counter() - t0
    _err(f"loaded {dec.config.name} from {dec.source} on {dec.device} ({str(dec.dtype).replace('torch.', '')}) "
         f"in {t_load:.2f} s")

    t1 = time.perf_counter()

    def progress(step, steps):
        _err(f"step {step}/{steps}  {time.perf_counter() - t1:.2f} s")

    seed = None if args.seed < 0 else args.seed
    try:
        images = dec.decode(latent, args.sigma, text=text, steps=args.steps, seed=seed, sampler=args.sampler,
                            backend=args.backend, progress=progress, noise=args.noise)
    except (ValueError, TypeError) as e:
        # The API names its own arguments; say which file on the command line they came from.
        msg = str(e)
        for api_name, flag, path in (("latent", "LATENT", args.latent), ("text", "--text-embeds", args.text_embeds)):
            if msg.startswith(api_name + ":"):
                raise type(e)(f"{flag} {str(path)!r}:{msg[len(api_name) + 1:]}") from None
        raise
    t_dec = time.perf_counter() - t1
    paths = pidkern.save_png(images, args.output)
    for p in paths:
        print(p)
    b, _, h, w = images.shape
    _err(f"decoded {b} image{'s' if b > 1 else ''} of {w}x{h} in {t_dec:.2f} s (load {t_load:.2f} s)")
    return 0


def cmd_convert(args) -> int:
    from .api import DTYPES
    from .checkpoint import convert, parameter_count
    dtype = DTYPES[args.dtype] if args.dtype else None
    t0 = time.perf_counter()
    dst, cfg = convert(args.src, args.dst, preset=args.preset, dtype=dtype, layout=args.layout, ema=args.ema)
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
             f"parameters: {info.parameters:,}"]
    return lines


def info_lines() -> list[str]:
    import torch

    from . import __version__, ops
    from .api import BACKENDS
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
    fast = "yes" if cuda and ops.HAS_TRITON else "no (needs CUDA and Triton)"
    lines.append(f"backends: {', '.join(BACKENDS)}; reference: yes; fast: {fast}")
    where = ("Triton on CUDA" if cuda else "Triton interpreter on CPU (TRITON_INTERPRET=1)" if ops.interpreting()
             else "Triton needs a CUDA device; PyTorch math here")
    lines.append(f"fused kernels ({where if ops.HAS_TRITON else 'no Triton: PyTorch math'}):")
    for op in ops.OPS:
        state = "triton" if ops.HAS_TRITON and (cuda or ops.interpreting()) else "torch fallback"
        lines.append(f"  {op:<15} {state}")
    lines.append("presets:")
    for name, cfg in PRESETS.items():
        lines.append(f"  {name:<22} {cfg.latent_channels:>4} ch, {cfg.upscale:>3}x, {cfg.version:<4}  "
                     f"{RELEASE_DIRS.get(name, '')}")
    return lines


def plan_lines(preset: str, size: str, device=None, batch: int = 1, plan=None) -> list[str]:
    """`pidkern info --plan PRESET HxW`: the fast path's plan for one output size, without
    building a model (on CUDA the raced entries are filled by the first decode; `pidkern
    bench` prints them after its run)."""
    import torch

    from . import ops
    from .api import resolve_device, resolve_dtype
    from .config import get_preset
    from .plan import parse, resolve
    cfg = get_preset(preset)
    try:
        h, w = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--plan {preset} {size}: expected the output size as HxW, e.g. 2048x2048") from None
    if h <= 0 or w <= 0 or h % cfg.patch or w % cfg.patch:
        raise ValueError(f"--plan {preset} {size}: height and width must be positive multiples of {cfg.patch}")
    dev = resolve_device(device)
    dtype = resolve_dtype(None, dev)
    p = resolve(cfg, batch, h, w, cfg.max_text, dev, torch.finfo(dtype).bits // 8, ops.triton_available(dev),
                parse(plan) if plan else None)
    return [f"{cfg.name}, {str(dtype)[6:]} weights", str(p)]


def cmd_info(args) -> int:
    if getattr(args, "plan", None):
        print("\n".join(plan_lines(*args.plan, device=args.device)))
        return 0
    if args.checkpoint is None:
        print("\n".join(info_lines()))
        return 0
    from .checkpoint import inspect_checkpoint
    print("\n".join(checkpoint_lines(inspect_checkpoint(args.checkpoint, preset=args.preset, ema=args.ema))))
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


def build_parser(with_bench: bool = False) -> argparse.ArgumentParser:
    from .api import BACKENDS, DTYPES
    from .checkpoint import LAYOUTS
    from .config import PRESETS
    from .sampler import NOISE_STREAMS, SAMPLERS
    parser = argparse.ArgumentParser(prog="pidkern", description="Fast inference for PiD, the pixel-diffusion decoder.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what loading and decoding do")
    sub = parser.add_subparsers(dest="command", metavar="{decode,convert,info,bench}")
    sub.required = True

    d = sub.add_parser("decode", help="decode a latent into PNG image(s)",
                       description="Decode a latent into PNG image(s). A [C, h, w] latent is one image (a batch "
                                   "dim of 1 is added); a batch of B writes OUT-0.png ... OUT-(B-1).png.")
    d.add_argument("latent", metavar="LATENT",
                   help=".safetensors (the tensor 'latent', or its only tensor), .pt (a tensor or a dict with "
                        "'latent'), .npy or .npz; shape [B, C, h, w] or [C, h, w]")
    d.add_argument("-o", "--output", required=True, metavar="OUT.png", help="PNG path to write")
    d.add_argument("--checkpoint", default=None, help="DCP directory, .pt/.pth or .safetensors weights")
    d.add_argument("--preset", default=None, choices=list(PRESETS), metavar="NAME",
                   help="one of " + ", ".join(PRESETS) + " (default: detected from the checkpoint); "
                        "without --checkpoint: random weights")
    d.add_argument("--sigma", type=float, default=0.0, help="noise level of the latent in [0, 1] (default 0: clean)")
    d.add_argument("--steps", type=int, default=4, help="sampler steps, 1 to 4 (default 4)")
    d.add_argument("--seed", type=int, default=0, help="noise seed (default 0; negative: a random seed)")
    d.add_argument("--text-embeds", default=None, metavar="FILE",
                   help="caption embeddings [B or 1, T<=300, 2304] (tensor 'text_embeds' or the only tensor); "
                        "default: zeros")
    d.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    d.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="weight dtype (default: bf16 on CUDA, fp32 on CPU)")
    d.add_argument("--sampler", default="sde", choices=SAMPLERS, help="sde (the release's) or ode (default sde)")
    d.add_argument("--backend", default="auto", choices=BACKENDS, help="auto, reference or fast (default auto)")
    d.add_argument("--noise", default="release", choices=NOISE_STREAMS,
                   help="release: the release's torch.Generator stream, its images for a seed (default); philox: "
                        "a counter-based stream drawn inside the fast path's CUDA graph (less memory, other images)")
    d.set_defaults(func=cmd_decode)

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
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("info", help="versions, device, kernels and presets; with CKPT: what a weight file holds",
                       description="Without CKPT: versions, device, extension, kernels and presets. With CKPT: its "
                                   "layout, preset, EMA, key count, dtypes and parameter count (no weights read).")
    i.add_argument("checkpoint", metavar="CKPT", nargs="?", default=None,
                   help="DCP directory, .pt/.pth or .safetensors weights to describe")
    i.add_argument("--preset", default=None, choices=list(PRESETS), metavar="NAME",
                   help="check CKPT against this preset (default: metadata or shapes)")
    i.add_argument("--ema", action="store_true", help="describe CKPT's EMA copy (net_ema.) instead")
    i.add_argument("--plan", nargs=2, metavar=("PRESET", "HxW"), default=None,
                   help="print the fast path's plan (routes, bands, graphs) for PRESET at output size HxW")
    i.add_argument("--device", default=None, help="device for --plan (default: cuda when available)")
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
