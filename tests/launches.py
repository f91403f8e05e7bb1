"""Count the Triton kernel launches of each fused op during a block of code: each kernel
module's launcher (what pidkern.custom_ops.kernel looks up at each call, for the "triton"
route and for the ops' CUDA implementations) is wrapped, so a route that bypasses the
kernel shows up as a zero."""
import contextlib
import importlib
from collections import Counter

# op -> the (module, function) pairs its kernels are entered through
ENTRIES = {
    "embed": [("pidkern.kernels.embed", "patch_pixel_embed")],
    "gate": [("pidkern.kernels.gate", "lq_gate")],
    "rms_modulate": [("pidkern.kernels.rms_modulate", "add_rms_modulate")],
    "pixel_modulate": [("pidkern.kernels.pixel_modulate", "pixel_post")],
    "swiglu": [("pidkern.kernels.swiglu", "swiglu_gate_up"), ("pidkern.kernels.swiglu", "silu_mul")],
    "qkv_rope": [("pidkern.kernels.qkv_rope", "_launch")],
    "attention": [("pidkern.kernels.attention", "attention_fused"), ("pidkern.kernels.attention", "attention_prep")],
}


@contextlib.contextmanager
def count_launches():
    counts = Counter()
    undo = []
    for op, entries in ENTRIES.items():
        for mod_name, fn_name in entries:
            mod = importlib.import_module(mod_name)
            fn = getattr(mod, fn_name)

            def wrapped(*a, _fn=fn, _op=op, **k):
                counts[_op] += 1
                return _fn(*a, **k)
            setattr(mod, fn_name, wrapped)
            undo.append((mod, fn_name, fn))
    try:
        yield counts
    finally:
        for mod, name, fn in undo:
            setattr(mod, name, fn)
