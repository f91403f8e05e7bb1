"""Make Triton 3.6's CPU interpreter work with NumPy >= 2.3, and round to fp8 correctly.

The interpreter keeps scalars as 1-element arrays and converts them with
`int(array)`, which NumPy 2.3+ rejects for 1-d arrays; any loop over a runtime bound
(`range(0, K, BLOCK_K)`) then fails. Re-set `__index__` with `.item()` after the
interpreter's own patching.

Its float -> fp8 conversion rounds by adding one to the 3-bit mantissa without carrying
into the exponent: 7.76 becomes 4.0 instead of 8.0 (about 1 value in 60), which no GPU
does (sm_89/sm_90 convert with cvt.rn.satfinite). fp32/fp16 -> e4m3fn/e5m2 at
round-to-nearest-even go through torch's conversion instead (same rounding as the GPU,
except that torch gives NaN past the largest finite value where the GPU saturates; the
kernels clamp first).
Only imported when TRITON_INTERPRET=1; harmless if fixed upstream.
"""
from __future__ import annotations

import numpy as np
import torch
import triton.runtime.interpreter as _interp

if not getattr(_interp, "_pidkern_index_fix", False):
    _orig_patch_lang_tensor = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        _orig_patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor
    _interp._pidkern_index_fix = True

if not getattr(_interp, "_pidkern_fp8_fix", False):
    _orig_convert_float = _interp._convert_float
    _FP8 = {"fp8e4nv": torch.float8_e4m3fn, "fp8e5": torch.float8_e5m2}
    _SRC = {"fp32": np.float32, "fp16": np.float16}

    def _convert_float(input, input_dtype, output_dtype, rounding_mode):
        target = _FP8.get(getattr(output_dtype, "name", None))
        src = _SRC.get(getattr(input_dtype, "name", None))
        if target is None or src is None or rounding_mode != _interp._ir.ROUNDING_MODE.RTNE:
            return _orig_convert_float(input, input_dtype, output_dtype, rounding_mode)
        x = torch.from_numpy(np.ascontiguousarray(input).view(src).astype(np.float32))
        return x.to(target).view(torch.uint8).numpy().reshape(input.shape)

    _interp._convert_float = _convert_float
    _interp._pidkern_fp8_fix = True
