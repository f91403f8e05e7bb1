"""Everything pidkern needs a GPU for, in one call: build, test, time.

    python bench/device_check.py --out "$OUT" [--quick] [--budget-s 480] [--skip a,b] [--dry-run]

Stages, in order of what matters most, each in its own process (a crash in one keeps
the others' results) and each under its own share of the time budget (the whole run,
warm-up and compilation included, stays within --budget-s; a stage starts only with at
least 15 s left):
  1. install:  `pip install --no-build-isolation --no-deps -e .` (builds pidkern._C with CUDA)
  2. launch:   bench/config_launch.py, every autotune config offered on this card's
               architecture family actually launched (bench.compile_matrix checked them offline)
  3. tests:    every test marked `cuda`, one process per file
  4. suite:    end-to-end rows fast (bf16), fp8, int8 (when this build has the precision;
               otherwise recorded as skipped with the reason), the release eager and under
               torch.compile, at 1024² and 2048²
  5. attention8: bench/attention_fp8_check.py, every attention route (bf16 and 8-bit) at
               the 2048² shapes: ms, TFLOP/s, error against float32 (the race's candidates)
  then, only with time left: engine (fast vs reference images, memory vs the estimate),
  kernels (every fused op against its PyTorch path), parallel (the one-rank sequence-parallel
  decode against the plain one), windows (8192² in 2048² windows against the windows x one
  2048² decode, docs/windows.md).
Writes device_check.json (stages, seconds, limits, what was skipped and why) and every
stage's own JSON under --out, and prints a short table last. --dry-run prints the plan
and writes the JSON without running anything.

The 8-bit libraries (torchao, sageattention, cuDNN's frontend) are not on the GPU machine:
`bash bench/device_wheels.sh` here puts their wheels in .whl/; carry .whl and start the
command there with
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
Routes whose library is missing are recorded as failed and the rest still run.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIN_START_S = 15      # a stage with less left is skipped
MARGIN_S = 5          # kept back for writing the summary


@dataclass
class Stage:
    name: str
    cmd: list
    share: float          # the most seconds it may take
    optional: bool = False  # runs only when the required stages left time


def suite_rows() -> tuple[list[str], dict]:
    """The suite rows to run and {row: why skipped}: int8 only where bench.suite has it."""
    from bench.suite import ROWS
    rows = ["fast", "fp8", "release", "compile"]
    skipped = {}
    if "int8" in ROWS:
        rows.insert(2, "int8")
    else:
        skipped["int8"] = "bench.suite has no int8 row: this build has no int8 precision"
    return rows, skipped


def cuda_test_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if "pytest.mark.cuda" in p.read_text())


def plan(out: Path, quick: bool, py: str = sys.executable) -> tuple[list[Stage], dict]:
    """The stages in order, and what the suite leaves out."""
    rows, skipped = suite_rows()
    # one pytest process per file: an illegal memory access poisons the CUDA context for
    # every later test of its process (seen on H200, 2026-11-26: one attention test took 24
    # others down with it)
    tests = " ; ".join(f"echo '-- {f}'; {py} -m pytest -q -rfE -m cuda -p no:cacheprovider --timeout 60 {f} 2>&1 "
                       f"| tail -n 25" for f in cuda_test_files())
    stages = [
        Stage("install", [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."], 60),
        Stage("launch", [py, "-m", "bench.config_launch", "--out", str(out)], 45),
        Stage("tests", ["bash", "-c", tests], 90),
        Stage("suite", [py, "-m", "bench", "--sizes", "1024,2048", "--batches", "1", "--rows", ",".join(rows),
                        "--max-row-s", "5", "--budget-s", "{suite_budget}", "--out", str(out)], 150),
        Stage("attention8", [py, "-m", "bench.attention_fp8_check", "--out", str(out), "--budget-s", "40"], 60),
        Stage("engine", [py, "-m", "bench.engine_check", "--out", str(out), "--budget-s", "80", "--quick"], 100,
              optional=True),
        Stage("kernels", [py, "-m", "bench.kernels", "--out", str(out), "--reps", "10"], 70, optional=True),
        Stage("parallel", [py, "-m", "bench.parallel_check", "--out", str(out), "--reps", "3"]
              + (["--sizes", "2048"] if quick else []), 90, optional=True),
        Stage("windows", [py, "-m", "bench.window_check", "--out", str(out), "--reps", "1"]
              + (["--steps", "1"] if quick else []), 120, optional=True),
    ]
    if quick:
        stages = [s for s in stages if s.name not in ("suite", "kernels")]
    return stages, {"suite": skipped}


def subprocess_runner(cmd, limit, log_path):
    """(rc, output) of cmd run for at most `limit` seconds ("timeout" when cut off)."""
    with open(log_path, "a") as log:
        log.write(f"\n== {' '.join(cmd)}\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=limit)
            rc, text = proc.returncode, proc.stdout
        except subprocess.TimeoutExpired as e:
            rc, text = "timeout", (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        log.write(text)
    return rc, text


def run(stages, budget_s: float, skip=(), runner=None, clock=time.perf_counter, log_path=None, dry_run=False) -> dict:
    """Run the stages under the budget; returns the summary. Required stages get at most
    their share and never more than the time left (less the margin); optional ones run
    only after every required one, in what remains."""
    t0 = clock()
    summary = {"budget_s": budget_s, "stages": {}}

    def left():
        return budget_s - (clock() - t0)

    required = [s for s in stages if not s.optional]
    for st in required + [s for s in stages if s.optional]:
        if st.name in skip:
            summary["stages"][st.name] = {"rc": None, "note": "skipped by --skip"}
            continue
        if left() < MIN_START_S + MARGIN_S:
            summary["stages"][st.name] = {"rc": None, "note": f"no time left ({max(0.0, left()):.0f} s)"}
            print(f"== {st.name}: skipped, no time left", flush=True)
            continue
        limit = min(st.share, left() - MARGIN_S)
        cmd = [c.replace("{suite_budget}", str(int(max(10, limit - 20)))) for c in st.cmd]
        if dry_run:
            summary["stages"][st.name] = {"rc": None, "limit_s": round(limit, 1), "cmd": cmd, "note": "dry run"}
            print(f"== {st.name} (limit {limit:.0f} s): {' '.join(cmd)}", flush=True)
            continue
        print(f"== {st.name} (limit {limit:.0f} s): {' '.join(cmd)}", flush=True)
        start = clock()
        rc, text = (runner or subprocess_runner)(cmd, limit, log_path)
        secs = clock() - start
        tail = text.strip().splitlines()[-12:]
        summary["stages"][st.name] = {"rc": rc, "seconds": round(secs, 1), "limit_s": round(limit, 1), "tail": tail}
        print("\n".join(tail), flush=True)
        print(f"== {st.name}: rc={rc} in {secs:.0f} s", flush=True)
    summary["total_s"] = round(clock() - t0, 1)
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "bench" / "results")))
    ap.add_argument("--quick", action="store_true", help="a short first look: fewer cases, no suite")
    ap.add_argument("--budget-s", type=float, default=480, help="whole-run limit (default: 8 minutes)")
    ap.add_argument("--skip", default="", help="comma-separated stages to skip")
    ap.add_argument("--dry-run", action="store_true", help="print the stages and their limits; run nothing")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages, skipped = plan(out, args.quick)
    summary = run(stages, args.budget_s, set(filter(None, args.skip.split(","))), log_path=out / "log.txt",
                  dry_run=args.dry_run)
    summary["skipped"] = skipped
    (out / "device_check.json").write_text(json.dumps(summary, indent=1))
    table(out, summary)
    return summary


def table(out: Path, summary: dict):
    print("\n======== device_check summary ========")
    for name, s in summary["stages"].items():
        print(f"{name:8s} rc={s.get('rc')!s:8s} {s.get('seconds', 0):6.0f} s  {s.get('note', '')}")
    for path in sorted(glob.glob(str(out / "engine_check_*.json"))):
        data = json.loads(Path(path).read_text())
        for r in data.get("parity", []):
            print(f"parity {r['preset']:20s} {r['batch']}x{r['height']}x{r['width']}: rel L2 {r['rel_l2']:.2e} "
                  f"{'PASS' if r['passed'] else 'FAIL'}")
        for r in data.get("memory", []):
            rel = f"  release {r['release_ms']:7.1f} ms x{r['speedup_vs_release']:.2f}" if "release_ms" in r else ""
            print(f"fast   {r['preset']:20s} {r['batch']}x{r['height']}x{r['width']}: {r['median_ms']:8.1f} ms  "
                  f"peak {r['peak_gib']:.2f} GiB resident {r['resident_gib']:.2f} est {r['estimate_gib']:.2f}{rel}")
        for e in data.get("errors", []):
            print("engine error:", e.splitlines()[0][:160])
    for path in sorted(glob.glob(str(out / "kernels_*.json"))):
        for r in json.loads(Path(path).read_text()).get("kernels", []):
            rate = (f"{r['fused_tflops']:6.0f} TF/s" if "fused_tflops" in r else f"{r.get('fused_gbps', 0):6.0f} GB/s")
            print(f"kernel {r['name']:38s} {r['fused']['median_ms']:8.3f} ms {rate}  x{r['speedup']:.2f} vs torch")
    for path in sorted(glob.glob(str(out / "window_check_*.json"))):
        r = json.loads(Path(path).read_text())["window"]
        print(f"windows {r['preset']} {r['side']}² in {r['windows']} x {r['window'][0]}²: {r['windowed_ms']:.0f} ms, "
              f"peak {r.get('peak_gib', 0):.2f} GiB (est {r['estimate_gib']:.2f}), overhead {r['overhead']:.3f}")
    for path in sorted(glob.glob(str(out / "suite_*.md"))):
        print(Path(path).read_text())


if __name__ == "__main__":
    main()
