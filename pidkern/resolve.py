"""Argument resolution shared by the API, the CLI and the text encoder: each turns what a
caller may write (None, a name, an object) into the one value the library uses, or raises
an error naming the argument, the value and what was expected.
"""
from __future__ import annotations

import torch

from .config import PiDConfig, get_preset
from .routes import PRECISIONS

BACKENDS = ("auto", "reference", "fast")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r}: expected 'cpu', 'cuda', 'cuda:N' or a torch.device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available on this machine (torch {torch.__version__})")
    return dev


def resolve_dtype(dtype, device: torch.device, name: str = "dtype") -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"{name}={dtype!r}: expected one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name}={dtype!r}: expected torch.float32, torch.bfloat16 or torch.float16")
    return dtype


def resolve_precision(precision) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    return precision


def resolve_config(preset) -> PiDConfig:
    if isinstance(preset, PiDConfig):
        return preset
    if not isinstance(preset, str):
        raise TypeError(f"preset={preset!r}: expected a preset name or a PiDConfig")
    return get_preset(preset)
