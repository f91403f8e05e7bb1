"""Where the released weights live, and fetching them through `huggingface_hub`.

The release hosts one file per checkpoint in the Hugging Face model repository
`nvidia/PiD`: `checkpoints/<release name>/model_ema_bf16.pth` (the EMA weights in
bfloat16 under `net.` keys). A preset name (`flux-2k`, ...) stands for its release name
(`pidkern.config.RELEASE_DIRS`). Files go into the standard Hugging Face cache
(`HF_HOME` / `HF_HUB_CACHE`), so a second load reads the cached copy, an interrupted
download resumes, `HF_HUB_OFFLINE=1` never touches the network, `HF_TOKEN` is used when
set and `revision=` pins a commit; the hub draws its own progress bar.

The VAE and the caption encoder come from other repositories (`VAE_REPOS`, `GEMMA_REPO`):
`fetch_folder` turns such a hub id into a local folder the same way.
"""
from __future__ import annotations

from pathlib import Path

from .config import RELEASE_DIRS, release_names

REPO_ID = "nvidia/PiD"
WEIGHTS_FILE = "model_ema_bf16.pth"
# The release's default generator repositories (its pipeline registry); the VAE is the
# `vae/` folder of each. Backbones that share a VAE share a repository here.
VAE_REPOS = {
    "flux": "black-forest-labs/FLUX.1-dev", "zimage": "black-forest-labs/FLUX.1-dev",
    "zimage-turbo": "black-forest-labs/FLUX.1-dev",
    "sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "flux2": "black-forest-labs/FLUX.2-dev", "flux2-klein-4b": "black-forest-labs/FLUX.2-dev",
    "flux2-klein-9b": "black-forest-labs/FLUX.2-dev",
    "qwenimage": "Qwen/Qwen-Image", "qwenimage-2512": "Qwen/Qwen-Image",
}
# An ungated copy of google/gemma-2-2b-it (the same weights).
GEMMA_REPO = "Efficient-Large-Model/gemma-2-2b-it"


def release_name(name) -> str | None:
    """The release name that `name` (a release name or a preset name) stands for, else None."""
    if not isinstance(name, str):
        return None
    if name in release_names():        # the distilled ones and the undistilled teachers
        return name
    return RELEASE_DIRS.get(name)


def preset_of(release: str) -> str:
    """The preset name of a release name."""
    return release_names()[release][0]


def hub_filename(release: str) -> str:
    return f"checkpoints/{release}/{WEIGHTS_FILE}"


def download_command(release: str) -> str:
    return f"hf download {REPO_ID} {hub_filename(release)}"


def names() -> str:
    return ", ".join(f"{p} ({r})" for p, r in RELEASE_DIRS.items())


def _hub():
    try:
        import huggingface_hub
    except ImportError as e:   # a core dependency; only a broken install lacks it
        raise ImportError(f"fetching released weights needs huggingface_hub: pip install huggingface_hub ({e})") from e
    return huggingface_hub


def _offline_error(what: str, command: str, local: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} is not in the Hugging Face cache and cannot be downloaded now (offline: HF_HUB_OFFLINE is set, or "
        f"the hub is unreachable). Fetch it once where there is a network: `{command}` (the same cache; "
        f"HF_HOME / HF_HUB_CACHE pick where), or {local}")


def fetch_checkpoint(name: str, revision: str | None = None, token=None) -> Path:
    """The local path of the release's checkpoint for `name` (a release or preset name),
    downloaded into the Hugging Face cache when it is not there yet."""
    release = release_name(name)
    if release is None:
        raise ValueError(f"checkpoint={name!r}: not a local file or folder, nor a released checkpoint; the released "
                         f"ones are {names()}")
    hub = _hub()
    from huggingface_hub import errors
    filename = hub_filename(release)
    try:
        return Path(hub.hf_hub_download(REPO_ID, filename, revision=revision, token=token))
    except errors.LocalEntryNotFoundError:
        raise _offline_error(
            f"checkpoint {name!r} ({REPO_ID}, {filename}{f' at revision {revision}' if revision else ''})",
            download_command(release) + (f" --revision {revision}" if revision else ""),
            f"download the file by hand and pass its path: pidkern.load('path/to/{WEIGHTS_FILE}') "
            f"(CLI: --checkpoint path/to/{WEIGHTS_FILE})") from None
    except errors.GatedRepoError as e:
        raise PermissionError(f"checkpoint {name!r}: {REPO_ID} refused the download ({e}); log in with `hf auth "
                              f"login` or set HF_TOKEN") from None
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.EntryNotFoundError) as e:
        raise FileNotFoundError(f"checkpoint {name!r}: {REPO_ID} has no {filename}"
                                f"{f' at revision {revision!r}' if revision else ''} ({type(e).__name__})") from None


def cached_checkpoint(release: str) -> Path | None:
    """The cached file of a release name, or None; never touches the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    got = try_to_load_from_cache(REPO_ID, hub_filename(release))
    return Path(got) if isinstance(got, str) else None


def looks_like_repo_id(value) -> bool:
    """`owner/name`: a Hugging Face repository id rather than a local path."""
    if not isinstance(value, str) or value.startswith((".", "/", "~")) or value.count("/") != 1:
        return False
    owner, repo = value.split("/")
    return bool(owner) and bool(repo) and not Path(value).exists()


def fetch_folder(repo_id: str, what: str, subfolder: str | None = None, revision: str | None = None,
                 patterns: tuple[str, ...] = ()) -> Path:
    """A local folder holding the files of `repo_id` (or its `subfolder`) that match
    `patterns`, from the Hugging Face cache, downloading what is missing."""
    hub = _hub()
    from huggingface_hub import errors
    allow = [f"{subfolder}/{p}" if subfolder else p for p in (patterns or ("*",))]
    try:
        root = Path(hub.snapshot_download(repo_id, revision=revision, allow_patterns=allow))
    except errors.LocalEntryNotFoundError:
        sub = f" --include '{subfolder}/*'" if subfolder else ""
        raise _offline_error(f"{what} {repo_id!r}", f"hf download {repo_id}{sub}",
                             f"pass a local folder instead") from None
    except (errors.GatedRepoError, errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as e:
        raise FileNotFoundError(f"{what} {repo_id!r}: the hub refused it ({type(e).__name__}; a gated repository "
                                f"needs `hf auth login` or HF_TOKEN)") from None
    folder = root / subfolder if subfolder else root
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} {repo_id!r}: the repository has no {subfolder}/ folder")
    return folder
