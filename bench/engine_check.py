"""The fast engine on a GPU: same answers as the reference, and memory as estimated.

    python -m bench.engine_check [--quick] [--out DIR]

For each case: one random float32 network; the reference decodes in float32 (the
oracle), the fast engine decodes a bfloat16 copy of the same weights with the same seed
(so the same noise); the relative L2 error of the images must be at most 2e-2. Then the
fast path's peak memory is compared with `pidkern.estimate_memory`. Writes
engine_check_<card>_<date>.json.
"""
from __future__ import annotations

import argparse
import copy
import gc
import time
import traceback

import torch

from pidkern import benchmark as pb
from pidkern.api import Decoder
from pidkern.config import get_preset
from pidkern.engine import estimate_memory
from pidkern.timing import environment, write_result

PARITY_BAR = 2e-2

# (preset, batch, height, width, sigma per sample)
FULL_CASES = [
    ("flux-2k", 1, 2048, 2048, [0.0]),
    ("flux-2k", 2, 1040, 1552, [0.0, 0.35]),
    ("flux-2kto4k-v1.5", 1, 1024, 1024, [0.2]),
    ("flux2-2kto4k-v1.5", 1, 1024, 1024, [0.35]),
    ("siglip-2k", 1, 1024, 1024, [0.0]),
]
QUICK_CASES = [("flux-2k", 2, 1040, 1552, [0.0, 0.35]), ("flux-2kto4k-v1.5", 1, 1024, 1024, [0.2])]
MEMORY_CASES = [("flux-2k", 1, 1024, 1024), ("flux-2k", 1, 2048, 2048), ("flux-2k", 1, 4096, 4096),
                ("flux-2k", 4, 2048, 2048)]


def inputs(cfg, b, h, w, sigma, dev):
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(b, cfg.latent_channels, h // cfg.upscale, w // cfg.upscale, generator=g).to(dev)
    text = torch.randn(b, cfg.max_text, cfg.text_dim, generator=g).to(dev)
    return latent, torch.tensor(sigma, device=dev), text


def parity(preset, b, h, w, sigma, dev, log=print):
    cfg = get_preset(preset)
    net32 = pb.random_net(cfg, dev, torch.float32, seed=3)
    latent, s, text = inputs(cfg, b, h, w, sigma, dev)
    ref_dec = Decoder(net32, dev, torch.float32, "random")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    t0 = time.perf_counter()
    ref = ref_dec.decode(latent, s, text, seed=11, backend="reference")
    t_ref = time.perf_counter() - t0
    net16 = copy.deepcopy(net32).to(torch.bfloat16)
    del ref_dec, net32
    gc.collect()
    torch.cuda.empty_cache()
    fast_dec = Decoder(net16, dev, torch.bfloat16, "random")
    t0 = time.perf_counter()
    fast = fast_dec.decode(latent, s, text, seed=11, backend="fast")
    torch.cuda.synchronize()
    t_first = time.perf_counter() - t0
    fast2 = fast_dec.decode(latent, s, text, seed=11, backend="fast")  # graph replay
    bf16_ref = fast_dec.decode(latent, s, text, seed=11, backend="reference")  # the release's own bf16 error
    rel = ((fast - ref).norm() / ref.norm()).item()
    rec = dict(preset=preset, batch=b, height=h, width=w, sigma=sigma, rel_l2=rel,
               rel_l2_replay=((fast2 - ref).norm() / ref.norm()).item(),
               rel_l2_reference_bf16=((bf16_ref - ref).norm() / ref.norm()).item(),
               replay_bitwise_equal=bool(torch.equal(fast, fast2)),
               finite=bool(torch.isfinite(fast).all()), passed=rel <= PARITY_BAR and bool(torch.isfinite(fast).all()),
               reference_fp32_s=t_ref, fast_first_call_s=t_first,
               attention_choice={str(k): v for k, v in fast_dec.engine()._attn_choice.items()})
    log(f"parity {preset} {b}x{h}x{w} sigma={sigma}: rel L2 {rel:.2e} (bf16 reference {rec['rel_l2_reference_bf16']:.2e}) "
        f"{'PASS' if rec['passed'] else 'FAIL'}; first call {t_first:.1f} s")
    del fast_dec, net16
    gc.collect()
    torch.cuda.empty_cache()
    return rec


def memory(preset, b, h, w, dev, log=print):
    cfg = get_preset(preset)
    dec = pb.random_decoder(cfg, dev, torch.bfloat16)
    latent, s, text = inputs(cfg, b, h, w, [0.1] * b, dev)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    m = pb.measure(lambda: dec.decode(latent, s, text, seed=0, backend="fast"), dev, reps=5, warmup=2, max_s=20)
    est = estimate_memory(cfg, b, h, w)
    peak = torch.cuda.max_memory_allocated(dev)
    rec = dict(preset=preset, batch=b, height=h, width=w, median_ms=m["median_ms"], first_call_ms=m["first_call_ms"],
               peak_gib=peak / 2**30, estimate_gib=est / 2**30, estimate_error=(est - peak) / peak,
               images_per_s=b * 1e3 / m["median_ms"])
    log(f"fast {preset} {b}x{h}x{w}: {m['median_ms']:.1f} ms (first {m['first_call_ms'] / 1e3:.1f} s), peak "
        f"{rec['peak_gib']:.2f} GiB, estimate {rec['estimate_gib']:.2f} GiB ({100 * rec['estimate_error']:+.1f}%)")
    del dec
    gc.collect()
    torch.cuda.empty_cache()
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--budget-s", type=float, default=240)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    start = time.perf_counter()
    payload = {"env": environment(), "parity": [], "memory": [], "errors": []}
    cases = QUICK_CASES if args.quick else FULL_CASES
    mem_cases = MEMORY_CASES[:2] if args.quick else MEMORY_CASES
    for kind, fn, todo in (("parity", parity, cases), ("memory", memory, mem_cases)):
        for case in todo:
            if time.perf_counter() - start > args.budget_s:
                payload["errors"].append(f"{kind} {case}: skipped, budget reached")
                continue
            try:
                payload[kind].append(fn(*case, dev) if kind == "memory" else fn(*case, dev))
            except Exception as e:  # keep the other cases' numbers
                payload["errors"].append(f"{kind} {case}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}")
                print(payload["errors"][-1], flush=True)
                gc.collect()
                torch.cuda.empty_cache()
            path = write_result(payload, "engine_check", args.out)
    print(f"wrote {path}")
    return 0 if all(r["passed"] for r in payload["parity"]) and not payload["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
