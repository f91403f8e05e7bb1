"""The weight files a ComfyUI user has for PiD, what pidkern runs each as, and the weight
memory each takes (the memory model: every tensor's stored bytes, no measurement).

    python -m bench.comfy_files [--preset flux-2k] [--markdown]

The PiD files of ComfyUI's repackaging quantize the patch and pixel blocks' Linears; the
adapter, the embedders, the norms and the output stage stay bfloat16. That split is this
model's assumption (the files themselves were not available offline); `pidkern info FILE`
prints the real per-group split of a file, and the model is then rerun with it. The
Gemma file quantizes the decoder layers' Linears and keeps the embedding bfloat16.
"""
from __future__ import annotations

import argparse
import math
import sys

from pidkern.checkpoint import expected_shapes
from pidkern.comfy_quant import stored_bytes
from pidkern.config import get_preset
from pidkern.text import GEMMA2_2B

GIB = 2 ** 30
# (file, format of the quantized Linears, convrot, what pidkern runs it as)
PID_FILES = {
    "v1": [("pid_*_bf16.safetensors", None, "bf16 (or precision='fp8' / 'int8': quantized at load)"),
           ("pid_*_mxfp8.safetensors", "mxfp8",
            "mxfp8 on compute capability 10.0 / 12.0 (block-scaled fp8 GEMMs), else dequantized to bf16")],
    "v1.5": [("pid_*_bf16.safetensors", None, "bf16 (or precision='fp8' / 'int8': quantized at load)"),
             ("pid_*_int8_convrot.safetensors", "int8_tensorwise",
              "precision='int8' with the file's codes and scales, activations rotated per token")],
}


def quantized_layer(name: str) -> bool:
    return name.endswith(".weight") and name.split(".", 1)[0] in ("patch_blocks", "pixel_blocks")


def pid_bytes(preset: str, fmt: str | None) -> int:
    total = 0
    for name, shape in expected_shapes(get_preset(preset)).items():
        if name.startswith("lq_proj.lq_aux_rgb_head."):
            continue               # training-only: not in ComfyUI's files
        if len(shape) == 2 and quantized_layer(name):
            total += stored_bytes(shape, fmt)
        else:
            total += 2 * math.prod(shape)
    return total


def gemma_bytes(fmt: str | None) -> int:
    g = GEMMA2_2B
    d, hd = g["hidden_size"], g["head_dim"]
    q, kv, ff = g["num_attention_heads"] * hd, g["num_key_value_heads"] * hd, g["intermediate_size"]
    linears = [(q, d), (kv, d), (kv, d), (d, q), (ff, d), (ff, d), (d, ff)]
    per_layer = sum(stored_bytes(s, fmt) for s in linears) + 2 * 4 * d          # + four RMSNorms
    return g["num_hidden_layers"] * per_layer + 2 * g["vocab_size"] * d + 2 * d


def rows(preset_v1: str = "flux-2k", preset_v15: str = "flux-2kto4k-v1.5") -> list[tuple]:
    out = []
    for family, preset in (("v1", preset_v1), ("v1.5", preset_v15)):
        for file, fmt, runs in PID_FILES[family]:
            out.append((f"PiD {family} ({preset})", file, fmt or "bfloat16", runs, pid_bytes(preset, fmt) / GIB))
    out.append(("caption encoder", "gemma_2_2b_it_elm_bf16.safetensors", "bfloat16", "bf16", gemma_bytes(None) / GIB))
    out.append(("caption encoder", "gemma_2_2b_it_elm_fp8_scaled.safetensors", "float8_e4m3fn (per-layer scale)",
                "dequantized on load to the encoder's dtype (bf16)", gemma_bytes("float8_e4m3fn") / GIB))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.comfy_files", description=__doc__.split("\n")[0])
    ap.add_argument("--v1", default="flux-2k", help="a v1 preset (default flux-2k)")
    ap.add_argument("--v15", default="flux-2kto4k-v1.5", help="a v1.5 preset (default flux-2kto4k-v1.5)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    table = rows(args.v1, args.v15)
    if args.markdown:
        print("| model | file | stored as | pidkern runs it as | weights in the file's format |")
        print("|---|---|---|---|---|")
        for r in table:
            print(f"| {r[0]} | `{r[1]}` | {r[2]} | {r[3]} | {r[4]:.2f} GiB |")
    else:
        for r in table:
            print(f"{r[0]:<28} {r[1]:<42} {r[2]:<32} {r[4]:6.2f} GiB  {r[3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
