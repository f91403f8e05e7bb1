"""Every attention route at the flux-2k 2048^2 shapes, on CUDA: speed and accuracy.

    python -m bench.attention_fp8_check [--out DIR] [--routes a,b] [--budget-s 240]

Shapes (pidkern.config "flux-2k", batch 1, bench/kernel_cases/attention.py): the patch
attention, 24 heads x 64 over 16384 image + 300 text tokens; the pixel attention, 16 heads
x 72 over 16384 tokens. Each route runs from the QKV Linear's output through ops.attention
(so the prep, the quantization and any padding are timed with it), CUDA-event timed after
warm-up (autotuning and graph builds outside), median of 10. The baseline is "prep+sdpa"
(the fused prep, then SDPA with cuDNN first), the bf16 route the plan races today; the
attention core alone on SDPA/cuDNN is listed too. Accuracy: relative L2 error of each
route's output against the unfused chain run in float32 on the same inputs. A route whose
library is missing or that fails is listed with its error. Writes
attention_fp8_<card>_<date>.json under --out and prints a table.
"""
from __future__ import annotations

import argparse
import time

import torch

ROUTES = ("prep+sdpa", "triton", "fp8-triton", "prep+fp8-triton", "int8-triton", "prep+int8-triton", "fp8qk-triton",
          "prep+fp8qk-triton", "int8qk-triton", "prep+int8qk-triton", "prep+sage", "prep+cudnn-fp8", "prep+flash",
          "prep+flash3-fp8")


def shapes():
    """(tag, heads, hd, L, T) of flux-2k at 2048^2, from its config."""
    from pidkern.config import get_preset
    cfg = get_preset("flux-2k")
    L = (2048 // cfg.patch) ** 2
    return (("patch", cfg.heads, cfg.head_dim, L, cfg.max_text),
            ("pixel", cfg.pixel_heads, cfg.pixel_head_dim, L, 0))


def run(routes, out_dir, budget_s: float, device: str = "cuda", cases=None) -> dict:
    """Time and check `routes` on `cases` ((tag, heads, hd, L, T), default shapes()); the
    CPU (under the Triton interpreter) only serves the script's own test."""
    from bench.kernel_cases.attention import _cudnn_sdpa, _tables
    from pidkern import ops
    from pidkern.timing import environment, time_ms, write_result

    t0 = time.perf_counter()
    dev = device
    cuda = torch.device(dev).type == "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    results = []
    for tag, heads, hd, L, T in cases or shapes():
        B, N = 1, L + T
        rnd = lambda *s: torch.randn(*s, generator=g, device=dev)  # noqa: E731
        qkv32 = (rnd(B, L, 3 * heads * hd), rnd(B, T, 3 * heads * hd) if T else None)
        w = [torch.rand(hd, generator=g, device=dev) + 0.5 for _ in range(4)]
        tabs = (_tables(L, hd, dev), _tables(T, hd, dev) if T else None)

        def args(qkv):
            return (qkv[0], qkv[1], w[0], w[1], w[2] if T else None, w[3] if T else None, *tabs, heads)

        def joint(o):
            return o[0] if o[1] is None else torch.cat([o[1], o[0]], 1)

        ref = joint(ops.attention(*args(qkv32), backend="torch")).float()
        qkv = tuple(None if x is None else x.to(torch.bfloat16 if cuda else torch.float16) for x in qkv32)
        flops = 4 * B * heads * N * N * hd
        row = {"shape": tag, "heads": heads, "hd": hd, "L": L, "T": T, "flops": flops, "routes": {}}

        # the core alone on SDPA (cuDNN where it runs), for the PERF.md anchors
        q, k, v = (x.transpose(1, 2) for x in ops.prep_qkv(*args(qkv)[:6], *tabs, heads, 1e-6))
        core = _cudnn_sdpa(q, k, v) if cuda else None
        if core is not None:
            ms = time_ms(core, warmup=3, reps=10, device=dev)["median_ms"]
            row["sdpa_cudnn_core_ms"] = ms
            row["sdpa_cudnn_core_tflops"] = flops / ms / 1e9
        del q, k, v

        for route in routes:
            if time.perf_counter() - t0 > budget_s:
                row["routes"][route] = {"error": "skipped: time budget spent"}
                continue
            fn = lambda r=route: ops.attention(*args(qkv), backend=r)  # noqa: E731
            try:
                out = joint(fn()).float()
                err = ((out - ref).norm() / ref.norm()).item()
                ms = time_ms(fn, warmup=3, reps=10, device=dev)["median_ms"]
                row["routes"][route] = {"ms": ms, "tflops": flops / ms / 1e9, "rel_l2_vs_fp32": err}
            except Exception as e:  # noqa: BLE001 - a route that cannot run here is reported, not fatal
                row["routes"][route] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            if cuda:
                torch.cuda.synchronize()
        base = row["routes"].get("prep+sdpa", {}).get("ms")
        for r in row["routes"].values():
            if base and "ms" in r:
                r["speedup_vs_prep+sdpa"] = base / r["ms"]
        results.append(row)
        del qkv, qkv32, ref
        if cuda:
            torch.cuda.empty_cache()
    payload = {"env": environment(), "results": results}
    payload["path"] = str(write_result(payload, "attention_fp8", out_dir))
    return payload


def table(payload) -> str:
    lines = [f"{'shape':<6} {'route':<18} {'ms':>8} {'TFLOP/s':>8} {'x base':>7} {'rel L2':>9}"]
    for row in payload["results"]:
        if "sdpa_cudnn_core_ms" in row:
            lines.append(f"{row['shape']:<6} {'(core: SDPA cuDNN)':<18} {row['sdpa_cudnn_core_ms']:>8.3f} "
                         f"{row['sdpa_cudnn_core_tflops']:>8.0f}")
        for route, r in row["routes"].items():
            if "ms" in r:
                lines.append(f"{row['shape']:<6} {route:<18} {r['ms']:>8.3f} {r['tflops']:>8.0f} "
                             f"{r.get('speedup_vs_prep+sdpa', float('nan')):>7.2f} {r['rel_l2_vs_fp32']:>9.2e}")
            else:
                lines.append(f"{row['shape']:<6} {route:<18} failed: {r['error'][:90]}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="directory for the JSON (default bench/results)")
    ap.add_argument("--routes", default=",".join(ROUTES), help="comma-separated ops.attention backends")
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop starting routes after this many seconds")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("attention_fp8_check: needs a CUDA GPU (it times kernels with CUDA events); none is visible")
    from pidkern.ops import ATTENTION_BACKENDS
    routes = [r for r in a.routes.split(",") if r]
    bad = [r for r in routes if r not in ATTENTION_BACKENDS]
    if bad:
        raise SystemExit(f"attention_fp8_check: --routes {bad} unknown; expected some of {ATTENTION_BACKENDS}")
    payload = run(routes, a.out, a.budget_s)
    print(table(payload))
    print(f"wrote {payload['path']}")


if __name__ == "__main__":
    main()
