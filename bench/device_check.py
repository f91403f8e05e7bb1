"""Everything pidkern needs a GPU for, in one call: build, test, time.

    python bench/device_check.py --out "$OUT" [--quick] [--budget-s 480]

Stages, in order of what matters most, each in its own process (a crash in one keeps
the others' results) and each under its own share of the time budget:
  1. install: `pip install --no-build-isolation --no-deps -e .` (builds pidkern._C with CUDA)
  2. engine:  fast vs reference images, speed and memory vs the release way, a profile
  3. tests:   every test marked `cuda`, one process per file
  4. kernels: bench/kernels.py, every fused op against its PyTorch path (CUDA-graph timed)
  5. attention8: bench/attention_fp8_check.py, every attention route (bf16 and 8-bit) at
              the 2048² shapes: ms, TFLOP/s, error against float32
  6. parallel: bench/parallel_check.py, the one-rank sequence-parallel decode against the
              plain one (the issue's bar: within 3%)
  7. windows: bench/window_check.py, 8192² from a 2048² image's latent in 2048² windows
              against 25 x one 2048² decode, same run (docs/windows.md)
  8. suite:   end-to-end rows: fast (bf16), fp8, the release eager and under torch.compile,
              at 1024² and 2048² (4096² without --quick), only with time left
Writes its JSON files and log.txt under --out and prints a short table last.

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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "bench" / "results")))
    ap.add_argument("--quick", action="store_true", help="a short first look: fewer cases, no suite")
    ap.add_argument("--budget-s", type=float, default=480, help="whole-run limit (default: 8 minutes)")
    ap.add_argument("--skip", default="", help="comma-separated stages to skip")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.txt"
    t0 = time.perf_counter()
    summary = {"stages": {}}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    skip = set(filter(None, args.skip.split(",")))

    def left():
        return args.budget_s - (time.perf_counter() - t0)

    def stage(name, cmd, share):
        if name in skip:
            summary["stages"][name] = {"rc": None, "note": "skipped by --skip"}
            return None
        limit = max(10.0, min(share, left() - 5))
        if left() < 15:
            summary["stages"][name] = {"rc": None, "note": "no time left"}
            print(f"== {name}: skipped, no time left", flush=True)
            return None
        print(f"== {name} (limit {limit:.0f} s): {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        with open(log_path, "a") as log:
            log.write(f"\n== {name}: {' '.join(cmd)}\n")
            log.flush()
            try:
                proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, timeout=limit)
                rc, text = proc.returncode, proc.stdout
            except subprocess.TimeoutExpired as e:
                rc, text = "timeout", (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            log.write(text)
        secs = time.perf_counter() - start
        tail = text.strip().splitlines()[-12:]
        summary["stages"][name] = {"rc": rc, "seconds": round(secs, 1), "tail": tail}
        print("\n".join(tail), flush=True)
        print(f"== {name}: rc={rc} in {secs:.0f} s", flush=True)
        return rc

    py = sys.executable
    q = args.quick
    stage("install", [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."], 60)
    stage("engine", [py, "-m", "bench.engine_check", "--out", str(out), "--budget-s", "80" if q else "100"] +
          (["--quick"] if q else []), 100 if q else 120)
    # one pytest process per file: an illegal memory access poisons the CUDA context for
    # every later test of its process (seen on H200, 2026-11-26: one attention test took 24
    # others down with it)
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                   if "pytest.mark.cuda" in p.read_text())
    stage("tests", ["bash", "-c", " ; ".join(
        f"echo '-- {f}'; {py} -m pytest -q -rfE -m cuda -p no:cacheprovider --timeout 60 {f} 2>&1 | tail -n 25"
        for f in files)], 90)
    stage("kernels", [py, "-m", "bench.kernels", "--out", str(out), "--reps", "10"], 70)
    stage("attention8", [py, "-m", "bench.attention_fp8_check", "--out", str(out), "--budget-s", "50"], 70)
    stage("parallel", [py, "-m", "bench.parallel_check", "--out", str(out), "--reps", "3"] +
          (["--sizes", "2048"] if q else []), 90)
    stage("windows", [py, "-m", "bench.window_check", "--out", str(out), "--reps", "1"] +
          (["--steps", "1"] if q else []), 120)   # both eager; --graphs: both captured
    stage("suite", [py, "-m", "bench", "--sizes", "1024,2048" if q else "1024,2048,4096", "--batches", "1",
                    "--rows", "fast,fp8,release,compile", "--max-row-s", "5",
                    "--budget-s", str(int(max(20, left() - 45))), "--out", str(out)], left() - 5)

    summary["total_s"] = round(time.perf_counter() - t0, 1)
    (out / "device_check.json").write_text(json.dumps(summary, indent=1))
    table(out, summary)


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
