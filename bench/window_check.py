"""Windowed decoding (pidkern.window) against its ideal: windows x one window decode, same run.

    python -m bench.window_check                     # flux-2k: 8192² from a 2048² image's latent
    python -m bench.window_check --smoke             # tiny config, CPU sizes (< 1 minute)
    python -m bench.window_check --side 16384 --reps 1

One process, one decoder (random weights: the timing does not depend on them), in order:
one decode at the window's size (the ideal's unit), then the windowed decode of the
canvas. Reported: each median ms, the windowed decode's peak GPU memory (and the model's
estimate, pidkern.estimate_memory(..., window=)), windows per second, and the overhead
= windowed ms / (windows x one window decode ms). The issue's target is <= 1.15 on a GPU.
"""
from __future__ import annotations

import argparse
import sys

import torch

from pidkern import benchmark as pb
from pidkern.config import get_preset, tiny
from pidkern.memory import estimate_memory
from pidkern.timing import environment, write_result


def run(preset: str, side: int, window: int, overlap, steps: int, reps: int, backend: str, device, dtype,
        smoke: bool = False, graphs: bool = False) -> dict:
    cfg = tiny(preset) if smoke else get_preset(preset)
    dec = pb.random_decoder(cfg, device, dtype)
    # both decodes the same way: eager, or each a captured graph (windows: one per batch and time)
    plan = {"graphs": graphs} if dec.backend_for(backend) == "fast" else None
    grid = dec.window_grid((side, side), window, overlap)
    if grid is None:
        raise SystemExit(f"--window {window}: covers the {side}² canvas; nothing to window")
    latent, sigma, text = pb.decode_inputs(cfg, 1, side, side, device)
    wl, ws, wt = pb.decode_inputs(cfg, 1, *grid.size, device)
    one = pb.measure(lambda: dec.decode(wl, ws, wt, steps=steps, seed=0, backend=backend, plan=plan), device,
                     reps=reps, warmup=1)
    win = pb.measure(lambda: dec.decode(latent, sigma, text, steps=steps, seed=0, backend=backend, window=window,
                                        overlap=overlap, plan=plan), device, reps=reps, warmup=0)
    n = len(grid)
    out = dict(preset=cfg.name, side=side, window=list(grid.size), overlap=grid.overlap, windows=n,
               grid=grid.describe(), steps=steps, backend=dec.backend_for(backend), graphs=bool(plan and graphs),
               dtype=str(dtype).replace("torch.", ""), device=str(device),
               one_window_ms=one["median_ms"], windowed_ms=win["median_ms"],
               ideal_ms=n * one["median_ms"], overhead=win["median_ms"] / (n * one["median_ms"]),
               windows_per_s=n / (win["median_ms"] / 1e3),
               estimate_gib=estimate_memory(cfg, 1, side, side, window=window, overlap=overlap,
                                            dtype_bytes=torch.finfo(dtype).bits // 8) / 2**30,
               one=one, windowed=win)
    if "peak_alloc_gib" in win:
        out["peak_gib"] = win["peak_alloc_gib"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.window_check", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="flux-2k")
    ap.add_argument("--side", type=int, default=None, help="canvas side in output pixels (default 8192)")
    ap.add_argument("--window", type=int, default=None, help="window side (default 2048)")
    ap.add_argument("--overlap", type=int, default=None, help="default: the preset's (docs/windows.md)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backend", default="auto", help="auto (fast on CUDA), fast or reference: both decodes")
    ap.add_argument("--graphs", action="store_true",
                    help="fast backend: capture both decodes as CUDA graphs (default: both eager)")
    ap.add_argument("--smoke", action="store_true", help="tiny config on the CPU: 4x4 windows of 128²")
    ap.add_argument("--out", default=None, help="directory for the JSON result (default: print only)")
    args = ap.parse_args(argv)
    device = torch.device("cpu") if args.smoke else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    side = args.side or (448 if args.smoke else 8192)
    window = args.window or (128 if args.smoke else 2048)
    overlap = args.overlap if args.overlap is not None else (32 if args.smoke else None)
    r = run(args.preset, side, window, overlap, args.steps, 1 if args.smoke else args.reps, args.backend, device,
            dtype, smoke=args.smoke, graphs=args.graphs)
    peak = f", peak {r['peak_gib']:.2f} GiB" if "peak_gib" in r else ""
    print(f"{r['preset']} {side}² in {r['grid']}, {r['backend']} {r['dtype']} on {r['device']}: "
          f"{r['windowed_ms']:.0f} ms ({r['windows_per_s']:.2f} windows/s{peak}, "
          f"estimate {r['estimate_gib']:.2f} GiB); "
          f"one {r['window'][0]}² decode {r['one_window_ms']:.0f} ms; overhead vs {r['windows']} x one: "
          f"{r['overhead']:.3f}")
    if args.out:
        print(write_result(dict(env=environment(), window=r), "window_check", args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
