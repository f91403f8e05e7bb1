"""Tiny stand-ins for the released files, written into a Hugging Face cache in the hub's
own layout (`models--owner--name/{blobs,refs,snapshots}`), so that pidkern, diffusers and
transformers find them through huggingface_hub exactly as they find real downloads, with
HF_HUB_OFFLINE set and no network."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch

from pidkern.api import random_net
from pidkern.checkpoint import TORCH_METADATA, config_metadata, to_layout
from pidkern.config import RELEASE_DIRS, release_names, tiny

REVISION = "0123456789abcdef0123456789abcdef01234567"   # a commit hash, as the hub names snapshots


def put_file(cache: Path, repo_id: str, filename: str, src: Path, revision: str = REVISION,
             ref: str | None = "main") -> Path:
    """Place `src` in `cache` as the hub does: the bytes in blobs/<sha256>, a link from
    snapshots/<revision>/<filename>, and refs/<ref> naming the revision."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    data = Path(src).read_bytes()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    if not blob.exists():
        blob.write_bytes(data)
    link = repo / "snapshots" / revision / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.exists() or link.is_symlink():
        link.unlink()
    os.symlink(os.path.relpath(blob, link.parent), link)
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(revision)
    return link


def put_folder(cache: Path, repo_id: str, folder: Path, prefix: str = "", revision: str = REVISION) -> None:
    """Every file under `folder` as `prefix/<relative path>` of `repo_id`."""
    for f in sorted(Path(folder).rglob("*")):
        if f.is_file():
            rel = f.relative_to(folder).as_posix()
            put_file(cache, repo_id, f"{prefix}/{rel}" if prefix else rel, f, revision)


def stand_in_config(preset: str):
    """The tiny config standing in for `preset`: Gemma-2's caption width, so a tiny Gemma
    encoder feeds it."""
    return tiny(preset, text_dim=2304, max_text=300)


def write_release_file(path: Path, preset: str, seed: int = 0) -> dict:
    """A tiny network in the release's file layout (`net.` keys, like model_ema_bf16.pth),
    carrying its config as metadata; returns its state dict."""
    cfg = stand_in_config(preset)
    state = random_net(cfg, torch.device("cpu"), torch.float32, seed=seed).state_dict()
    payload = dict(to_layout(state, cfg, "release"))
    payload[TORCH_METADATA] = config_metadata(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return state


def put_release(cache: Path, name: str, work: Path, seed: int = 0, revision: str = REVISION,
                ref: str | None = "main") -> dict:
    """A stand-in for the released checkpoint `name` (a preset or release name) in nvidia/PiD."""
    release = RELEASE_DIRS.get(name, name)
    preset = release_names()[release][0]          # the undistilled teachers too
    src = work / f"{release}-{seed}.pth"
    state = write_release_file(src, preset, seed)
    put_file(cache, "nvidia/PiD", f"checkpoints/{release}/model_ema_bf16.pth", src, revision, ref)
    return state


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)
