"""Which layers may run in 8-bit: the error of each fp8 / int8 layer group, block by block and in the image.

    python -m bench.fp8_accuracy                        # flux-2k-sized random weights, 128², 4 steps
    python -m bench.fp8_accuracy --preset tiny:flux-2k --size 96x160 --json out.json

Two measurements, both on the CPU (torch's float8 dtypes emulate e4m3 exactly; the GEMM
is the same `torch._scaled_mm` call the GPU runs, pidkern.fp8):

1. Per block, local: one network call at the schedule's first time records every patch
   and pixel block's input and output (float32 weights and activations). Each block is
   then run again on its recorded input with the Linears of one fp8 group in e4m3
   (weights per row, activations per token, as pidkern.fp8 quantizes them) and the
   relative error of its output, ||o8 - o|| / ||o||, and of its update,
   ||o8 - o|| / ||o - x||, is reported; "all" quantizes every group of the block at once.
   The error is the block's own, not what earlier blocks passed on. The same is measured
   with the group in int8 (pidkern.int8: weights per row, activations per token), without
   and with the ConvRot rotation (Hadamard groups of the largest power of 4 up to 256
   dividing each layer's width): the "int8" and "int8_convrot" entries.
2. The image: the fast path decodes in bfloat16 with each group alone in fp8, with the
   groups of `pidkern.fast.FP8_LAYERS` (what precision="fp8" runs) and with every group,
   and each image is compared with the float32 reference decode (relative L2) and with
   the bfloat16 fast image (PSNR, images in [-1, 1], peak-to-peak 2).

3. The image on the reference path, float32: each group alone, FP8_LAYERS and every group
   in fp8, int8 and int8 with ConvRot, each image against the float32 reference decode
   (relative L2): the three 8-bit schemes compared on the same network.

Random weights are not trained weights: outliers of trained activations and weights
are missing. The numbers rank the groups; docs/fp8.md keeps them.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from pidkern import fp8, int8
from pidkern.config import get_preset, tiny
from pidkern.fast import FP8_GROUPS, FP8_LAYERS, FastPiD, fp8_linears
from pidkern.flops import decode_flops
from pidkern.sampler import schedule


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def psnr(a, b) -> float:
    mse = (a.double() - b.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)     # peak-to-peak 2 in [-1, 1]


def config_of(name: str):
    return tiny(name.split(":", 1)[1]) if name.startswith("tiny:") else get_preset(name)


def group_modules(net, group: str) -> list:
    """The net's Linears whose weights a group quantizes (w1 and w3 for "patch.w13", the
    adaLN Linear for "pixel.mod": per-row scales are the same whether the rows are
    stacked, split or regrouped as FastPiD holds them)."""
    if group == "patch.w13":
        return [m for b in net.patch_blocks for m in (b.mlp_x.w1, b.mlp_x.w3, b.mlp_y.w1, b.mlp_y.w3)]
    if group == "pixel.mod":
        return [b.adaLN_modulation[0] for b in net.pixel_blocks]
    return list(fp8_linears(net, (group,)).values())


SCHEMES = ("fp8", "int8", "int8_convrot")


@contextmanager
def in_8bit(modules, scheme: str = "fp8"):
    """Run these Linears through pidkern.fp8's GEMM or pidkern.int8's (their weights
    quantized once; "int8_convrot" rotates each by its width's ConvRot group)."""
    for m in modules:
        if scheme == "fp8":
            w = fp8.Fp8Weight.quantize(m.weight)
            m.forward = lambda x, m=m, w=w: fp8.scaled_mm(x, w, m.bias)
        else:
            rot = int8.convrot_group(m.weight.shape[1]) if scheme == "int8_convrot" else None
            w = int8.Int8Weight.quantize(m.weight, rot)
            m.forward = lambda x, m=m, w=w: int8.linear(x, w, m.bias)
    try:
        yield
    finally:
        for m in modules:
            del m.forward


def record_blocks(net, args):
    """{block: (args, kwargs, output)} of one reference network call."""
    seen = {}
    hooks = [blk.register_forward_hook(lambda mod, a, kw, out: seen.__setitem__(mod, (a, kw, out)), with_kwargs=True)
             for blk in (*net.patch_blocks, *net.pixel_blocks)]
    try:
        net(*args[0], **args[1])
    finally:
        for h in hooks:
            h.remove()
    return seen


def _stream(out):
    return torch.cat([t.flatten().double() for t in (out if isinstance(out, tuple) else (out,)) if t is not None])


def block_errors(net, inputs) -> list[dict]:
    seen = record_blocks(net, inputs)
    rows = []
    blocks = [("patch", i, b) for i, b in enumerate(net.patch_blocks)] + \
             [("pixel", i, b) for i, b in enumerate(net.pixel_blocks)]
    for kind, i, blk in blocks:
        a, kw, out = seen[blk]
        # patch blocks: the image and text streams (the last block leaves the text as it was)
        keep = (0,) if kind == "pixel" or out[1] is a[1] else (0, 1)
        pick = (lambda r: tuple(r[k] for k in keep)) if kind == "patch" else (lambda r: r)
        o, x = _stream(pick(out)), _stream(pick(a[:2]) if kind == "patch" else a[0])
        groups = [g for g in FP8_GROUPS if g.startswith(kind)]
        row = {"block": f"{kind}.{i}"}
        for g in (*groups, "all"):
            inside = {id(m) for m in blk.modules()}
            mods = [m for gg in (groups if g == "all" else [g]) for m in group_modules(net, gg) if id(m) in inside]
            if not mods:
                continue
            row[g] = {}
            for scheme in SCHEMES:
                with in_8bit(mods, scheme):
                    o8 = _stream(pick(blk(*a, **kw)))
                err = {"out": ((o8 - o).norm() / o.norm()).item(), "update": ((o8 - o).norm() / (o - x).norm()).item()}
                row[g].update(err) if scheme == "fp8" else row[g].__setitem__(scheme, err)
        rows.append(row)
    return rows


def _flops_share(cfg, h, w, text_len) -> dict:
    """Each group's share of a decode's FLOPs (pidkern.flops' model, split by layer)."""
    d = decode_flops(cfg, 1, h, w, 1, text_tokens=text_len)
    total = d["per_step"]
    L = (h // cfg.patch) * (w // cfg.patch)
    D, A, P2, Dp, T = cfg.hidden, cfg.pixel_attn_dim, cfg.pixels_per_patch, cfg.pixel_dim, text_len
    n = cfg.patch_blocks
    return {
        "patch.qkv": n * (L + T) * 2 * 3 * D * D / total,
        "patch.proj": n * (L + T) * 2 * D * D / total,
        "patch.w13": n * (L + T) * 2 * 2 * D * cfg.mlp_hidden / total,
        "patch.w2": n * (L + T) * 2 * D * cfg.mlp_hidden / total,
        "pixel.mod": cfg.pixel_blocks * L * 2 * D * 6 * Dp * P2 / total,
        "pixel.compress": cfg.pixel_blocks * L * 2 * P2 * Dp * A / total,
        "pixel.qkv": cfg.pixel_blocks * L * 2 * 3 * A * A / total,
        "pixel.proj": cfg.pixel_blocks * L * 2 * A * A / total,
        "pixel.expand": cfg.pixel_blocks * L * 2 * P2 * Dp * A / total,
    }


def image_errors(net32, cfg, latent, sigma, text, steps, progress) -> list[dict]:
    from pidkern.api import Decoder
    net16 = __import__("copy").deepcopy(net32).to(torch.bfloat16)
    ref = Decoder(net32, torch.device("cpu"), torch.float32, "random").decode(
        latent, sigma, text, steps=steps, seed=0, backend="reference")
    bf16 = Decoder(net16, torch.device("cpu"), torch.bfloat16, "random")
    native = bf16.decode(latent, sigma, text, steps=steps, seed=0, backend="fast")
    rows = [{"layers": "none (bf16 fast)", "rel_l2_vs_fp32_ref": rel(native, ref), "psnr_vs_bf16_fast": math.inf}]
    dec8 = Decoder(net16, torch.device("cpu"), torch.bfloat16, "random", precision="fp8")
    eng = dec8.engine()
    configs = [(g, (g,)) for g in FP8_GROUPS] + [("FP8_LAYERS (precision='fp8')", FP8_LAYERS), ("all", FP8_GROUPS)]
    for name, layers in progress(configs):
        eng.model = FastPiD(net16, torch.bfloat16, "fp8", layers)
        img = dec8.decode(latent, sigma, text, steps=steps, seed=0, backend="fast")
        rows.append({"layers": name, "rel_l2_vs_fp32_ref": rel(img, ref), "psnr_vs_bf16_fast": psnr(img, native)})
    return rows


def reference_image_errors(net32, latent, sigma, text, steps, progress) -> list[dict]:
    """The float32 reference decode with groups' Linears in each 8-bit scheme, against the
    plain float32 reference decode: the schemes compared where nothing else rounds."""
    from pidkern.api import Decoder
    dec = Decoder(net32, torch.device("cpu"), torch.float32, "random")
    ref = dec.decode(latent, sigma, text, steps=steps, seed=0, backend="reference")
    rows = []
    configs = [(g, (g,)) for g in FP8_GROUPS] + [("FP8_LAYERS", FP8_LAYERS), ("all", FP8_GROUPS)]
    for name, layers in progress(configs):
        mods = [m for g in layers for m in group_modules(net32, g)]
        row = {"layers": name}
        for scheme in SCHEMES:
            with in_8bit(mods, scheme):
                row[scheme] = rel(dec.decode(latent, sigma, text, steps=steps, seed=0, backend="reference"), ref)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fp8_accuracy", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="flux-2k", help="a preset, or tiny:PRESET (default flux-2k)")
    ap.add_argument("--size", default=None, help="output HxW (default: 128x128, tiny presets 96x160)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--text-len", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, metavar="PATH")
    ap.add_argument("--blocks-only", action="store_true", help="only the per-block measurement (no image decodes)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="pidkern.load: no checkpoint")
    from tqdm.auto import tqdm

    from pidkern.api import random_net
    cfg = config_of(args.preset)
    h, w = (int(v) for v in (args.size or ("96x160" if args.preset.startswith("tiny:") else "128x128")).split("x"))
    if h % cfg.upscale or w % cfg.upscale:
        raise SystemExit(f"--size {h}x{w}: expected multiples of {cfg.upscale} (the preset's latent-to-image factor)")
    torch.manual_seed(args.seed)
    t0 = time.time()
    net = random_net(cfg, "cpu", torch.float32, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)
    latent = torch.randn(1, cfg.latent_channels, h // cfg.upscale, w // cfg.upscale, generator=g)
    args.text_len = min(args.text_len, cfg.max_text)
    text = torch.randn(1, args.text_len, cfg.text_dim, generator=g)
    sigma = torch.tensor([0.2])
    x = torch.randn(1, 3, h, w, generator=g)
    t = schedule(args.steps)[0]
    with torch.no_grad():
        blocks = block_errors(net, ((x, torch.full((1,), t), text, latent, sigma), {}))
        images = reference = []
        if not args.blocks_only:
            images = image_errors(net, cfg, latent, sigma, text, args.steps,
                                  lambda it: tqdm(it, desc="fp8 image decodes", leave=False))
            reference = reference_image_errors(net, latent, sigma, text, args.steps,
                                               lambda it: tqdm(it, desc="8-bit reference decodes", leave=False))
    share = _flops_share(cfg, h, w, args.text_len)
    share_2k = _flops_share(get_preset(cfg.name.removeprefix("tiny-")), 2048, 2048, 300)
    out = {"preset": cfg.name, "size": [h, w], "steps": args.steps, "text_len": args.text_len,
           "seed": args.seed, "fp8_layers": list(FP8_LAYERS), "flops_share_here": share,
           "flops_share_2048": share_2k, "blocks": blocks, "images": images, "reference_images": reference, "seconds": time.time() - t0,
           "torch": torch.__version__, "note": "CPU-emulated e4m3, exact int8 (torch._int_mm on the CPU), random weights"}
    print(f"{cfg.name} {h}x{w}, {args.steps} steps, random weights, CPU-emulated fp8")
    print("\nper block, local (that block's GEMMs of one group in fp8): rel. error of output / of update")
    groups = [g for g in (*FP8_GROUPS, "all")]
    for r in blocks:
        cells = [f"{gname}={r[gname]['out']:.2e}/{r[gname]['update']:.2e}" for gname in groups if gname in r]
        print(f"  {r['block']:<9} " + "  ".join(cells))
    print("\nlargest per block (update): " + ", ".join(
        f"{gname} {max(r[gname]['update'] for r in blocks if gname in r):.2e}" for gname in groups
        if any(gname in r for r in blocks)))
    print("\nint8 per block, local (update): without / with ConvRot")
    for r in blocks:
        cells = [f"{gname}={r[gname]['int8']['update']:.2e}/{r[gname]['int8_convrot']['update']:.2e}"
                 for gname in groups if gname in r]
        print(f"  {r['block']:<9} " + "  ".join(cells))
    print("\nlargest per block (update), fp8 / int8 / int8+ConvRot: " + ", ".join(
        f"{gname} {max(r[gname]['update'] for r in blocks if gname in r):.2e}/"
        f"{max(r[gname]['int8']['update'] for r in blocks if gname in r):.2e}/"
        f"{max(r[gname]['int8_convrot']['update'] for r in blocks if gname in r):.2e}" for gname in groups
        if any(gname in r for r in blocks)))
    if images:
        print("\nimage, float32 reference path with these groups in 8-bit: rel L2 vs the float32 reference")
        print(f"  {'groups':<30} {'fp8':>10} {'int8':>10} {'int8+ConvRot':>13}")
        for r in reference:
            print(f"  {r['layers']:<30} {r['fp8']:>10.3e} {r['int8']:>10.3e} {r['int8_convrot']:>13.3e}")
        print("\nimage (bf16 fast path with these groups in fp8):")
        print(f"  {'groups in fp8':<30} {'rel L2 vs fp32 ref':>19} {'PSNR vs bf16 fast':>18} {'FLOP share @2048²':>18}")
        for r in images:
            s = share_2k.get(r["layers"])
            print(f"  {r['layers']:<30} {r['rel_l2_vs_fp32_ref']:>19.3e} {r['psnr_vs_bf16_fast']:>15.1f} dB"
                  f" {'' if s is None else f'{100 * s:>17.1f}%'}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
