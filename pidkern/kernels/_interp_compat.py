"""Make Triton 3.6's CPU interpreter work with NumPy >= 2.3.

The interpreter keeps scalars as 1-element arrays and converts them with
`int(array)`, which NumPy 2.3+ rejects for 1-d arrays; any loop over a runtime bound
(`range(0, K, BLOCK_K)`) then fails. Re-set `__index__` with `.item()` after the
interpreter's own patching. Only imported when TRITON_INTERPRET=1; harmless if fixed upstream.
"""
from __future__ import annotations

import triton.runtime.interpreter as _interp

if not getattr(_interp, "_pidkern_index_fix", False):
    _orig_patch_lang_tensor = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        _orig_patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor
    _interp._pidkern_index_fix = True
