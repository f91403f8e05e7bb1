"""What every kernel file shares: the interpreter switch, the dtypes the kernels take,
the dot-precision rule, the launch context, the grouped tile order, stride alignment and
the GEMM K loop, the per-architecture autotune spaces. Conventions (docs/design.md,
"Adding a kernel"): every launcher runs inside `on_device(tensor)`, checks dtypes against
FLOAT_DTYPES, takes tl.dot's precision from `dot_precision`, and attaches autotune configs
per architecture family as `<name>_tuned = ArchAutotune(<jitted kernel>, <configs(family)>,
key=[...])`, launched as `<name>_tuned.at(tensor.device)[grid](...)`."""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

# Read once, at import: triton.jit picks the interpreter when the kernel is defined.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET:
    from pidkern.kernels import _interp_compat  # noqa: F401


def row_align(elem_size: int, *strides: int) -> int:
    """Largest power of two, at most 16 bytes' worth of elements, dividing every stride.

    Triton only learns an integer argument's alignment when it is a multiple of 16, so a
    row stride like 3 heads x 72 = 216 elements (432 bytes, 16-byte aligned) would be taken
    as unaligned: no vector loads, no async copies into shared memory, and on sm_90 a
    separate, register-starved code path. Launchers pass strides divided by this unit and
    kernels multiply them back by it as a constexpr, which the compiler can see.
    (tl.multiple_of cannot carry it: on a kernel argument the hint is dropped.)"""
    unit = max(1, 16 // elem_size)
    while unit > 1 and any(s % unit for s in strides):
        unit //= 2
    return unit


def aligned_rows(tensors, *strides: int) -> tuple[int, bool]:
    """(row_align unit of the strides, whether every row of every tensor starts 16-byte
    aligned). On CUDA the launchers refuse unaligned rows: Triton then builds a different
    sm_90 program (no async copies, every register in use), which has ended in illegal
    memory accesses."""
    size = tensors[0].element_size()
    unit = row_align(size, *strides)
    return unit, unit * size >= 16 and all(t.data_ptr() % 16 == 0 for t in tensors)


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: exact for float32 inputs (they must not silently drop to
    tf32 on the GPU), tf32 otherwise (which 16-bit operands ignore)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def on_device(t: torch.Tensor):
    """The launch context for t: its CUDA device, or nothing (the interpreter on CPU)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of a GEMM program in grouped order: GROUP_M row blocks sweep the
    columns together, so each weight tile is read from L2 by all of them."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    width = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // width) * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % width) % group_size, (pid % width) // group_size


@triton.jit
def gemm_k_loop(acc, a_ptrs, b_ptrs, rk, K, s_bk, dot_dtype, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                DOT_PREC: tl.constexpr):
    """acc += A[:, :K] @ B[:K, :]: a_ptrs walk A's K (unit stride), b_ptrs B's K (stride
    s_bk); A is cast to dot_dtype (B's), the K tail masked unless EVEN_K."""
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            kmask = rk < K - k
            a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[:, None], other=0.0)
        acc = tl.dot(a.to(dot_dtype), b, acc, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * s_bk
    return acc


# ----------------------------------------------------------- per-architecture configs
#
# Autotune spaces are per architecture family, because what fits and what is fast differ:
# - SM90: compute capability 9.x (Hopper), 10.x and 11.x (datacenter Blackwell, Thor): a
#   block may take up to 227 KB of shared memory, and Triton emits warpgroup MMAs (wgmma
#   on 9.0a, tcgen05 on 10.0a). The configs offered here are the ones tuned on the H200.
# - SM80: 8.x (Ampere, Ada) and 12.x (consumer Blackwell: RTX 50xx, DGX Spark): mma.sync,
#   and at most 99 KB of shared memory per block (101 376 bytes; the A100's 8.0 allows
#   163 KB, but one set serves the family). Configs above that cannot launch at all, so
#   this set is chosen from `python -m bench.compile_matrix` (docs/cards.md).
# - INTERPRET: the Triton interpreter on the CPU (tests): one small config.
# CUDA before 8.0 gets the SM80 set (the smallest configs, and the fast path needs bf16).
SM90 = "sm90"
SM80 = "sm80"
INTERPRET_FAMILY = "interpret"
FAMILIES = (SM90, SM80)


def arch_family(capability: tuple[int, int]) -> str:
    """The config family of a CUDA compute capability (major, minor)."""
    major = capability[0]
    return SM90 if major in (9, 10, 11) else SM80


@functools.lru_cache(maxsize=None)
def _cuda_family(index: int) -> str:
    return arch_family(torch.cuda.get_device_capability(index))


def device_family(device: torch.device) -> str:
    """The config family kernels launched for tensors on `device` use: resolved once per
    CUDA device at first launch and cached; the interpreter's off CUDA."""
    if INTERPRET or device.type != "cuda":
        return INTERPRET_FAMILY
    return _cuda_family(device.index if device.index is not None else torch.cuda.current_device())


class ArchAutotune:
    """A jitted kernel autotuned over its architecture family's configs.

    configs(family, *extra) -> [triton.Config] (extra: launch-time parameters the config
    space depends on, e.g. a block width); one triton.autotune per (family, *extra), built
    at its first launch. `configs` is public so the compile matrix offers exactly what a
    device would be offered."""

    def __init__(self, fn, configs, key, prune_configs_by=None):
        self.fn = fn
        self.configs = configs
        self.key = key
        self.prune_configs_by = prune_configs_by
        self._tuned = {}

    def tuned(self, family: str, *extra):
        k = (family, *extra)
        if k not in self._tuned:
            self._tuned[k] = triton.autotune(configs=self.configs(family, *extra), key=self.key,
                                             prune_configs_by=self.prune_configs_by)(self.fn)
        return self._tuned[k]

    def at(self, device: torch.device, *extra):
        """The autotuned kernel for tensors on `device`: index it with the grid."""
        return self.tuned(device_family(device), *extra)
