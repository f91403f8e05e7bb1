"""What every kernel file shares: the interpreter switch, the dtypes the kernels take,
the dot-precision rule, the launch context, the grouped tile order, stride alignment and
the GEMM K loop. Conventions (docs/design.md, "Adding a kernel"): every launcher runs
inside `on_device(tensor)`, checks dtypes against FLOAT_DTYPES, takes tl.dot's precision
from `dot_precision`, and attaches autotune configs as
`<name>_tuned = triton.autotune(configs=..., key=[...])(<jitted kernel>)`."""
from __future__ import annotations

import contextlib
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
