"""What every kernel file shares: the interpreter switch and the grouped tile order."""
from __future__ import annotations

import os

import triton
import triton.language as tl

# Read once, at import: triton.jit picks the interpreter when the kernel is defined.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET:
    from pidkern.kernels import _interp_compat  # noqa: F401


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of a GEMM program in grouped order: GROUP_M row blocks sweep the
    columns together, so each weight tile is read from L2 by all of them."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    width = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // width) * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % width) % group_size, (pid % width) // group_size
