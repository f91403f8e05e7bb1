"""Reading PiD weights from every form they ship in, and writing a fast-loading copy.

Released checkpoints are `torch.distributed.checkpoint` (DCP) directories or `.pth`
files of a training state: the network under `net.`, plus an EMA copy, a fake-score
network, a discriminator and optimizer state that inference never reads (SPEC §8).
`load_checkpoint` returns the network's own state dict (the keys `PiDNet` uses) and its
config, checked key by key and shape by shape against that config. `convert` writes a
plain .safetensors with the config in its metadata, which is the fastest form to load.

The preset comes from, in order: the `preset` argument, the metadata `convert` wrote,
the tensor shapes. Three v1 presets (flux-2k, sd3-2k, sd3-2kto4k) share one network,
as do flux-2kto4k-v1.5 and qwenimage-2kto4k-v1.5; shapes cannot tell them apart, so a
released directory name in the path decides, else the first is taken with a warning.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from .config import PRESETS, RELEASE_DIRS, PiDConfig, get_preset

log = logging.getLogger("pidkern")

# Top-level groups of a training checkpoint that are not the inference network.
TRAINING_ONLY = ("net_ema", "fake_score", "discriminator")
# Containers a state dict may sit inside; stripped from the front of a key. `net` is the
# released prefix; `module` and `_orig_mod` come from DDP and torch.compile wrappers.
WRAPPERS = ("net", "model", "state_dict", "model_state_dict", "module", "_orig_mod")
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
# Key cleaning: training checkpoint -> the network's own keys.

def _flatten(obj, prefix="", out=None) -> dict:
    out = {} if out is None else out
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(v, f"{prefix}{k}.", out)
    else:
        out[prefix[:-1]] = obj
    return out


def network_key(key: str) -> str | None:
    """The network's name for a checkpoint key, or None for a key inference never reads.

    Leading containers (`net.`, `model.`, `module.`...) are stripped; what remains must
    start with one of the network's modules, which drops `net_ema.`, `fake_score.`,
    `discriminator.`, optimizer and scheduler state.
    """
    parts = key.split(".")
    i = 0
    while i < len(parts) - 1 and parts[i] in WRAPPERS:
        i += 1
    if parts[i] in TRAINING_ONLY or any(p in TRAINING_ONLY for p in parts[:i]):
        return None
    if parts[i] not in _network_roots():
        return None
    return ".".join(parts[i:])


def clean_keys(keys, path=None) -> dict[str, str]:
    """{network key: checkpoint key} for the keys the network reads; error on collisions."""
    picked: dict[str, str] = {}
    skipped: dict[str, int] = {}
    for k in keys:
        name = network_key(k)
        if name is None:
            top = k.split(".", 1)[0]
            skipped[top] = skipped.get(top, 0) + 1
            continue
        if name in picked:
            raise ValueError(f"{path}: two entries hold network key {name!r}: {picked[name]!r} and {k!r}; "
                             f"convert the one you mean with a plain state dict")
        picked[name] = k
    if not picked:
        tops = sorted({k.split('.', 1)[0] for k in keys})
        raise ValueError(f"{path}: no PiD network weights found (expected keys like 'net.patch_blocks.0...'); "
                         f"top-level entries: {tops[:20]}")
    if skipped:
        log.debug("%s: skipped entries not used for inference: %s", path, skipped)
    return picked


# ---------------------------------------------------------------------------------------
# Readers. Each returns (tensors by network key, config from metadata or None).

def _read_safetensors(path: Path, preset_hint):
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            keys = clean_keys(list(f.keys()), path)
            shapes = {n: tuple(f.get_slice(k).get_shape()) for n, k in keys.items()}
            cfg = preset_hint or _config_from_metadata(meta, path) or detect_preset(shapes, path)
            check_state_dict(shapes, cfg, path)  # before reading the weights
            return {n: f.get_tensor(k) for n, k in keys.items()}, cfg
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable .safetensors file ({e})") from None
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{path}: reading the .safetensors file failed ({type(e).__name__}: {e})") from None


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


def _read_torch(path: Path):
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
    keys = clean_keys(list(flat), path)
    return {n: flat[k] for n, k in keys.items()}


def _read_dcp(path: Path, preset_hint):
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
    keys = clean_keys(list(tensors), path)
    shapes = {n: tuple(tensors[k].size) for n, k in keys.items()}
    cfg = preset_hint or detect_preset(shapes, path)
    check_state_dict(shapes, cfg, path)  # before reading a byte of weights
    # Only the network's tensors are allocated and read: the EMA copy, fake score and
    # discriminator of a training checkpoint stay on disk.
    buf = {k: torch.empty(tensors[k].size, dtype=tensors[k].properties.dtype) for k in keys.values()}
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
        raise ValueError(f"{path}: reading the torch.distributed.checkpoint data failed ({type(inner).__name__}: "
                         f"{first[:300]})") from None
    return {n: buf[k] for n, k in keys.items()}, cfg


def _resolve_dir(path: Path) -> Path:
    """A DCP directory itself, or the one checkpoint (DCP dir or weights file) inside a folder."""
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
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(f"{path}: a directory without a checkpoint: no torch.distributed.checkpoint '.metadata' "
                         f"and no {'/'.join(FILE_SUFFIXES)} file")
    raise ValueError(f"{path}: holds several checkpoints, name one: {[str(p) for p in found[:10]]}")


# ---------------------------------------------------------------------------------------
# Public functions.

def load_checkpoint(path, preset: PiDConfig | str | None = None, dtype: torch.dtype | None = None
                    ) -> tuple[dict[str, torch.Tensor], PiDConfig]:
    """(state_dict, config) of the PiD network stored at `path`.

    path: a DCP directory (or a folder holding exactly one checkpoint), a .pt/.pth file
        (a plain state dict or one nested under keys like "state_dict"/"model"/"net"), or a
        .safetensors file. Training-only entries are skipped; `net.` is stripped.
    preset: a preset name or PiDConfig to check against; None reads the preset from
        `convert` metadata or detects it from the shapes.
    dtype: cast floating tensors to it; None keeps them as stored (float32 in the release).
    Raises FileNotFoundError for a missing path and ValueError (naming the file) for an
    unreadable file or one that does not match the preset.
    """
    if isinstance(preset, str):
        preset = get_preset(preset)
    elif preset is not None and not isinstance(preset, PiDConfig):
        raise TypeError(f"preset={preset!r}: expected a preset name, a PiDConfig or None")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype={dtype!r}: expected a floating torch.dtype or None")
    given = Path(path)
    if not given.exists():
        raise FileNotFoundError(f"checkpoint {str(given)!r} does not exist")
    src = _resolve_dir(given) if given.is_dir() else given
    if src != given:
        log.info("checkpoint %s: reading %s", given, src)

    if src.is_dir():
        state, cfg = _read_dcp(src, preset)
    elif src.suffix == ".safetensors":
        state, cfg = _read_safetensors(src, preset)
    else:
        state = _read_torch(src)
        cfg = preset or detect_preset(state, given)
        check_state_dict(state, cfg, src)
    if dtype is not None:
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    return state, cfg


def config_metadata(cfg: PiDConfig) -> dict[str, str]:
    return {"pidkern_preset": cfg.name, "pidkern_config": json.dumps(dataclasses.asdict(cfg)), "format": "pt"}


def save_safetensors(state: Mapping[str, torch.Tensor], cfg: PiDConfig, dst) -> Path:
    """Write `state` as a plain .safetensors with `cfg` in its metadata (atomically)."""
    from safetensors.torch import save_file
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"dst={str(dst)!r}: the output must be a .safetensors file")
    check_state_dict(state, cfg, "state dict to save")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=config_metadata(cfg))
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def convert(src, dst, preset: PiDConfig | str | None = None,
            dtype: torch.dtype | None = None) -> tuple[Path, PiDConfig]:
    """Convert any checkpoint `load_checkpoint` reads into a plain .safetensors at `dst`.

    The output holds the network's keys only, contiguous, with {"pidkern_preset",
    "pidkern_config", "format": "pt"} metadata, so it loads fast and needs no preset.
    Returns (dst, config).
    """
    if Path(dst).suffix != ".safetensors":
        raise ValueError(f"dst={str(dst)!r}: the output must be a .safetensors file")
    state, cfg = load_checkpoint(src, preset, dtype)
    return save_safetensors(state, cfg, dst), cfg
