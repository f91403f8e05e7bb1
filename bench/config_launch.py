"""On the card at hand: does every autotune config the library offers here actually launch?

    python -m bench.config_launch [--out DIR]

bench.compile_matrix says offline which configs fit each target; this runs them. Every
fused op of bench/kernel_cases/ is called once (its autotuner then times every offered
config of its architecture family), and so is the attention kernel in each mode the card
has tensor cores for (e4m3 from sm_89). Triton's autotuner records a config that cannot
launch (out of shared memory or registers) with an infinite time instead of failing; this
reads those records back from every `ArchAutotune` of pidkern/kernels/ and lists, per
kernel and tuning key, the configs timed, the one chosen and any that did not launch.
Writes config_launch_<card>_<date>.json. Exit status 1 when an offered config did not launch.
"""
from __future__ import annotations

import argparse
import importlib
import math
import pkgutil
import sys


def tuners():
    """{"module.name": ArchAutotune} of every kernel module."""
    import pidkern.kernels as pkg
    from pidkern.kernels._common import ArchAutotune
    out = {}
    for m in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"pidkern.kernels.{m.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, ArchAutotune):
                out[f"{m.name}.{name}"] = obj
    return out


def report(tuned: dict) -> tuple[list[dict], list[str]]:
    """Rows (kernel, family/extra, configs timed, chosen, failed) and the problems, from the
    autotuners' records (`configs_timings`, the last tuning of each)."""
    rows, problems = [], []
    for name, arch in tuned.items():
        for key, tuner in arch._tuned.items():
            timings = getattr(tuner, "configs_timings", None) or {}
            failed = [str(c) for c, t in timings.items() if not all(math.isfinite(x) for x in (t if isinstance(t, list)
                                                                                               else [t]))]
            best = min(timings, key=lambda c: timings[c][0] if isinstance(timings[c], list) else timings[c]) \
                if timings else None
            rows.append({"kernel": name, "family": list(key), "timed": len(timings), "offered": len(tuner.configs),
                         "chosen": str(best) if best else None, "failed": failed})
            problems += [f"{name} {key}: {c} did not launch" for c in failed]
    return rows, problems


def _attention_modes(device):
    import torch

    from pidkern.kernels import attention
    from pidkern.kernels.attention import MODES
    cap = torch.cuda.get_device_capability(device)
    modes = [None, "int8qk"] + ([m for m in MODES if m != "int8qk"] if cap >= (8, 9) else [])
    g = torch.Generator(device=device).manual_seed(0)
    for heads, hd, L, T in ((24, 64, 1024, 300), (16, 72, 1024, 0)):
        def t(*shape, dtype=torch.bfloat16):
            return torch.randn(*shape, device=device, dtype=dtype, generator=g)
        qkv = t(1, L, 3 * heads * hd)
        txt = t(1, T, 3 * heads * hd) if T else None
        w = [t(hd) for _ in range(4)]
        tabs = [t(n, hd // 2, dtype=torch.float32) for n in (L, L, T, T)] if T else [t(L, hd // 2, dtype=torch.float32)] * 2
        for mode in modes:
            attention.attention_fused(qkv, txt, w[0], w[1], w[2] if T else None, w[3] if T else None,
                                      tabs[0], tabs[1], tabs[2] if T else None, tabs[3] if T else None, heads,
                                      mode=mode)
    torch.cuda.synchronize(device)
    return [m or "bf16" for m in modes]


def main(argv=None) -> int:
    import torch

    from bench.kernels import collect
    from pidkern.timing import environment, write_result
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="directory for the JSON (default bench/results)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("config_launch: no CUDA device (it launches kernels); nothing to check")
        return 0
    errors = []
    for case in collect("cuda"):
        try:
            case.fused()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - a case that cannot run is a finding, the rest still run
            errors.append(f"{case.name}: {type(e).__name__}: {e}"[:300])
    try:
        modes = _attention_modes("cuda")
    except Exception as e:  # noqa: BLE001
        modes = []
        errors.append(f"attention modes: {type(e).__name__}: {e}"[:300])
    rows, problems = report(tuners())
    for r in rows:
        print(f"{r['kernel']:32s} {'/'.join(map(str, r['family'])):14s} timed {r['timed']}/{r['offered']}  "
              f"chosen {r['chosen']}  {'FAILED: ' + '; '.join(r['failed']) if r['failed'] else ''}")
    for e in errors + problems:
        print("PROBLEM:", e)
    path = write_result({"env": environment(), "rows": rows, "attention_modes": modes, "errors": errors,
                         "problems": problems}, "config_launch", args.out)
    print(f"config_launch: wrote {path}")
    return 1 if problems or errors else 0


if __name__ == "__main__":
    sys.exit(main())
