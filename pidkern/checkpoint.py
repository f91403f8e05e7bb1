"""Reading PiD weights in every form people have them, and writing them in three layouts.

Released checkpoints are `torch.distributed.checkpoint` (DCP) directories or `.pth`
files of a training state: the network under `net.`, plus an EMA copy under `net_ema.`,
a fake-score network, a discriminator and optimizer state. The release's
registered single files (`model_ema_bf16.pth`) hold the EMA weights, in bfloat16, under
`net.`. ComfyUI reads the same network with `model.diffusion_model.`, `core.` or `net.`
prefixes and splits each pixel block's adaLN into two halves (`detect_layout`).

`load_checkpoint` returns the network's own state dict (the keys `PiDNet` uses) and its
config, checked key by key and shape by shape against that config; `inspect_checkpoint`
says what a file holds without reading the weights. `convert` writes the "pidkern"
layout (plain keys, config in the metadata: the fastest to load), the "release" layout
or the "comfyui" layout; a round trip between them is bit-exact.

The preset comes from, in order: the `preset` argument, the metadata `convert` wrote,
the tensor shapes. Three v1 presets (flux-2k, sd3-2k, sd3-2kto4k) share one network,
as do flux-2kto4k-v1.5 and qwenimage-2kto4k-v1.5; shapes cannot tell them apart, so a
released directory name in the path decides, else the first is taken with a warning.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .config import PRESETS, RELEASE_DIRS, PiDConfig, get_preset

log = logging.getLogger("pidkern")

# The training EMA copy of the network (load_checkpoint(ema=True) reads it).
EMA_GROUP = "net_ema"
# Top-level groups that are not the inference network: the distillation's other
# networks, training-only modules, and what ComfyUI bundles beside a model.
NOT_THE_NETWORK = ("fake_score", "discriminator", "repa_projector", "_repa_projector", "vae", "text_encoders",
                   "first_stage_model", "cond_stage_model")
# Containers a state dict may sit inside; stripped from the front of a key. `net` is the
# released prefix; `model.diffusion_model` and `core` are ComfyUI's; `module` and
# `_orig_mod` come from DDP and torch.compile wrappers.
WRAPPERS = ("net", "model", "diffusion_model", "core", "state_dict", "model_state_dict", "module", "_orig_mod")
# Containers that hold nothing but the network: an unknown key inside one is an error.
CONTAINERS = ("net", EMA_GROUP, "diffusion_model", "core", "_orig_mod")
# EMA bookkeeping some trainers keep beside the weights.
BOOKKEEPING = ("num_updates", "decay", "_extra_state")
# v1.5's training-only head, which ComfyUI's network does not have.
TRAINING_ONLY_HEAD = "lq_proj.lq_aux_rgb_head."
LAYOUTS = ("pidkern", "release", "comfyui")                 # what save_checkpoint / convert write
LAYOUTS_READ = ("pidkern", "plain", "release", "comfyui")   # what detect_layout names
RELEASE_PREFIX = "net."
COMFYUI_PREFIX = "model.diffusion_model."
FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_SHOW = 5  # mismatching keys named in an error


class AmbiguousPresetWarning(UserWarning):
    """The shapes fit several presets that are one and the same network."""


# ---------------------------------------------------------------------------------------
# Expected shapes and preset detection.

@functools.lru_cache(maxsize=32)
def expected_shapes(cfg: PiDConfig) -> dict[str, tuple[int, ...]]:
    """Every key and shape of `PiDNet(cfg)`, built on the meta device (no memory)."""
    from .reference import PiDNet
    with torch.device("meta"):
        net = PiDNet(cfg)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


@functools.lru_cache(maxsize=1)
def _network_roots() -> frozenset[str]:
    """First key components of the network (patch_blocks, lq_proj, ...), over all presets."""
    roots = set()
    for cfg in PRESETS.values():
        roots.update(k.split(".", 1)[0] for k in expected_shapes(cfg))
    return frozenset(roots)


def _shape(v) -> tuple[int, ...]:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def _fingerprint(shapes: Mapping[str, tuple]) -> tuple[int, int, bool] | None:
    """(adapter in-channels, adapter width, v1.5): what tells the ten architectures apart."""
    w = shapes.get("lq_proj.latent_proj.0.weight")
    if w is None or len(w) != 4:
        return None
    return int(w[1]), int(w[0]), any(k.startswith("pit_lq_gate.") for k in shapes)


def _release_name_in(path) -> str | None:
    """The preset whose released directory name appears in `path`, if any."""
    if path is None:
        return None
    parts = Path(path).resolve().parts if Path(path).exists() else Path(path).parts
    for part in reversed(parts):  # the innermost name wins
        hits = [name for name, d in RELEASE_DIRS.items() if d in part]
        if hits:
            return max(hits, key=lambda n: len(RELEASE_DIRS[n]))
    return None


def detect_preset(shapes: Mapping, path=None) -> PiDConfig:
    """The preset of a state dict, from its shapes (`shapes`: key -> tensor or shape).

    Keys must be the network's own (no `net.` prefix). When several presets are the same
    network, a released directory name in `path` picks one; otherwise the first is taken
    and an `AmbiguousPresetWarning` says so.
    """
    shapes = {k: _shape(v) for k, v in shapes.items()}
    where = f" of {path}" if path is not None else ""
    fp = _fingerprint(shapes)
    if fp is None:
        raise ValueError(f"cannot detect the preset{where}: it has no 4-D 'lq_proj.latent_proj.0.weight' (the "
                         f"latent adapter's first conv); pass preset= to name one of {list(PRESETS)}")
    same = [n for n, cfg in PRESETS.items() if _fingerprint(expected_shapes(cfg)) == fp]
    if not same:
        known = ", ".join(f"{n} {_fingerprint(expected_shapes(c))[:2]}" for n, c in PRESETS.items())
        raise ValueError(f"cannot detect the preset{where}: its latent adapter takes {fp[0]} channels at width {fp[1]} "
                         f"({'v1.5' if fp[2] else 'v1'}), which no preset has; presets (in-channels, width): "
                         f"{known}. A custom network needs its PiDConfig passed as preset=")
    named = _release_name_in(path)
    if named in same:
        return PRESETS[named]
    if named is not None:
        warnings.warn(f"{path}: the directory name is the release of {named}, but the tensor shapes are those of "
                      f"{' / '.join(same)}; going by the shapes", stacklevel=3)
    if len(same) > 1:
        msg = (f"checkpoint{where} fits presets {', '.join(same)}, which are the same network (identical keys and "
               f"shapes); using {same[0]}. Pass preset='<name>' (CLI: --preset) to name it.")
        warnings.warn(msg, AmbiguousPresetWarning, stacklevel=3)
        log.info(msg)
    return PRESETS[same[0]]


def check_state_dict(shapes: Mapping, cfg: PiDConfig, path=None) -> None:
    """ValueError naming file, preset and the first mismatching keys unless `shapes` is exactly `cfg`'s."""
    got = {k: _shape(v) for k, v in shapes.items()}
    want = expected_shapes(cfg)
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    wrong = [k for k in want if k in got and got[k] != want[k]]
    if not (missing or unexpected or wrong):
        return
    lines = []
    if wrong:
        lines.append(f"{len(wrong)} shape mismatch(es): " + "; ".join(
            f"{k}: expected {list(want[k])}, got {list(got[k])}" for k in wrong[:_SHOW]))
    if missing:
        lines.append(f"{len(missing)} missing key(s): " + ", ".join(
            f"{k} {list(want[k])}" for k in missing[:_SHOW]))
    if unexpected:
        lines.append(f"{len(unexpected)} unexpected key(s): " + ", ".join(
            f"{k} {list(got[k])}" for k in unexpected[:_SHOW]))
    src = f"{path}" if path is not None else "state dict"
    raise ValueError(f"{src} does not match preset {cfg.name}: " + " | ".join(lines))



# ---------------------------------------------------------------------------------------
# Key layouts: which file key holds which network tensor.

def _flatten(obj, prefix="", out=None) -> dict:
    out = {} if out is None else out
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(v, f"{prefix}{k}.", out)
    else:
        out[prefix[:-1]] = obj
    return out


_SPLIT_ADALN = re.compile(r"^(pixel_blocks\.\d+)\.adaLN_modulation_(msa|mlp)\.(weight|bias)$")


def _classify(key: str) -> tuple[str, str | None, str]:
    """(group, network name, prefix) of a checkpoint key.

    group is "net" (the network's regular weights), "ema" (the training EMA copy under
    `net_ema.`) or "other" (anything inference never reads: fake score, discriminator,
    optimizer, a bundled VAE or text encoder). Under a network container (`net.`,
    `core.`, `model.diffusion_model.`...) every key belongs to the network: one that is no
    network key keeps its name, so the strict shape check reports it as unexpected.
    """
    parts = key.split(".")
    group, i = "net", 0
    while i < len(parts) - 1 and (parts[i] in WRAPPERS or parts[i] == EMA_GROUP):
        if parts[i] == EMA_GROUP:
            group = "ema"
        i += 1
    prefix = ".".join(parts[:i]) + "." if i else ""
    if parts[i] in NOT_THE_NETWORK or any(p in NOT_THE_NETWORK for p in parts[:i]):
        return "other", None, prefix
    if parts[i] in _network_roots():
        return group, ".".join(parts[i:]), prefix
    if any(p in CONTAINERS for p in parts[:i]) and parts[-1] not in BOOKKEEPING:
        return group, ".".join(parts[i:]), prefix
    return "other", None, prefix


def network_key(key: str) -> str | None:
    """The network's name for a checkpoint key of its regular weights, or None for a key
    inference never reads (`net_ema.`, `fake_score.`, `discriminator.`, optimizer...).

    Leading containers (`net.`, `model.diffusion_model.`, `core.`, `module.`...) are stripped.
    """
    group, name, _ = _classify(key)
    return name if group == "net" else None


def detect_layout(keys, metadata: Mapping[str, str] | None = None) -> str:
    """The layout of a checkpoint's keys, one of `LAYOUTS_READ`:

    - "comfyui": ComfyUI's forms: a `model.diffusion_model.` or `core.` prefix, or the pixel
      blocks' adaLN split into `adaLN_modulation_msa` / `adaLN_modulation_mlp` halves;
    - "release": the release's `net.` keys (a training state may add `net_ema.` and more);
    - "pidkern": the network's own keys with the metadata `convert` writes;
    - "plain": the network's own keys (perhaps inside `state_dict.`, `module.`...), no metadata.
    """
    split, prefixes, ema = False, set(), False
    for k in keys:
        group, name, prefix = _classify(k)
        if name is None:
            continue
        ema |= group == "ema"
        split |= bool(_SPLIT_ADALN.match(name))
        prefixes.add(prefix)
    comfy_prefix = any(p.endswith("diffusion_model.") or p.startswith("core.") for p in prefixes)
    if split or comfy_prefix:
        return "comfyui"
    if ema or any(p.split(".")[-2:-1] == ["net"] or p.startswith("net.") for p in prefixes):
        return "release"
    if metadata and ("pidkern_config" in metadata or "pidkern_preset" in metadata):
        return "pidkern"
    return "plain"


@dataclasses.dataclass
class KeyPlan:
    """Where each network tensor of one checkpoint comes from.

    sources maps a network key to one file key, or to the (msa, mlp) file keys of a split
    pixel adaLN. filled lists training-only keys the file lacks (ComfyUI drops v1.5's
    `lq_proj.lq_aux_rgb_head`), which are zeros: the network never runs them.
    """
    layout: str
    prefix: str
    split_adaln: bool
    ema: bool
    ema_available: bool
    regular_available: bool
    sources: dict[str, tuple[str, ...]]
    skipped: dict[str, int]
    filled: list[str] = dataclasses.field(default_factory=list)

    def file_keys(self) -> list[str]:
        return [k for src in self.sources.values() for k in src]

    def shapes(self, file_shapes: Mapping[str, tuple]) -> dict[str, tuple[int, ...]]:
        out = {}
        for name, src in self.sources.items():
            first = tuple(file_shapes[src[0]])
            out[name] = first if len(src) == 1 else (first[0] + tuple(file_shapes[src[1]])[0], *first[1:])
        return out

    def assemble(self, tensors: Mapping[str, torch.Tensor], cfg: PiDConfig) -> dict[str, torch.Tensor]:
        out = {}
        for name, src in self.sources.items():
            out[name] = tensors[src[0]] if len(src) == 1 else merge_pixel_adaln(
                tensors[src[0]], tensors[src[1]], cfg, name)
        if self.filled:
            like = next(iter(out.values()))
            want = expected_shapes(cfg)
            out.update({k: torch.zeros(want[k], dtype=like.dtype) for k in self.filled})
        return out


def plan_keys(keys, ema: bool = False, path=None, metadata: Mapping[str, str] | None = None) -> KeyPlan:
    """The KeyPlan for a checkpoint holding `keys`; ValueError (naming `path`) for a file
    without the chosen weights, two entries for one tensor, or half of a split adaLN."""
    keys = list(keys)
    groups: dict[str, dict[str, str]] = {"net": {}, "ema": {}}
    prefixes: dict[str, set] = {"net": set(), "ema": set()}
    skipped: dict[str, int] = {}
    for k in keys:
        group, name, prefix = _classify(k)
        if name is None:
            top = k.split(".", 1)[0]
            skipped[top] = skipped.get(top, 0) + 1
            continue
        picked = groups[group]
        if name in picked:
            raise ValueError(f"{path}: two entries hold network key {name!r}: {picked[name]!r} and {k!r}; "
                             f"convert the one you mean with a plain state dict")
        picked[name] = k
        prefixes[group].add(prefix)
    if not groups["net"] and not groups["ema"]:
        tops = sorted({k.split('.', 1)[0] for k in keys})
        raise ValueError(f"{path}: no PiD network weights found (expected keys like 'net.patch_blocks.0...'); "
                         f"top-level entries: {tops[:20]}")
    want = "ema" if ema else "net"
    if not groups[want]:
        if ema:
            where = ", ".join(repr(p) for p in sorted(prefixes["net"])) or "its own names"
            raise ValueError(f"{path}: ema=True, but it holds no EMA copy (no 'net_ema.' keys); its only weights "
                             f"are under {where}. The release's model_ema_bf16.pth already stores the EMA weights "
                             f"there: load it with ema=False (CLI: without --ema)")
        raise ValueError(f"{path}: holds only the EMA copy of the network ({len(groups['ema'])} 'net_ema.' "
                         f"tensors) and no regular weights; pass ema=True (CLI: --ema) to read it")
    other = "net" if ema else "ema"
    if groups[other]:
        skipped[EMA_GROUP if other == "ema" else "net"] = len(groups[other])
    if skipped:
        log.debug("%s: skipped entries not used for inference: %s", path, skipped)

    sources: dict[str, tuple[str, ...]] = {}
    halves: dict[tuple[str, str], dict[str, str]] = {}
    for name, k in groups[want].items():
        m = _SPLIT_ADALN.match(name)
        if m:
            halves.setdefault((m[1], m[3]), {})[m[2]] = k
        else:
            sources[name] = (k,)
    for (block, param), pair in halves.items():
        full = f"{block}.adaLN_modulation.0.{param}"
        if len(pair) == 1:
            have, = pair
            lack = "mlp" if have == "msa" else "msa"
            raise ValueError(f"{path}: {pair[have]!r} has no {lack} half ('{block}.adaLN_modulation_{lack}.{param}' "
                             f"is missing); a split pixel adaLN needs both halves")
        if full in sources:
            raise ValueError(f"{path}: holds {block}'s adaLN twice: whole ({sources[full][0]!r}) and split "
                             f"({pair['msa']!r}, {pair['mlp']!r})")
        sources[full] = (pair["msa"], pair["mlp"])
    chosen = prefixes[want]
    return KeyPlan(layout=detect_layout(keys, metadata), prefix=min(chosen, key=len) if chosen else "",
                   split_adaln=bool(halves), ema=ema, ema_available=bool(groups["ema"]),
                   regular_available=bool(groups["net"]), sources=sources, skipped=skipped)


# ---------------------------------------------------------------------------------------
# The pixel adaLN split. The release's adaLN_modulation.0 maps a patch to 6*P2*Dp values
# read as [P2, 6, Dp]: per pixel shift1, scale1, gate1 (the attention half, ComfyUI's
# `msa`) then shift2, scale2, gate2 (the MLP half, `mlp`). So each half is every
# pixel's three chunks of its kind; the halves interleave per pixel, they do not stack.

def _pixel_view(t: torch.Tensor, cfg: PiDConfig, chunks: int, what) -> torch.Tensor:
    p2, dp = cfg.pixels_per_patch, cfg.pixel_dim
    if t.dim() == 0 or t.shape[0] != chunks * p2 * dp:
        raise ValueError(f"{what}: expected {chunks} * {p2} pixels * {dp} = {chunks * p2 * dp} rows for "
                         f"{cfg.name}, got shape {list(t.shape)}")
    return t.reshape(p2, chunks, dp, *t.shape[1:])


def merge_pixel_adaln(msa: torch.Tensor, mlp: torch.Tensor, cfg: PiDConfig, what="pixel adaLN") -> torch.Tensor:
    """The release's `adaLN_modulation.0` weight or bias from ComfyUI's two halves."""
    if msa.shape != mlp.shape:
        raise ValueError(f"{what}: the msa half has shape {list(msa.shape)} but the mlp half {list(mlp.shape)}")
    whole = torch.cat([_pixel_view(msa, cfg, 3, f"{what} (msa half)"),
                       _pixel_view(mlp, cfg, 3, f"{what} (mlp half)")], dim=1)
    return whole.reshape(6 * cfg.pixels_per_patch * cfg.pixel_dim, *msa.shape[1:])


def split_pixel_adaln(whole: torch.Tensor, cfg: PiDConfig, what="pixel adaLN") -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's (msa, mlp) halves of the release's `adaLN_modulation.0` weight or bias."""
    v = _pixel_view(whole, cfg, 6, what)
    rows = 3 * cfg.pixels_per_patch * cfg.pixel_dim
    return v[:, :3].reshape(rows, *whole.shape[1:]), v[:, 3:].reshape(rows, *whole.shape[1:])


def to_layout(state: Mapping[str, torch.Tensor], cfg: PiDConfig, layout: str) -> dict[str, torch.Tensor]:
    """The network's state dict under the file keys of `layout` (one of `LAYOUTS`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {list(LAYOUTS)}")
    if layout == "pidkern":
        return dict(state)
    prefix = RELEASE_PREFIX if layout == "release" else COMFYUI_PREFIX
    out = {}
    for k, v in state.items():
        block, _, rest = k.partition(".adaLN_modulation.0.")
        if layout == "comfyui" and rest and block.startswith("pixel_blocks."):
            msa, mlp = split_pixel_adaln(v, cfg, k)
            out[f"{prefix}{block}.adaLN_modulation_msa.{rest}"] = msa
            out[f"{prefix}{block}.adaLN_modulation_mlp.{rest}"] = mlp
        else:
            out[prefix + k] = v
    return out


# ---------------------------------------------------------------------------------------
# Readers. Each opens one file or DCP directory and gives every entry's shape and dtype
# before a byte of weights is read, then reads the entries asked for.

_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


@dataclasses.dataclass
class _Source:
    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    metadata: dict[str, str]
    read: Callable[[list[str]], dict[str, torch.Tensor]]


def _dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


def _config_from_metadata(meta: Mapping[str, str], path) -> PiDConfig | None:
    if "pidkern_config" in meta:
        try:
            fields = json.loads(meta["pidkern_config"])
            known = {f.name for f in dataclasses.fields(PiDConfig)}
            cfg = PiDConfig(**{k: v for k, v in fields.items() if k in known})
            return PRESETS.get(cfg.name) if PRESETS.get(cfg.name) == cfg else cfg
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: unreadable 'pidkern_config' metadata ({e})") from None
    if "pidkern_preset" in meta:
        try:
            return get_preset(meta["pidkern_preset"])
        except ValueError as e:
            raise ValueError(f"{path}: metadata names an unknown preset: {e}") from None
    return None


@contextlib.contextmanager
def _safetensors_source(path: Path):
    from safetensors import SafetensorError, safe_open

    def failed(e):
        if isinstance(e, SafetensorError):
            return ValueError(f"{path}: not a readable .safetensors file ({e})")
        return ValueError(f"{path}: reading the .safetensors file failed ({type(e).__name__}: {e})")
    errors = (SafetensorError, OSError, RuntimeError)
    try:
        f = safe_open(str(path), framework="pt", device="cpu")
        f.__enter__()
        slices = {k: f.get_slice(k) for k in f.keys()}
        shapes = {k: tuple(s.get_shape()) for k, s in slices.items()}
        dtypes = {k: _ST_DTYPES.get(s.get_dtype(), s.get_dtype().lower()) for k, s in slices.items()}
        meta = f.metadata() or {}
    except errors as e:
        raise failed(e) from None

    def read(keys):
        try:
            return {k: f.get_tensor(k) for k in keys}
        except errors as e:
            raise failed(e) from None
    try:
        yield _Source(path, shapes, dtypes, dict(meta), read)
    finally:
        f.__exit__(None, None, None)


@contextlib.contextmanager
def _torch_source(path: Path):
    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e).lower():
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy, non-zip format
    except Exception as e:  # pickle, zip and unpickler errors all mean "this file is not readable"
        kind = type(e).__name__
        hint = " (a file that needs arbitrary code to unpickle is refused)" if "weights_only" in str(e) else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{path}: not a readable PyTorch checkpoint{hint} ({kind}: {first[:300]})") from None
    if isinstance(obj, torch.Tensor):
        raise ValueError(f"{path}: holds a single tensor, not a state dict")
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    flat = {k: v for k, v in _flatten(obj).items() if isinstance(v, torch.Tensor)}
    yield _Source(path, {k: tuple(v.shape) for k, v in flat.items()},
                  {k: _dtype_name(v.dtype) for k, v in flat.items()}, {}, lambda keys: {k: flat[k] for k in keys})


@contextlib.contextmanager
def _dcp_source(path: Path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    try:
        meta = FileSystemReader(str(path)).read_metadata()
    except Exception as e:
        raise ValueError(f"{path}: unreadable torch.distributed.checkpoint metadata "
                         f"({type(e).__name__}: {e})") from None
    tensors = {k: m for k, m in meta.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}

    def read(keys):
        # Only the tensors asked for are allocated and read: a training checkpoint's other
        # copies (EMA or regular, fake score, discriminator) stay on disk.
        buf = {k: torch.empty(tensors[k].size, dtype=tensors[k].properties.dtype) for k in keys}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
                dcp.load(buf, storage_reader=FileSystemReader(str(path)),
                         planner=DefaultLoadPlanner(flatten_state_dict=False), no_dist=True)
        except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
            inner = next(iter(getattr(e, "failures", {}).values()), e)
            text = str(inner).strip()
            if isinstance(inner, tuple):  # (exception, traceback) per rank
                inner, text = inner[0], str(inner[0]).strip()
            first = text.splitlines()[0] if text else "truncated or corrupt data file"
            raise ValueError(f"{path}: reading the torch.distributed.checkpoint data failed "
                             f"({type(inner).__name__}: {first[:300]})") from None
        return buf
    yield _Source(path, {k: tuple(m.size) for k, m in tensors.items()},
                  {k: _dtype_name(m.properties.dtype) for k, m in tensors.items()}, {}, read)


def _open(src: Path):
    if src.is_dir():
        return _dcp_source(src)
    return _safetensors_source(src) if src.suffix == ".safetensors" else _torch_source(src)


def _resolve_dir(path: Path) -> Path:
    """A DCP directory itself, or the one checkpoint (DCP dir or weights file) inside a folder.

    A release training checkpoint keeps the network in `<iteration>/model` next to DCP
    directories of optimizer and trainer state; `model` is the one read, as the release does.
    """
    if (path / ".metadata").is_file():
        return path
    found = []
    for root, dirs, files in os.walk(path):
        depth = len(Path(root).relative_to(path).parts)
        if ".metadata" in files:
            found.append(Path(root))
            dirs[:] = []
            continue
        found += [Path(root) / f for f in files if f.endswith(FILE_SUFFIXES)]
        if depth >= 3:
            dirs[:] = []
    models = [p for p in found if p.is_dir() and p.name == "model"]
    if len(found) > 1 and len(models) == 1:
        return models[0]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(f"{path}: a directory without a checkpoint: no torch.distributed.checkpoint '.metadata' "
                         f"and no {'/'.join(FILE_SUFFIXES)} file")
    raise ValueError(f"{path}: holds several checkpoints, name one: {[str(p) for p in found[:10]]}")


# ---------------------------------------------------------------------------------------
# Public functions.

def _check_args(preset, dtype, ema):
    if isinstance(preset, str):
        preset = get_preset(preset)
    elif preset is not None and not isinstance(preset, PiDConfig):
        raise TypeError(f"preset={preset!r}: expected a preset name, a PiDConfig or None")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype={dtype!r}: expected a floating torch.dtype or None")
    if not isinstance(ema, bool):
        raise TypeError(f"ema={ema!r}: expected True (the EMA copy, 'net_ema.' keys) or False (the regular weights)")
    return preset


def _resolve(path) -> Path:
    given = Path(path)
    if not given.exists():
        raise FileNotFoundError(f"checkpoint {str(given)!r} does not exist")
    src = _resolve_dir(given) if given.is_dir() else given
    if src != given:
        log.info("checkpoint %s: reading %s", given, src)
    return src


def _prepare(source: _Source, preset: PiDConfig | None, ema: bool):
    """(plan, config, where the config came from): the strict key and shape check, before
    any weight is read."""
    plan = plan_keys(source.shapes, ema, source.path, source.metadata)
    shapes = plan.shapes(source.shapes)
    if preset is not None:
        cfg, how = preset, "argument"
    else:
        cfg = _config_from_metadata(source.metadata, source.path)
        how = "metadata"
        if cfg is None:
            cfg, how = detect_preset(shapes, source.path), "shapes"
    want = expected_shapes(cfg)
    aux = [k for k in want if k.startswith(TRAINING_ONLY_HEAD)]
    if plan.layout == "comfyui" and aux and not any(k.startswith(TRAINING_ONLY_HEAD) for k in shapes):
        plan.filled = aux
        shapes.update({k: want[k] for k in aux})
        log.info("%s: ComfyUI layout without the training-only %s*; filled with zeros (never run)",
                 source.path, TRAINING_ONLY_HEAD)
    check_state_dict(shapes, cfg, source.path)
    return plan, cfg, how


def load_checkpoint(path, preset: PiDConfig | str | None = None, dtype: torch.dtype | None = None,
                    ema: bool = False) -> tuple[dict[str, torch.Tensor], PiDConfig]:
    """(state_dict, config) of the PiD network stored at `path`.

    path: a DCP directory (or a folder holding exactly one checkpoint, or a release
        iteration folder whose `model` DCP directory is read), a .pt/.pth file (a plain state
        dict or one nested under keys like "state_dict"/"model"/"net"), or a .safetensors
        file, in any layout `detect_layout` names: the release's `net.` keys, ComfyUI's
        `model.diffusion_model.` / `core.` / `net.` files with the pixel adaLN whole or split
        in two, or plain keys. Every network key must be there with its shape (ComfyUI files
        may lack v1.5's training-only `lq_proj.lq_aux_rgb_head`, filled with zeros); entries
        that are not the network (optimizer, discriminator, a bundled VAE) are skipped.
    preset: a preset name or PiDConfig to check against; None reads the preset from
        `convert` metadata or detects it from the shapes.
    dtype: cast floating tensors to it; None keeps them as stored (float32 in the release's
        DCP directories, bfloat16 in its model_ema_bf16.pth and ComfyUI's files).
    ema: False (default) reads the regular weights (`net.`), as the release's inference does
        (its `--load_ema_to_reg` is off by default; its registered model_ema_bf16.pth files
        already hold the EMA weights under `net.`). True reads a training checkpoint's EMA
        copy (`net_ema.`); a file without one is an error, as is ema=False on a file that
        holds only the EMA copy.
    Raises FileNotFoundError for a missing path and ValueError (naming the file and keys)
    for an unreadable file or one that does not match the preset.
    """
    preset = _check_args(preset, dtype, ema)
    src = _resolve(path)
    with _open(src) as source:
        plan, cfg, _ = _prepare(source, preset, ema)
        tensors = source.read(plan.file_keys())
    state = plan.assemble(tensors, cfg)
    if dtype is not None:
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    return state, cfg


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint holds, read from its index (no weights are read)."""
    path: Path                  # the file or DCP directory read
    layout: str                 # see detect_layout
    prefix: str                 # the prefix of the keys read ("" for plain keys)
    split_adaln: bool           # the pixel adaLN split into ComfyUI's msa/mlp halves
    config: PiDConfig
    preset_from: str            # "argument", "metadata" or "shapes"
    same_network: tuple[str, ...]  # presets with identical keys and shapes (shapes cannot tell them apart)
    ema_read: bool              # the EMA copy (net_ema.) was read
    ema_available: bool         # the file holds an EMA copy
    keys: int                   # network tensors
    dtypes: dict[str, int]      # dtype -> tensors (as stored)
    parameters: int
    skipped: dict[str, int]     # top-level groups not read -> entries
    filled: tuple[str, ...]     # training-only keys the file lacks (zeros on load)


def parameter_count(cfg: PiDConfig) -> int:
    return sum(math.prod(s) for s in expected_shapes(cfg).values())


def same_network(cfg: PiDConfig) -> tuple[str, ...]:
    """The other presets with exactly `cfg`'s keys and shapes (weights alone cannot tell them apart)."""
    want = expected_shapes(cfg)
    return tuple(n for n, c in PRESETS.items() if c != cfg and expected_shapes(c) == want)


def inspect_checkpoint(path, preset: PiDConfig | str | None = None, ema: bool = False) -> CheckpointInfo:
    """Layout, preset, EMA, key count, dtypes and parameter count of a checkpoint, with the
    same strict checks as `load_checkpoint`, without reading the weights."""
    preset = _check_args(preset, None, ema)
    src = _resolve(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AmbiguousPresetWarning)  # reported as same_network instead
        with _open(src) as source:
            plan, cfg, how = _prepare(source, preset, ema)
            dtypes: dict[str, int] = {}
            for src_keys in plan.sources.values():
                dt = source.dtypes[src_keys[0]]
                dtypes[dt] = dtypes.get(dt, 0) + 1
    return CheckpointInfo(path=src, layout=plan.layout, prefix=plan.prefix, split_adaln=plan.split_adaln,
                          config=cfg, preset_from=how, same_network=same_network(cfg), ema_read=plan.ema,
                          ema_available=plan.ema_available, keys=len(expected_shapes(cfg)), dtypes=dtypes,
                          parameters=parameter_count(cfg), skipped=plan.skipped,
                          filled=tuple(plan.filled))


def config_metadata(cfg: PiDConfig) -> dict[str, str]:
    return {"pidkern_preset": cfg.name, "pidkern_config": json.dumps(dataclasses.asdict(cfg)), "format": "pt"}


_SUFFIXES = {"pidkern": (".safetensors",), "comfyui": (".safetensors",), "release": (".safetensors", ".pth", ".pt")}


def _check_dst(dst, layout) -> Path:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {list(LAYOUTS)}")
    dst = Path(dst)
    if dst.suffix not in _SUFFIXES[layout]:
        raise ValueError(f"dst={str(dst)!r}: the {layout} layout is written as {' or '.join(_SUFFIXES[layout])}")
    return dst


def save_checkpoint(state: Mapping[str, torch.Tensor], cfg: PiDConfig, dst, layout: str = "pidkern") -> Path:
    """Write the network's `state` at `dst` in `layout` (atomically).

    "pidkern": the network's own keys; "release": the release's `net.` keys (a .pth like its
    model_ema_bf16.pth, or .safetensors); "comfyui": `model.diffusion_model.` keys with each
    pixel block's adaLN split into ComfyUI's `adaLN_modulation_msa` / `_mlp` halves (v1.5's
    training-only `lq_proj.lq_aux_rgb_head` is kept, so a round trip is exact; ComfyUI
    ignores it). Every .safetensors carries the config in its metadata, so it needs no preset.
    """
    from safetensors.torch import save_file
    dst = _check_dst(dst, layout)
    check_state_dict(state, cfg, "state dict to save")
    out = {}
    for k, v in to_layout(state, cfg, layout).items():
        v = v.detach().cpu().contiguous()
        if v.untyped_storage().nbytes() != v.numel() * v.element_size():
            v = v.clone()  # torch.save writes a view's whole storage
        out[k] = v
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        if dst.suffix == ".safetensors":
            save_file(out, str(tmp), metadata=config_metadata(cfg))
        else:
            torch.save(out, str(tmp))
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def save_safetensors(state: Mapping[str, torch.Tensor], cfg: PiDConfig, dst) -> Path:
    """Write `state` as a plain .safetensors with `cfg` in its metadata (atomically)."""
    return save_checkpoint(state, cfg, dst, "pidkern")


def convert(src, dst, preset: PiDConfig | str | None = None, dtype: torch.dtype | None = None,
            layout: str = "pidkern", ema: bool = False) -> tuple[Path, PiDConfig]:
    """Convert any checkpoint `load_checkpoint` reads into `layout` at `dst`.

    layout "pidkern" (default): the network's keys only, contiguous, with {"pidkern_preset",
    "pidkern_config", "format": "pt"} metadata, so it loads fast and needs no preset;
    "release" and "comfyui": see `save_checkpoint`. ema picks the weights read (see
    `load_checkpoint`). Returns (dst, config).
    """
    _check_dst(dst, layout)
    state, cfg = load_checkpoint(src, preset, dtype, ema=ema)
    return save_checkpoint(state, cfg, dst, layout), cfg
