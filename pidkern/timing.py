"""Timing and environment capture shared by `pidkern bench` and every benchmark in bench/.

Rules: CUDA events around the timed region, warm-up outside it, median of
at least 5 runs; host clocks with a synchronize only on the CPU.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch


def time_ms(fn, *, warmup: int = 3, reps: int = 10, device: str | None = None) -> dict:
    """Median/min/max milliseconds of `fn()` over `reps` runs after `warmup` runs."""
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for _ in range(warmup):
        fn()
    times = []
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "runs_ms": times}


def time_graph_ms(fn, *, warmup: int = 3, reps: int = 10, device: str | None = None) -> dict:
    """Like time_ms, but on CUDA `fn` is captured once in a CUDA graph and the replays are
    timed: the device time of its kernels without the host's dispatch, which is how the
    engine runs them. Warm-up (autotuning included) runs eagerly before capture. Where
    capture fails the eager timing is returned; "mode" says which one was taken."""
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda":
        return {**time_ms(fn, warmup=warmup, reps=reps, device=device), "mode": "host"}
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(max(1, warmup)):
            fn()
    torch.cuda.current_stream(dev).wait_stream(side)
    torch.cuda.synchronize(dev)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as err:  # noqa: BLE001 - any capture failure means: time it eagerly, and say so
        torch.cuda.synchronize(dev)
        return {**time_ms(fn, warmup=warmup, reps=reps, device=device), "mode": f"eager ({type(err).__name__})"}
    result = time_ms(graph.replay, warmup=2, reps=reps, device=device)
    del graph
    return {**result, "mode": "cuda-graph"}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    """Card, driver, clocks, versions and commit: what every result file carries."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host": platform.node(),
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(card=props.name, sm_count=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}")
        env.update(nvml_snapshot())
    else:
        env["card"] = "cpu:" + (platform.processor() or platform.machine())
        env["cpu_threads"] = torch.get_num_threads()
    return env


def nvml_snapshot() -> dict:
    try:
        import pynvml
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or 0))
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        return {
            "driver": pynvml.nvmlSystemGetDriverVersion(),
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
            "power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1000,
            "nvml_mem_used_gib": round(mem.used / 2**30, 2),
        }
    except Exception as e:  # NVML is optional: report why it is missing instead of failing the run
        return {"nvml": f"unavailable ({type(e).__name__}: {e})"}


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower()


def write_result(payload: dict, kind: str, out_dir: str | os.PathLike | None = None) -> Path:
    """Write JSON named by kind, card and date into out_dir (default <repo>/bench/results)."""
    out = Path(out_dir or Path(__file__).resolve().parent.parent / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    env = payload.get("env") or environment()
    name = f"{kind}_{slug(env.get('card', 'unknown'))}_{env['date'][:10]}.json"
    path = out / name
    path.write_text(json.dumps(payload, indent=1, default=str))
    return path
