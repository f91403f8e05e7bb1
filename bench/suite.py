"""The full decode benchmark: every pidkern speed claim from one command.

    python -m bench [--sizes 1024,2048,4096] [--batches 1,4] [--rows ...] [--out DIR]
    python -m bench --smoke                  (tiny shapes on the CPU, < 1 minute)
    python -m bench --dry-run                (what would be measured)

Rows (each at every size x batch that fits; OOM is recorded as a note):
  fast            pidkern's engine, Decoder.decode(backend="fast")
  fp8             the same engine built with precision="fp8" (docs/fp8.md), same weights
  ablations       the engine with one optimisation off, or one attention route pinned, through
                  its plan (pidkern.benchmark.ablation_plan; 2048², batch 1 only)
  release         the reference the release's way: float32 weights, bf16 autocast, eager,
                  latent adapter recomputed every step
  bf16            the reference with bf16 weights (+ autocast), eager
  compile         torch.compile(reference net), bf16 weights (first call reported apart)
  cascade         the paper's table at 512² -> 2048²: VAE + Real-ESRGAN, VAE + SeedVR2-3B
                  (random-weight cost models, bench/baselines/) and PiD, batch 1
  windows         8192² from a 2048² image's latent in 2048² windows (pidkern.window), and
                  one 2048² decode: the windowed one's overhead is its ms / (windows x that)
                  (smoke: 224² in 128² windows); bench/window_check.py reports it directly

FLOPs: PiD rows use the analytic model (pidkern.flops, useful work with the adapter once),
baselines a FlopCounterMode count on the meta device. Outputs: JSON with all raw timings,
a Markdown table and a PNG chart in --out (default bench/results), named by card and date.
"""
from __future__ import annotations

import gc
import json
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from pidkern import benchmark as pb
from pidkern.config import get_preset, tiny
from pidkern.flops import decode_flops, tflops
from pidkern.timing import environment, slug

ROWS = ("fast", "fp8", "ablations", "undistilled", "release", "bf16", "compile", "cascade", "windows")
# The undistilled row: the release's teacher sampler at its documented step count, a milder
# guidance scale than its default 5 (the cost does not depend on the scale, only on cfg != 1).
UNDISTILLED_STEPS, UNDISTILLED_CFG = 25, 3.0

# PiD paper, 512² latent -> 2048², GB200, torch.compile (ms)
PAPER_MS = {"PiD": 211.2, "VAE + SeedVR2-3B": 1237.5, "VAE + TSD-SR": 724.8, "VAE + InvSR": 1017.7,
            "VAE + Real-ESRGAN": 62.2}
NOT_MODELLED = ("VAE + TSD-SR", "VAE + InvSR")


@dataclass
class Row:
    name: str                        # e.g. "fast", "fast -graphs", "release", "cascade: VAE + Real-ESRGAN"
    group: str                       # "pid" or "cascade"
    size: int
    batch: int
    build: Callable[[], Callable[[], object]] = field(repr=False)  # returns the timed callable
    flop: float = 0.0
    note: str = ""
    plan: dict = field(default=None)  # the fast path's plan overrides of this row


def _csv_ints(text, default):
    return [int(v) for v in text.split(",")] if text else list(default)


class Plan:
    """Everything one suite run will measure, built from the CLI arguments."""

    def __init__(self, args):
        self.args = args
        self.smoke = bool(args.smoke)
        self.device = torch.device("cpu") if self.smoke else torch.device(
            args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cfg = tiny(args.preset) if self.smoke else get_preset(args.preset)
        up = self.cfg.upscale
        self.sizes = _csv_ints(args.sizes, [2 * up] if self.smoke else (1024, 2048, 4096))
        self.batches = _csv_ints(args.batches, (1,) if self.smoke else (1, 4))
        self.rows_on = set(args.rows.split(",")) if args.rows else set(ROWS)
        unknown = self.rows_on - set(ROWS)
        if unknown:
            raise SystemExit(f"--rows: unknown {sorted(unknown)}; expected names from {ROWS}")
        self.steps = args.steps or 4
        self.reps = args.reps or (1 if self.smoke else 5)
        self.warmup = args.warmup or (1 if self.smoke else 2)
        # cascade: the paper's 64x64 latent (512² VAE image) -> 2048²; smoke: 2x2 -> 64²
        self.cascade_latent = 2 if self.smoke else 64
        self.cascade_size = self.cascade_latent * 8 * 4
        self.ablation_size = self.sizes[0] if self.smoke else (2048 if 2048 in self.sizes else self.sizes[0])
        self._nets = {}
        self.rows = self._rows()

    # -- networks, built lazily and shared between rows -------------------------------
    def net(self, dtype):
        if dtype not in self._nets:
            self._nets.clear()
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._nets[dtype] = pb.random_net(self.cfg, self.device, dtype)
        return self._nets[dtype]

    def decoder(self, dtype, autocast=None, precision="native"):
        return pb.random_decoder(self.cfg, self.device, dtype, autocast, net=self.net(dtype), precision=precision)

    def fast_dtype(self):
        return torch.float32 if self.device.type == "cpu" else torch.bfloat16

    # -- rows --------------------------------------------------------------------------
    def _pid_row(self, name, size, batch, make_fn, plan=None, note=""):
        flop = decode_flops(self.cfg, batch, size, size, self.steps)["total"]
        build = make_fn(size, batch, plan) if plan is not None else make_fn(size, batch)
        return Row(name, "pid", size, batch, build, flop, note, plan)

    def _rows(self) -> list[Row]:
        rows = []
        for size in self.sizes:
            for batch in self.batches:
                if "fast" in self.rows_on:
                    rows.append(self._pid_row("fast", size, batch, self._fast))
                if "fp8" in self.rows_on:
                    rows.append(self._pid_row("fp8", size, batch, self._fp8, note="precision='fp8', same weights"))
                if "ablations" in self.rows_on and size == self.ablation_size and batch == self.batches[0]:
                    for opt in pb.OPTIMISATIONS:
                        rows.append(self._pid_row(f"fast -{opt}", size, batch, self._fast,
                                                  plan=pb.ablation_plan([opt])))
                    for route in pb.ATTENTION_ROUTES:
                        rows.append(self._pid_row(f"fast attention={route}", size, batch, self._fast,
                                                  plan=pb.ablation_plan((), route)))
                if "undistilled" in self.rows_on and size == self.ablation_size and batch == self.batches[0]:
                    rows.append(self._undistilled_row(size, batch))
                if "release" in self.rows_on:
                    rows.append(self._pid_row("release", size, batch, self._release,
                                              note="fp32 weights, bf16 autocast, eager, adapter every step"))
                if "bf16" in self.rows_on:
                    rows.append(self._pid_row("bf16", size, batch, self._bf16, note="bf16 weights + autocast, eager"))
                if "compile" in self.rows_on:
                    rows.append(self._pid_row("compile", size, batch, self._compile,
                                              note="torch.compile(net), bf16" + (" (smoke: backend=eager)" if self.smoke else "")))
        if "cascade" in self.rows_on:
            rows += self._cascade_rows()
        if "windows" in self.rows_on:
            rows += self._window_rows()
        return rows

    def _window_rows(self) -> list[Row]:
        side, window, overlap = (224, 128, 32) if self.smoke else (8192, 2048, None)
        from pidkern.window import make_grid
        grid = make_grid(self.cfg, (side, side), window, overlap)
        dt = self.fast_dtype()
        backend = "fast" if self.device.type == "cuda" else "reference"

        def build(size, win):
            def make():
                dec = self.decoder(dt)
                latent, sigma, text = self._inputs(size, 1)
                # both rows eager: windows are not captured by default (docs/windows.md)
                plan = {"graphs": False} if backend == "fast" else None
                return lambda: dec.decode(latent, sigma, text, steps=self.steps, seed=0, backend=backend,
                                          window=win, overlap=overlap if win else None, plan=plan)
            return make
        one = decode_flops(self.cfg, 1, grid.size[0], grid.size[1], self.steps)["total"]
        return [Row(f"windows: one {window}² window", "pid", window, 1, build(window, None), one,
                    f"{backend} backend, eager: the unit of the windowed row"),
                Row(f"windows {side}² ({len(grid)} x {window}²)", "pid", side, 1, build(side, window),
                    len(grid) * one, f"{grid.describe()}; overhead = ms / ({len(grid)} x the one-window row)")]

    def _inputs(self, size, batch):
        return pb.decode_inputs(self.cfg, batch, size, size, self.device)

    def _fast(self, size, batch, plan=None):
        def build():
            dec = self.decoder(self.fast_dtype())
            latent, sigma, text = self._inputs(size, batch)
            return lambda: dec.decode(latent, sigma, text, steps=self.steps, seed=0, backend="fast", plan=plan)
        return build

    def _undistilled_row(self, size, batch):
        """DPM-Solver++ with guidance: 2B images through the network per step."""
        steps = 2 if self.smoke else UNDISTILLED_STEPS
        flop = decode_flops(self.cfg, 2 * batch, size, size, steps)["total"]

        def build():
            from pidkern.config import sampling_for
            dec = self.decoder(self.fast_dtype())
            dec.sampling = sampling_for(self.cfg, distilled=False)
            latent, sigma, text = self._inputs(size, batch)
            negative = torch.zeros_like(text[:1])
            return lambda: dec.decode(latent, sigma, text, steps=steps, seed=0, sampler="dpm++", backend="fast",
                                      cfg=UNDISTILLED_CFG, negative_text=negative)
        return Row("undistilled", "pid", size, batch, build, flop,
                   f"dpm++ {steps} steps, cfg {UNDISTILLED_CFG:g}: {2 * steps} network evaluations of the batch, "
                   f"fast path")

    def _fp8(self, size, batch):
        def build():
            dec = self.decoder(self.fast_dtype(), precision="fp8")
            latent, sigma, text = self._inputs(size, batch)
            return lambda: dec.decode(latent, sigma, text, steps=self.steps, seed=0, backend="fast")
        return build

    def _bf16(self, size, batch):
        def build():
            dt = self.fast_dtype() if self.smoke else torch.bfloat16
            dec = self.decoder(dt)
            latent, sigma, text = self._inputs(size, batch)
            return lambda: dec.decode(latent, sigma, text, steps=self.steps, seed=0, backend="reference")
        return build

    def _release(self, size, batch):
        def build():
            net = self.net(torch.float32)
            latent, sigma, text = self._inputs(size, batch)
            return lambda: release_decode(net, latent, sigma, text, self.steps, size, size)
        return build

    def _compile(self, size, batch):
        def build():
            dt = self.fast_dtype() if self.smoke else torch.bfloat16
            dec = self.decoder(dt)
            dec.net = torch.compile(dec.net, backend="eager" if self.smoke else "inductor")
            latent, sigma, text = self._inputs(size, batch)
            return lambda: dec.decode(latent, sigma, text, steps=self.steps, seed=0, backend="reference")
        return build

    def _cascade_rows(self) -> list[Row]:
        from bench.baselines import count_flops, realesrgan, seedvr2, vae
        smoke, lat, out = self.smoke, self.cascade_latent, self.cascade_size
        img = lat * 8
        dev = self.device
        dt = torch.float32 if dev.type == "cpu" else torch.bfloat16
        vae_flop = count_flops(lambda: vae.decoder(smoke), lambda d: (torch.empty(1, 16, lat, lat, device=d),))
        esr_flop = count_flops(lambda: realesrgan.model(smoke), lambda d: (torch.empty(1, 3, img, img, device=d),))
        tcfg = seedvr2.SMOKE if smoke else seedvr2.DiTConfig()
        svr_flop = count_flops(lambda: seedvr2.model(smoke),
                               lambda d: (torch.empty(1, 3, img, img, device=d),
                                          torch.empty(1, tcfg.text_tokens, tcfg.text_in, device=d), out))
        compile_ = self.args.baseline_compile

        def prep(m):
            m = pb.fill_random_(m.to(dev, dt)).eval().requires_grad_(False)
            return torch.compile(m) if compile_ else m

        def esr_build():
            self._nets.clear()
            v, e = prep(vae.decoder(smoke)), prep(realesrgan.model(smoke))
            z = torch.randn(1, 16, lat, lat, device=dev, dtype=dt)

            @torch.inference_mode()
            def fn():
                return e(v(z).clamp(-1, 1))
            return fn

        def svr_build():
            self._nets.clear()
            v, s = prep(vae.decoder(smoke)), prep(seedvr2.model(smoke))
            z = torch.randn(1, 16, lat, lat, device=dev, dtype=dt)
            text = torch.randn(1, tcfg.text_tokens, tcfg.text_in, device=dev, dtype=dt)

            @torch.inference_mode()
            def fn():
                return s(v(z).clamp(-1, 1), text, out)
            return fn

        how = "bf16 eager" + (" + torch.compile" if compile_ else "") if dev.type == "cuda" else "fp32 eager"
        rows = [
            Row("cascade: VAE + Real-ESRGAN", "cascade", out, 1, esr_build, vae_flop + esr_flop,
                f"cost model (random weights), {how}"),
            Row("cascade: VAE + SeedVR2-3B", "cascade", out, 1, svr_build, vae_flop + svr_flop,
                f"cost model (random weights), {how}; VAE convs causal 3-D, 3 temporal taps"),
        ]
        pid_name = "fast" if self.device.type == "cuda" else "bf16"
        rows.append(self._pid_row(f"cascade: PiD ({pid_name})", out, 1,
                                  self._fast if pid_name == "fast" else self._bf16,
                                  note="PiD from the same latent, no VAE"))
        rows[-1].group = "cascade"
        return rows


@torch.inference_mode()
def release_decode(net, latent, sigma, text, steps, h, w):
    """The released pipeline's way: fp32 weights under bf16 autocast, adapter inside every call."""
    from pidkern.sampler import make_generator, sample
    b = latent.shape[0]
    dev = latent.device
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        def velocity(x, t):
            return net(x, torch.full((b,), t, device=dev), text, latent, sigma)
        return sample(velocity, (b, 3, h, w), steps=steps, generator=make_generator(0, dev), device=dev)


# -- running -------------------------------------------------------------------------------

def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower() or \
        type(e).__name__ == "InsufficientMemoryError"


def run_rows(plan: Plan, ceiling: dict, log=print) -> list[dict]:
    results, t_start = [], time.perf_counter()
    budget = plan.args.budget_s
    for i, row in enumerate(plan.rows):
        rec = {"name": row.name, "group": row.group, "size": row.size, "batch": row.batch,
               "tflop": row.flop / 1e12, "note": row.note}
        if budget and time.perf_counter() - t_start > budget:
            rec["skipped"] = f"--budget-s {budget:g} reached"
            results.append(rec)
            log(f"[{i + 1}/{len(plan.rows)}] {row.name} {row.batch}x{row.size}²: skipped (budget)")
            continue
        log(f"[{i + 1}/{len(plan.rows)}] {row.name} {row.batch}x{row.size}² ...")
        fn = None
        try:
            fn = row.build()
            m = pb.measure(fn, plan.device, reps=plan.reps, warmup=plan.warmup,
                           max_s=None if plan.smoke else plan.args.max_row_s)
            rec.update(m)
            rec["tflops"] = tflops(row.flop, m["median_ms"])
            if ceiling.get("tflops"):
                rec["pct_of_gemm_ceiling"] = 100 * rec["tflops"] / ceiling["tflops"]
            mem = f", peak {m['peak_alloc_gib']:.2f} GiB" if "peak_alloc_gib" in m else ""
            log(f"    {m['median_ms']:10.2f} ms  (first call {m['first_call_ms']:.0f} ms){mem}, "
                f"{rec['tflop']:.3f} TFLOP, {rec['tflops']:.1f} TFLOP/s")
        except Exception as e:  # one failing row must not lose the others' numbers
            if _is_oom(e):
                rec["skipped"] = f"does not fit: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            else:
                rec["error"] = f"{type(e).__name__}: {e}"
                rec["traceback"] = traceback.format_exc(limit=6)
            log(f"    {rec.get('skipped') or rec['error']}")
        finally:
            fn = None
            if row.group == "cascade":
                gc.collect()
            if plan.device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
        results.append(rec)
    return results


def dry_run(plan: Plan, log=print) -> list[str]:
    lines = [f"would measure on {plan.device} ({'smoke, tiny config' if plan.smoke else plan.cfg.name}), "
             f"{plan.steps} steps, first call + {plan.warmup} warm-up + {plan.reps} timed runs per row:",
             f"  GEMM ceiling: one {'bf16 8192³' if plan.device.type == 'cuda' else 'fp32 512³'} matmul"]
    for r in plan.rows:
        lines.append(f"  {r.name:32s} batch {r.batch} {r.size}x{r.size}  {r.flop / 1e12:9.3f} TFLOP  {r.note}")
    for name in NOT_MODELLED:
        lines.append(f"  cascade: {name:23s} not modelled (paper: {PAPER_MS[name]} ms)")
    for line in lines:
        log(line)
    return lines


# -- reporting -----------------------------------------------------------------------------

def _fmt(v, spec="{:.1f}"):
    return "-" if v is None else spec.format(v)


def markdown(payload: dict) -> str:
    env, res = payload["env"], payload["results"]
    ceil = payload["gemm_ceiling"]
    out = [f"### PiD decode benchmark: {env.get('card')}, {env['date'][:10]}", "",
           f"driver {env.get('driver', '-')}, torch {env['torch']}, CUDA {env.get('cuda')}, Triton {env.get('triton')}, "
           f"commit {env['commit']}; {payload['preset']}, {payload['steps']} steps, random weights; "
           f"GEMM ceiling ({ceil['dtype']} {ceil['n']}³): {ceil['tflops']:.3g} TFLOP/s. "
           f"Median of {payload['reps']} CUDA-event timings after warm-up; first call (compile/capture) apart.", ""]
    base = {(r["size"], r["batch"]): r["median_ms"] for r in res if r["name"] == "release" and "median_ms" in r}
    out += ["| engine | size | batch | median ms | first call ms | peak GiB (torch / NVML) | TFLOP | TFLOP/s | % GEMM ceiling | vs release |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res:
        if r["group"] != "pid":
            continue
        if "median_ms" not in r:
            out.append(f"| {r['name']} | {r['size']}² | {r['batch']} | {r.get('skipped') or 'error: ' + r.get('error', '')[:80]} "
                       f"| | | {r['tflop']:.1f} | | | |")
            continue
        nv = (r.get("nvml") or {}).get("nvml_mem_used_gib")
        sp = base.get((r["size"], r["batch"]))
        out.append(f"| {r['name']} | {r['size']}² | {r['batch']} | {r['median_ms']:.1f} | {r['first_call_ms']:.0f} | "
                   f"{_fmt(r.get('peak_alloc_gib'), '{:.2f}')} / {_fmt(nv, '{:.2f}')} | {r['tflop']:.1f} | "
                   f"{r['tflops']:.1f} | {_fmt(r.get('pct_of_gemm_ceiling'), '{:.0f}%')} | "
                   f"{_fmt(sp / r['median_ms'] if sp else None, 'x{:.2f}')} |")
    casc = [r for r in res if r["group"] == "cascade"]
    if casc:
        pid = next((r for r in casc if r["name"].startswith("cascade: PiD") and "median_ms" in r), None)
        out += ["", f"#### 512² latent -> {casc[0]['size']}² (the PiD paper's table, this card)", "",
                "| pipeline | measured ms | x PiD | peak GiB | TFLOP | paper ms (GB200) | paper x PiD | note |",
                "|---|---|---|---|---|---|---|---|"]
        for r in casc:
            key = r["name"].split(": ", 1)[1]
            pkey = "PiD" if key.startswith("PiD") else key
            ms = r.get("median_ms")
            ratio = ms / pid["median_ms"] if (ms and pid) else None
            paper = PAPER_MS.get(pkey)
            out.append(f"| {key} | {_fmt(ms)} | {_fmt(ratio, 'x{:.2f}')} | {_fmt(r.get('peak_alloc_gib'), '{:.2f}')} | "
                       f"{r['tflop']:.1f} | {_fmt(paper)} | {_fmt(paper / PAPER_MS['PiD'] if paper else None, 'x{:.2f}')} | "
                       f"{r.get('skipped') or r.get('error', '')[:60] or r['note']} |")
        for key in NOT_MODELLED:
            out.append(f"| {key} | not modelled | | | | {PAPER_MS[key]} | x{PAPER_MS[key] / PAPER_MS['PiD']:.2f} | "
                       f"no cost model |")
        out += ["", "Cascade baselines are random-weight cost models of the published architectures "
                "(bench/baselines/): latency, memory and FLOPs only, not quality."]
    return "\n".join(out) + "\n"


def chart(payload: dict, path: Path) -> str | None:
    """PNG bars of latency and peak memory per cascade pipeline; None (with the reason) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart (pip install matplotlib)"
    rows = [r for r in payload["results"] if r["group"] == "cascade" and "median_ms" in r]
    if not rows:
        rows = [r for r in payload["results"] if "median_ms" in r]
    if not rows:
        return "nothing measured: no chart"
    names = [r["name"].replace("cascade: ", "") + ("" if r["group"] == "cascade" else f" {r['batch']}x{r['size']}")
             for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.6 * len(rows) + 2))
    axes[0].barh(names, [r["median_ms"] for r in rows])
    axes[0].set_xlabel("latency, ms (median)")
    axes[1].barh(names, [r.get("peak_alloc_gib", 0) for r in rows])
    axes[1].set_xlabel("peak memory, GiB (torch)")
    fig.suptitle(f"{payload['env'].get('card')}, {payload['env']['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def write_outputs(payload: dict, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = payload["env"]
    stem = f"suite{'-smoke' if payload['smoke'] else ''}_{slug(env.get('card', 'unknown'))}_{env['date'][:10]}"
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    md = markdown(payload)
    why = chart(payload, paths["png"])
    if why:
        payload["chart_note"] = why
        md += f"\n{why}\n"
        del paths["png"]
    paths["json"].write_text(json.dumps(payload, indent=1, default=str))
    paths["md"].write_text(md)
    return paths


def run(args, log=print) -> int:
    plan = Plan(args)
    if args.dry_run:
        dry_run(plan, log)
        return 0
    if plan.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # conv algorithms picked in the first (untimed) call
    env = environment()
    log(f"{env.get('card')} | torch {env['torch']} | Triton {env.get('triton')} | commit {env['commit']}")
    ceiling = pb.gemm_ceiling(plan.device)
    log(f"GEMM ceiling: {ceiling['dtype']} {ceiling['n']}³ {ceiling['tflops']:.1f} TFLOP/s")
    t0 = time.perf_counter()
    results = run_rows(plan, ceiling, log)
    payload = {"env": env, "smoke": plan.smoke, "preset": plan.cfg.name, "steps": plan.steps, "reps": plan.reps,
               "warmup": plan.warmup, "device": str(plan.device), "gemm_ceiling": ceiling,
               "cudnn_benchmark": torch.backends.cudnn.benchmark, "wall_s": time.perf_counter() - t0,
               "flop_note": "PiD: analytic useful FLOPs (pidkern.flops, adapter once per decode) for every engine; "
                            "baselines: FlopCounterMode on the meta device",
               "paper_ms": PAPER_MS, "results": results}
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="pidkern-smoke-")) if plan.smoke
                                           else Path(__file__).resolve().parent / "results")
    paths = write_outputs(payload, out)
    log("")
    log(paths["md"].read_text())
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    bad = [r["name"] for r in results if "error" in r]
    if bad:
        log(f"rows with errors: {bad}")
    return 1 if bad else 0
