"""The one dispatch point between the fused Triton kernels and the reference math.

Every fused operation the fast engine uses is called through this module. A call runs
the Triton kernel when its tensors live on a CUDA device (or when TRITON_INTERPRET=1,
which is how CI runs the kernels on the CPU) and the plain PyTorch math otherwise.
`PIDKERN_DISABLE_<OP>=1` (e.g. PIDKERN_DISABLE_ATTENTION=1) forces the PyTorch math for
one op, for debugging and for ablation benchmarks; `disabled(...)` does the same inside
a `with` block.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None

# Names of the ops that have a Triton kernel; each maps to PIDKERN_DISABLE_<NAME upper>.
OPS = ("embed", "rms_modulate", "gate", "attention", "pixel_modulate", "swiglu")

_local = threading.local()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(op: str, *tensors: torch.Tensor) -> bool:
    """Whether `op` runs its Triton kernel for these tensors."""
    if op not in OPS:
        raise ValueError(f"op={op!r} is not a fused op; expected one of {OPS}")
    if not HAS_TRITON:
        return False
    if os.environ.get(f"PIDKERN_DISABLE_{op.upper()}") == "1" or op in getattr(_local, "off", ()):
        return False
    return interpreting() or all(t.is_cuda for t in tensors)


@contextlib.contextmanager
def disabled(*ops: str):
    """Run the PyTorch math for `ops` inside the block (this thread only)."""
    for op in ops:
        if op not in OPS:
            raise ValueError(f"op={op!r} is not a fused op; expected one of {OPS}")
    before = getattr(_local, "off", frozenset())
    _local.off = before | frozenset(ops)
    try:
        yield
    finally:
        _local.off = before
