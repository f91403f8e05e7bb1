"""Per-op benchmark of the fused kernels against the PyTorch path, same run, same card.

Each module in bench/kernel_cases/ exposes `cases(device) -> list[Case]`. For every case
this prints median ms, GB/s or TFLOP/s and the ratio to the PyTorch path, and writes
JSON under bench/results/ (or --out). `python -m bench.kernels [--only NAME] [--out DIR]`

Both sides are captured in a CUDA graph and the replays timed (pidkern.timing.time_graph_ms),
as the engine runs them: a 0.1 ms memory-bound kernel launched from Python through a
custom op and an autotuner is otherwise timed as its host dispatch. `--eager` times
plain calls instead.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

import torch

from pidkern.timing import environment, time_graph_ms, time_ms, write_result


@dataclass
class Case:
    name: str                      # e.g. "attention/patch-hd64"
    fused: Callable[[], object]    # the pidkern kernel
    baseline: Callable[[], object]  # the PyTorch path it replaces
    flops: float = 0.0             # useful FLOPs of one call (0: memory-bound)
    bytes: float = 0.0             # fewest bytes one call must move (read + write)
    note: str = ""


# Modules whose bars were never measured first, so a cut-off run still has them.
FIRST = ("output_stage", "memory_bound", "attention")


def collect(device: str, only: str | None = None) -> list[Case]:
    import bench.kernel_cases as pkg
    names = [m.name for m in pkgutil.iter_modules(pkg.__path__)]
    names.sort(key=lambda n: (FIRST.index(n) if n in FIRST else len(FIRST), n))
    cases = []
    for name in names:
        if only and only not in name:
            continue
        cases += importlib.import_module(f"bench.kernel_cases.{name}").cases(device)
    return cases


def run(device: str, only: str | None = None, warmup: int = 5, reps: int = 20, save=None,
        graphs: bool = True) -> list[dict]:
    """Time every case; `save(rows)` is called after each one so a cut-off run keeps its numbers."""
    rows = []
    timer = time_graph_ms if graphs else time_ms
    for case in collect(device, only):
        fused = timer(case.fused, warmup=warmup, reps=reps, device=device)
        base = timer(case.baseline, warmup=warmup, reps=reps, device=device)
        row = {"name": case.name, "fused": fused, "baseline": base, "note": case.note,
               "speedup": base["median_ms"] / fused["median_ms"]}
        if case.flops:
            row["fused_tflops"] = case.flops / fused["median_ms"] / 1e9
            row["baseline_tflops"] = case.flops / base["median_ms"] / 1e9
        if case.bytes:
            row["fused_gbps"] = case.bytes / fused["median_ms"] / 1e6
        rows.append(row)
        rate = (f"{row['fused_tflops']:7.1f} TFLOP/s" if case.flops else f"{row.get('fused_gbps', 0):7.0f} GB/s")
        print(f"{case.name:40s} {fused['median_ms']:8.3f} ms  {rate}  torch {base['median_ms']:8.3f} ms  x{row['speedup']:.2f}",
              flush=True)
        del case
        if save:
            save(rows)
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="run only cases whose module name contains this")
    ap.add_argument("--out", help="directory for the JSON (default bench/results)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--eager", action="store_true", help="time plain calls, not CUDA-graph replays")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        print("no CUDA device: kernel benchmarks need a GPU (the interpreter times nothing useful)")
        return 0
    env = environment()
    paths = []

    def save(rows):
        paths[:] = [write_result({"env": env, "kernels": rows}, "kernels", args.out)]

    run(device, args.only, reps=args.reps, save=save, graphs=not args.eager)
    print(f"wrote {paths[0] if paths else 'nothing'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
