"""The image error of an fp8 model with each 8-bit attention mode (CPU, Triton interpreter).

    python -m bench.fp8_attention_image [--preset flux-2k] [--size 128x128] [--json PATH]

One float32 random network; the float32 reference decode is the oracle. The fp8 model
(precision="fp8": its patch GEMMs in e4m3, bench.fp8_accuracy) decodes the same latent,
text, sigma and seed once per attention route of the plan, every other op on its PyTorch
route so that only the attention kernel runs interpreted. float32, not bfloat16: the
interpreter's bf16 arithmetic is broken. Slow: ~4 min per 8-bit mode at flux-2k's width.
This is how docs/fp8.md, "Attention in 8-bit", was measured.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings

MODES = ("torch", "int8qk-triton", "fp8qk-triton", "int8-triton", "fp8-triton")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fp8_attention_image", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="flux-2k", help="a preset, or tiny:PRESET")
    ap.add_argument("--size", default="128x128", help="output HxW")
    ap.add_argument("--modes", default=",".join(MODES), help="attention routes, comma-separated")
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "1"       # before the kernels are imported
    warnings.filterwarnings("ignore", message="pidkern.load: no checkpoint")
    import torch

    from bench.fp8_accuracy import config_of, rel
    from pidkern.api import Decoder, random_net
    cfg = config_of(args.preset)
    h, w = (int(v) for v in args.size.split("x"))
    if h % cfg.upscale or w % cfg.upscale:
        raise SystemExit(f"--size {args.size}: expected multiples of {cfg.upscale}")
    net = random_net(cfg, "cpu", torch.float32, seed=0)
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(1, cfg.latent_channels, h // cfg.upscale, w // cfg.upscale, generator=g)
    text = torch.randn(1, min(32, cfg.max_text), cfg.text_dim, generator=g)
    sigma = torch.tensor([0.2])
    cpu = torch.device("cpu")
    ref = Decoder(net, cpu, torch.float32, "random").decode(latent, sigma, text, steps=4, seed=0, backend="reference")
    dec = Decoder(net, cpu, torch.float32, "random", precision="fp8")
    others = dict(swiglu="torch", embed="torch", gate="torch", rms_modulate="torch", pixel_modulate="torch")
    rows = []
    for mode in filter(None, args.modes.split(",")):
        t0 = time.time()
        img = dec.decode(latent, sigma, text, steps=4, seed=0, plan={**others, "attention": mode})
        rows.append({"attention": mode, "rel_l2_vs_fp32_ref": rel(img, ref), "seconds": round(time.time() - t0, 1)})
        print(f"{cfg.name} {h}x{w}, fp8 GEMMs, attention {mode:16s} rel L2 vs float32 reference "
              f"{rows[-1]['rel_l2_vs_fp32_ref']:.3e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": cfg.name, "size": [h, w], "steps": 4, "rows": rows, "torch": torch.__version__,
                       "note": "CPU, Triton interpreter, float32, random weights"}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
