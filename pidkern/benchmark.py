"""`pidkern bench`: time a PiD decode on this machine with the package alone.

Default job: a random-weight model of a preset (flux-2k), decoded at 2048² on a GPU,
batch 1, 4 steps. On a CPU the default is small enough to finish within a minute: 128²,
1 step, one timed run (the output says so; --size/--steps/--reps change it). It prints
the first-call time (compile, autotune, the plan's races and CUDA-graph capture happen
there), the median of the warm runs (CUDA events), peak memory, the analytic FLOP count
(pidkern.flops), achieved TFLOP/s and the fast path's plan. The full suite (baselines,
ablations, tables) is `python -m bench` in a pidkern checkout.
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from .random_weights import fill_random_, random_net  # noqa: F401  (re-exported for bench/)
from .config import get_preset
from .flops import decode_flops, tflops
from .plan import ATTENTION_8BIT, PATCH_ATTENTION, check_overrides, parse
from .timing import environment, nvml_snapshot, time_ms

# Each optimisation the fast path can run without, as the plan override that turns it off.
ABLATIONS = {
    "graphs": {"graphs": False},
    "embed": {"embed": "torch"},
    "rms_modulate": {"rms_modulate": "torch"},
    "gate": {"gate": "torch"},
    "attention": {"attention": "torch"},
    "pixel_modulate": {"pixel_modulate": "torch"},
    "swiglu": {"swiglu": "torch"},
}
OPTIMISATIONS = tuple(ABLATIONS)
# the bf16 routes, one ablation row each (the 8-bit ones belong to the fp8 rows)
ATTENTION_ROUTES = tuple(r for r in PATCH_ATTENTION if r not in ATTENTION_8BIT)


def log(msg: str) -> None:
    print(msg, flush=True)


def random_decoder(config, device, dtype: torch.dtype, autocast=None, net=None, precision: str = "native"):
    from .decoder import Decoder
    net = net if net is not None else random_net(config, device, dtype)
    return Decoder(net, torch.device(device), dtype, "random", autocast, precision=precision)


# -- measuring ----------------------------------------------------------------------------

def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def gemm_ceiling(device, n: int | None = None) -> dict:
    """Achieved TFLOP/s of one square matmul: bf16 8192³ on a GPU, float32 512³ on a CPU."""
    dev = torch.device(device)
    n = n or (8192 if dev.type == "cuda" else 512)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    t = time_ms(lambda: a @ b, warmup=3, reps=10 if dev.type == "cuda" else 3, device=str(dev))
    del a, b
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "median_ms": t["median_ms"],
            "tflops": tflops(2 * n ** 3, t["median_ms"])}


def measure(fn, device, *, reps: int = 5, warmup: int = 2, max_s: float | None = None) -> dict:
    """First call timed on its own (compile/autotune/capture), `warmup` untimed runs, then
    the median of `reps` timed runs.

    `max_s` caps the time spent on warm runs: reps shrink (never below 3) when one call is slow.
    Peak memory covers every call; NVML's view (the CUDA context and allocator cache) is read last.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    sync(dev)
    t0 = time.perf_counter()
    fn()
    sync(dev)
    first_ms = (time.perf_counter() - t0) * 1e3
    warm = time_ms(fn, warmup=0, reps=warmup, device=str(dev)) if warmup > 0 else None
    note = ""
    if max_s and warm and warm["median_ms"] * reps / 1e3 > max_s:
        new = max(3, int(max_s * 1e3 // warm["median_ms"]))
        if new < reps:
            note = f"reps cut from {reps} to {new} to fit --max-row-s {max_s:g}"
            reps = new
    t = time_ms(fn, warmup=0, reps=reps, device=str(dev))
    out = {**t, "first_call_ms": first_ms, "reps": reps, "warmup_runs": warmup + 1}
    if note:
        out["note"] = note
    if dev.type == "cuda":
        out["peak_alloc_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        out["peak_above_start_gib"] = (torch.cuda.max_memory_allocated(dev) - base) / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(dev) / 2**30
        out["nvml"] = nvml_snapshot()
    return out


def ablation_plan(disable=(), attention: str | None = None, plan=None) -> dict:
    """The plan overrides of a run without the optimisations in `disable` (names of
    ABLATIONS), with the patch attention pinned to `attention`, on top of `plan`."""
    over = check_overrides(plan)
    for name in disable:
        if name not in ABLATIONS:
            raise ValueError(f"disable={name!r}: expected names from {OPTIMISATIONS}")
        over.update(check_overrides(ABLATIONS[name]))
    if attention:
        over.update(check_overrides({"attention": attention}))
    return over


def decode_inputs(config, batch: int, height: int, width: int, device, seed: int = 0):
    """Latent, sigma and text on the device, made before any timing (no copies are timed)."""
    up = config.upscale
    if height % up or width % up:
        raise ValueError(f"size {height}x{width}: {config.name} decodes latents {up}x, so the size must be a multiple of {up}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    latent = torch.randn(batch, config.latent_channels, height // up, width // up, generator=g).to(device)
    text = torch.randn(batch, config.max_text, config.text_dim, generator=g).to(device)
    sigma = torch.full((batch,), 0.1, device=device)
    return latent, sigma, text


# -- the CLI --------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("decode benchmark")
    g.add_argument("--preset", default="flux-2k", help="preset of the random-weight model (default flux-2k)")
    g.add_argument("--size", type=int, default=None, help="output side in pixels (default 2048 on a GPU, 128 on a CPU)")
    g.add_argument("--batch", type=int, default=1)
    g.add_argument("--backend", default="auto", choices=("auto", "reference", "fast"))
    g.add_argument("--steps", type=int, default=None, help="sampler steps (default 4 on a GPU, 1 on a CPU)")
    g.add_argument("--dtype", default=None, help="weight dtype: bfloat16 / float32 / float16 (default: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--device", default=None, help="default cuda when available, else cpu")
    g.add_argument("--reps", type=int, default=None, help="timed warm runs (default 5 on a GPU, 1 on a CPU)")
    g.add_argument("--warmup", type=int, default=None, help="warm-up runs after the first call (default 2 GPU, 0 CPU)")
    g.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON here")
    g.add_argument("--suite", choices=("quick", "full"), default="quick",
                   help="quick: this one decode; full: the checkout's suite, run as `python -m bench` there")
    g.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks that the suite runs")
    g.add_argument("--dry-run", action="store_true", help="print what would be measured and exit")
    g.add_argument("--attention-backend", default=None, choices=ATTENTION_ROUTES,
                   help="patch attention route of the fast path (same as --plan attention=...)")
    g.add_argument("--precision", default="native", choices=("native", "fp8"),
                   help="fp8: the large GEMMs in 8-bit e4m3 (docs/fp8.md; default native)")
    g.add_argument("--plan", default=None, metavar="KEY=VALUE,...",
                   help="fast-path plan overrides, e.g. attention=prep+sdpa,swiglu=split,graphs=off "
                        "(see `pidkern info --plan`)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    for opt in OPTIMISATIONS:
        g.add_argument(f"--disable-{opt.replace('_', '-')}", dest=f"disable_{opt}", action="store_true",
                       help=f"run the fast path without {opt}" + (" (CUDA graphs)" if opt == "graphs" else " (fused op)"))
    s = parser.add_argument_group("full suite (python -m bench in a checkout)")
    s.add_argument("--sizes", default=None, help="comma list of output sides (default 1024,2048,4096)")
    s.add_argument("--batches", default=None, help="comma list of batch sizes (default 1,4)")
    s.add_argument("--rows", default=None,
                   help="comma list of row names to run (default all): fast, ablations, release, bf16, compile, cascade")
    s.add_argument("--out", default=None, help="directory for JSON/Markdown/PNG (default bench/results)")
    s.add_argument("--max-row-s", type=float, default=60.0, help="cap on warm-run seconds per row (reps shrink, min 3)")
    s.add_argument("--budget-s", type=float, default=None, help="skip remaining rows once the suite has run this long")
    s.add_argument("--baseline-compile", action="store_true", help="torch.compile the cascade baselines (as the paper)")
    return parser


def disabled_options(args) -> list[str]:
    return [o for o in OPTIMISATIONS if getattr(args, f"disable_{o}", False)]


def _defaults(args, device: torch.device) -> list[str]:
    """Fill the defaults that depend on the device; returns what was chosen for the CPU."""
    gpu = device.type == "cuda"
    chosen = []
    for name, gpu_value, cpu_value in (("size", 2048, 128), ("steps", 4, 1), ("reps", 5, 1), ("warmup", 2, 0)):
        if getattr(args, name) is None:
            setattr(args, name, gpu_value if gpu else cpu_value)
            if not gpu:
                chosen.append(f"{name} {cpu_value}")
    return chosen


def run_default(args) -> dict:
    """The quick job: one preset, one size, one backend. Returns the result dict (also printed)."""
    from .resolve import resolve_device, resolve_dtype
    device = resolve_device(args.device)
    cpu_defaults = _defaults(args, device)
    cfg = get_preset(args.preset)
    if args.smoke:
        from .config import tiny
        cfg = tiny(args.preset)
        args.size = min(args.size, 4 * cfg.upscale)
    dtype = resolve_dtype(args.dtype, device)
    size, batch = args.size, args.batch
    flop = decode_flops(cfg, batch, size, size, args.steps)
    off = disabled_options(args)
    plan = ablation_plan(off, args.attention_backend, parse(args.plan) if args.plan else None)
    what = (f"{cfg.name} random weights, {batch}x{size}x{size}, {args.steps} steps, {str(dtype)[6:]}, "
            f"backend={args.backend}" + (f", precision={args.precision}" if args.precision != "native" else "")
            + (f", disabled: {','.join(off)}" if off else "")
            + (f", plan overrides: {plan}" if plan else ""))
    if args.dry_run:
        log(f"would time on {device}: {what}; {flop['tflop']:.2f} TFLOP per decode; "
            f"{args.warmup} warm-up + {args.reps} timed runs")
        return {"dry_run": True, "what": what, "tflop": flop["tflop"]}
    log(f"pidkern bench: {what} on {device}")
    if cpu_defaults:
        log(f"  CPU defaults so the job ends within a minute: {', '.join(cpu_defaults)} (a GPU run uses 2048², "
            f"4 steps, 2 warm-up + 5 timed runs)")
    t0 = time.perf_counter()
    nparams = sum(p.numel() for p in _meta_net(cfg).parameters())
    log(f"building random weights ({nparams / 1e9:.2f} B parameters, {str(dtype)[6:]}) ...")
    dec = random_decoder(cfg, device, dtype, precision=args.precision)
    log(f"  built in {time.perf_counter() - t0:.1f} s")
    latent, sigma, text = decode_inputs(cfg, batch, size, size, device)
    ceiling = gemm_ceiling(device) if device.type == "cuda" else None
    used = dec.backend_for(args.backend)
    fast = used == "fast"
    calls = 1 + args.warmup + args.reps

    def progress(step, steps):
        bar.update(steps if fast else 1)      # the fast path reports once per decode

    def fn():
        return dec.decode(latent, sigma, text, steps=args.steps, seed=0, backend=args.backend, progress=progress,
                          plan=plan if fast else None)
    log(f"first call (includes any compile / autotune / plan races / graph capture) then {args.warmup} warm-up "
        f"and {args.reps} timed runs ...")
    from tqdm.auto import tqdm
    bar = tqdm(total=calls * args.steps, desc="decode steps", unit="step", disable=args.quiet, leave=False)
    with bar:
        res = measure(fn, device, reps=args.reps, warmup=args.warmup)
    res.update(tflop=flop["tflop"], tflops=tflops(flop["total"], res["median_ms"]),
               flop_breakdown=flop["breakdown"], what=what, preset=cfg.name, size=size, batch=batch,
               steps=args.steps, dtype=str(dtype), backend=args.backend, backend_used=used,
               disabled=off, plan_overrides=plan, precision=args.precision)
    if fast:
        the_plan = dec.plan(latent.shape, text.shape[1], plan)
        res["plan"] = the_plan.as_dict()
    if ceiling:
        res["gemm_ceiling"] = ceiling
        res["pct_of_gemm_ceiling"] = 100 * res["tflops"] / ceiling["tflops"]
    log(f"first call   {res['first_call_ms']:10.1f} ms")
    log(f"median       {res['median_ms']:10.1f} ms  (min {res['min_ms']:.1f}, max {res['max_ms']:.1f}, {res['reps']} runs)")
    if "peak_alloc_gib" in res:
        log(f"peak memory  {res['peak_alloc_gib']:10.2f} GiB allocated, {res['peak_reserved_gib']:.2f} GiB reserved; "
            f"NVML used {res['nvml'].get('nvml_mem_used_gib', '?')} GiB")
    log(f"work         {res['tflop']:10.2f} TFLOP -> {res['tflops']:.1f} TFLOP/s"
        + (f" ({res['pct_of_gemm_ceiling']:.0f}% of the {ceiling['tflops']:.0f} TFLOP/s bf16 GEMM ceiling)" if ceiling else ""))
    if fast:
        log(str(the_plan))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"env": environment(), "result": res}, indent=1, default=str))
        log(f"wrote {args.json}")
    return res


def _meta_net(cfg):
    from .reference import PiDNet
    with torch.device("meta"):
        return PiDNet(cfg)


def main(args) -> int:
    if args.suite == "full":
        raise ValueError("--suite full: the full suite lives in the repository's bench/ package; run "
                         "`python -m bench` from a pidkern checkout (same arguments)")
    run_default(args)
    return 0


if __name__ == "__main__":  # python -m pidkern.benchmark
    raise SystemExit(main(add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args()))
