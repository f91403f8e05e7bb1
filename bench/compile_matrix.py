"""Every Triton kernel of pidkern/kernels/, compiled offline for each GPU target: does it launch there?

    python -m bench.compile_matrix [--arch sm_80,sm_86,sm_89,sm_90a,sm_100a,sm_120] [--quick]
                                   [--other-family] [--kernels NAME,...] [-j N] [--json PATH]
                                   [--ptxas bundled|system]

No GPU needed: Triton compiles for a named target (`triton.compile` with a GPUTarget) and
runs ptxas itself. For every kernel, every variant the Plan can pick (attention modes, head
dims, fused or core; the memory-bound kernels' row widths and residual forms, at the
flux-2k shapes every preset shares) and every autotune config the library offers on that
target's architecture family (kernels._common.arch_family), it prints what ptxas reports
(registers, spill bytes), the shared memory a block asks for against the target's per-block
limit, and the tensor-core instructions in the PTX (wgmma, tcgen05 or mma.sync, with the
operand type).

Exit status 1 when an offered config cannot launch on a target (more shared memory than a
block may have, or no build at all), or a kernel variant has no config that fits. Spills
are reported, not failures. --other-family also compiles the configs of the other family
(marked "not offered"; they never fail the run): the reason the families exist.
--quick: the bf16 attention variants only (the 8-bit modes take most of the time) — what
CI runs. The dtype is bf16 throughout (fp16 builds the same tiles); float32 on CUDA is a
debugging dtype whose configs the autotuner skips when they do not fit.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

# name -> (capability, max shared memory per block in bytes: cudaDevAttrMaxSharedMemoryPerBlockOptin,
# the CUDA C++ Programming Guide's table of compute capabilities: 163 KB on 8.0, 99 KB on 8.6, 8.9
# and 12.0, 227 KB on 9.0 and 10.0)
TARGETS = {
    "sm_80": ((8, 0), 163 * 1024),
    "sm_86": ((8, 6), 99 * 1024),
    "sm_89": ((8, 9), 99 * 1024),
    "sm_90a": ((9, 0), 227 * 1024),
    "sm_100a": ((10, 0), 227 * 1024),
    "sm_120": ((12, 0), 99 * 1024),
}
DEFAULT_ARCHES = tuple(TARGETS)
E4M3_FROM = (8, 9)     # e4m3 tensor-core arithmetic: Ada, Hopper, Blackwell
INT8_FROM = (7, 5)     # int8 mma.sync: Turing on

# flux-2k (every preset shares these sizes): patch blocks 24 heads x 64, pixel 16 x 72
HIDDEN, HEADS, HD, PIX_HEADS, PIX_HD, MLP, PATCH, PDIM = 1536, 24, 64, 16, 72, 4096, 16, 16


@dataclass
class Case:
    kernel: str                 # module.function
    variant: str
    fn_path: tuple              # (module, attribute) of the jitted function
    types: dict                 # argument name -> Triton type ("*bf16", "fp32", "i32")
    consts: dict                # constexpr arguments
    configs: list               # [(label, kwargs, num_warps, num_stages)]
    needs: tuple = (8, 0)       # the least capability this variant runs on
    ints16: tuple = ()          # integer arguments that are multiples of 16 at these shapes
    ones: tuple = ()            # integer arguments equal to 1 (Triton specializes them)
    offered: list = field(default_factory=list)   # parallel to configs: whether the library offers it


def _fn(module: str, attr: str):
    import importlib
    from triton.runtime.jit import JITFunction
    obj = getattr(importlib.import_module(module), attr)
    while not isinstance(obj, JITFunction):   # a @triton.heuristics wrapper holds the jitted function
        obj = obj.fn
    return obj


def _label(cfg) -> str:
    kw = cfg.kwargs if hasattr(cfg, "kwargs") else cfg[0]
    short = {"BLOCK_M": "", "BLOCK_N": "x", "BLOCK_K": "x", "BLOCK_ROWS": "rows", "BLOCK_PIX": "pix", "GROUP_M": None,
             "PIX_M": None}
    s = "".join(f"{short.get(k, k)}{v}" for k, v in kw.items() if short.get(k, k) is not None)
    return f"{s} w{cfg.num_warps} s{cfg.num_stages}"


def _tuned_configs(tuned, family, *extra, prune=None):
    cfgs = tuned.configs(family, *extra)
    if prune is not None:
        cfgs = prune(cfgs)
    return [(_label(c), dict(c.kwargs), c.num_warps, c.num_stages) for c in cfgs]


def cases(family: str, capability: tuple, quick: bool = False, other: str | None = None) -> list[Case]:
    """Every (kernel, variant) the fast path can launch on a card of `capability`, with the
    configs `family` offers (and, with `other`, that family's configs marked not offered)."""
    from pidkern.kernels import attention, embed, gate, int8_gemm, pixel_modulate, qkv_rope, rms_modulate, swiglu
    out = []

    def add(case, tuned=None, *extra, prune=None, fixed=None):
        offered = fixed if fixed is not None else _tuned_configs(tuned, family, *extra, prune=prune)
        case.configs = list(offered)
        case.offered = [True] * len(offered)
        if other and fixed is None:
            for c in _tuned_configs(tuned, other, *extra, prune=prune):
                if c[1:] not in [o[1:] for o in offered]:
                    case.configs.append(c)
                    case.offered.append(False)
        if capability >= case.needs:
            out.append(case)

    bf = "*bf16"
    # ---- attention: _attn_fwd per mode x (head dim, text, fused) ----
    ptrs = dict.fromkeys(("Qi", "Ki", "Vi", "Oi", "Qt", "Kt", "Vt", "Ot"), bf)
    tabs = dict.fromkeys(("CosI", "SinI", "CosT", "SinT", "WQi", "WKi", "WQt", "WKt", "KS", "VS"), "*fp32")
    modes = [("bf16", 0, False)] + ([] if quick else [(m, *attention.MODES[m]) for m in attention.MODES])
    for tag, qk8, pv8 in modes:
        needs = E4M3_FROM if qk8 == 1 or pv8 else INT8_FROM
        for hd, has_txt, norm in ((HD, True, True), (PIX_HD, False, True), (HD, False, False), (PIX_HD, False, False)):
            hd_a, hd_b = attention._chunks(hd, qk8 > 0 or pv8)
            consts = dict(HD=hd, HD_A=hd_a, HD_B=hd_b, HAS_TXT=has_txt, NORM=norm, PREC="tf32", ALIGN=8, QK8=qk8,
                          PV8=pv8)
            what = f"{tag} hd{hd} {'fused' if norm else 'core'}{' +text' if has_txt else ''}"
            add(Case("attention._attn_fwd", what, ("pidkern.kernels.attention", "_attn_fwd"),
                     {**ptrs, **tabs, "qk_scale": "fp32", "eps": "fp32"}, consts, [], needs,
                     ints16=("s_ib", "s_it", "s_tb", "s_tt", "s_oib", "s_oit", "s_otb", "s_ott")),
                attention._attn_fwd_tuned)
    for hd in (HD, PIX_HD):   # attention_prep: one fixed launch (BLOCK 64, 4 warps)
        hd_a, hd_b = attention._chunks(hd)
        add(Case("attention._prep", f"hd{hd}", ("pidkern.kernels.attention", "_prep"),
                 {"QKV": bf, "Q": bf, "K": bf, "V": bf, "Cos": "*fp32", "Sin": "*fp32", "WQ": bf, "WK": bf,
                  "eps": "fp32"}, dict(HD=hd, HD_A=hd_a, HD_B=hd_b, ALIGN=8, BLOCK=64), [],
                 ints16=("s_b", "s_t", "s_ob")),
            fixed=[("BLOCK64 w4 s3", {}, 4, 3)])
    # ---- the GEMMs with fused epilogues ----
    hhd = HEADS * HD
    add(Case("qkv_rope._qkv_rope_kernel", f"hd{HD} x{HEADS} heads", ("pidkern.kernels.qkv_rope", "_qkv_rope_kernel"),
             {"h_ptr": bf, "w_ptr": bf, "q_ptr": bf, "k_ptr": bf, "v_ptr": bf, "nw_ptr": bf, "cos_ptr": "*fp32",
              "sin_ptr": "*fp32", "eps": "fp32"},
             dict(HD=HD, HHD=hhd, ALIGN=8, EVEN_K=True, DOT_PREC="tf32"), [], ints16=("D", "s_hm", "s_wn", "n_out")),
        qkv_rope._tuned, prune=lambda cs: qkv_rope._prune(cs, {}, HD=HD, HHD=hhd))
    add(Case("swiglu._swiglu_kernel", f"D{HIDDEN} Hm{MLP}", ("pidkern.kernels.swiglu", "_swiglu_kernel"),
             {"u_ptr": bf, "w_ptr": bf, "h_ptr": bf}, dict(EVEN_K=True, DOT_PREC="tf32"), [],
             ints16=("Hm", "D", "s_um", "s_wn", "s_hm"), ones=("s_uk", "s_wk", "s_hn")),
        swiglu._swiglu_tuned)
    add(Case("int8_gemm._int8_gemm_kernel", f"K{HIDDEN} N{MLP}, bias", ("pidkern.kernels.int8_gemm",
                                                                      "_int8_gemm_kernel"),
             {"a_ptr": "*i8", "w_ptr": "*i8", "sa_ptr": "*fp32", "sw_ptr": "*fp32", "bias_ptr": bf, "out_ptr": bf},
             dict(HAS_BIAS=True, EVEN_K=True), [], INT8_FROM, ints16=("N", "K", "s_am", "s_wn", "s_om")),
        int8_gemm._int8_gemm_tuned)
    add(Case("swiglu._silu_mul_kernel", f"Hm{MLP}", ("pidkern.kernels.swiglu", "_silu_mul_kernel"),
             {"ab_ptr": bf, "h_ptr": bf}, dict(BLOCK_M=8, BLOCK_N=512), [], ints16=("Hm", "s_am", "s_hm")),
        fixed=[("8x512 w4 s3", {}, 4, 3)])
    add(Case("gate._gate_gemm_kernel", f"v1 D{HIDDEN}, x float32", ("pidkern.kernels.gate", "_gate_gemm_kernel"),
             {"x_ptr": "*fp32", "lq_ptr": bf, "w_ptr": bf, "b_ptr": bf, "la_ptr": bf, "sig_ptr": "*fp32",
              "out_ptr": "*fp32"}, dict(EVEN_K=True, DOT_PREC="tf32"), [],
             ints16=("D", "s_xb", "s_xn", "s_lb", "s_ln", "s_wn", "s_ob", "s_on"), ones=("s_wk",)),
        gate._gate_gemm_tuned)
    block_d = 2048
    add(Case("gate._gate_rowdot_kernel", f"v1.5 D{HIDDEN}", ("pidkern.kernels.gate", "_gate_rowdot_kernel"),
             {"x_ptr": "*fp32", "lq_ptr": bf, "w_ptr": bf, "b_ptr": bf, "la_ptr": bf, "sig_ptr": "*fp32",
              "out_ptr": "*fp32"}, dict(BLOCK_R=max(1, min(16, 8192 // block_d)), BLOCK_D=block_d), [],
             ints16=("D", "s_xb", "s_xn", "s_lb", "s_ln", "s_ob", "s_on"), ones=("s_wk",)),
        fixed=[("4x2048 w8 s3", {}, 8, 3)])
    add(Case("embed._embed_kernel", f"P{PATCH} Dp{PDIM}", ("pidkern.kernels.embed", "_embed_kernel"),
             {"x_ptr": bf, "w_ptr": bf, "b_ptr": bf, "pw_ptr": bf, "pb_ptr": bf, "col_ptr": "*fp32",
              "row_ptr": "*fp32", "tok_ptr": bf, "pix_ptr": bf},
             dict(P=PATCH, BLOCK_P=PATCH, DP=PDIM, BLOCK_DP=PDIM, DOT_PREC="tf32"), [],
             ints16=("D", "s_xb", "s_xc", "s_xh", "s_wn", "s_col", "s_row"), ones=("s_xw", "s_wk")),
        embed._embed_tuned)
    # ---- memory-bound kernels ----
    for what, c, x, res in ((f"patch C{HIDDEN} +residual", HIDDEN, "*fp32", True), (f"patch C{HIDDEN}", HIDDEN,
                                                                                    "*fp32", False),
                            (f"pixel C{PDIM}", PDIM, bf, False)):
        block_c = 1 << (c - 1).bit_length()
        mod = "*fp32" if x == "*fp32" else bf     # the patch blocks' adaLN vectors are float32
        add(Case("rms_modulate._rms_modulate_kernel", what, ("pidkern.kernels.rms_modulate", "_rms_modulate_kernel"),
                 {"x_ptr": x, "y_ptr": bf, "g_ptr": mod, "w_ptr": bf, "sh_ptr": mod, "sc_ptr": mod, "xo_ptr": x,
                  "h_ptr": bf, "eps": "fp32"}, dict(HAS_RES=res, BLOCK_C=block_c), [], ints16=("C",)),
            rms_modulate._tuned, block_c)
    add(Case("pixel_modulate._pixel_post_kernel", f"Dp{PDIM} hidden 64", ("pidkern.kernels.pixel_modulate",
                                                                            "_pixel_post_kernel"),
             dict.fromkeys(("p_ptr", "e_ptr", "m_ptr", "nw_ptr", "w1_ptr", "b1_ptr", "w2_ptr", "b2_ptr", "out_ptr"),
                           bf) | {"eps": "fp32"},
             dict(D=PDIM, H=64, DOT_PREC="tf32"), [], ints16=("P2", "sp0", "sp1", "se0", "se1", "sm0", "sm1")),
        pixel_modulate._pixel_post_tuned)
    return out


MMA = re.compile(r"\b(wgmma\.mma_async[\w.:]*|mma\.sync[\w.:]*|tcgen05\.mma[\w.:]*)")


def mma_kinds(ptx: str) -> list[str]:
    """The tensor-core instructions of a PTX text, short: 'wgmma bf16', 'mma.sync s8',
    'tcgen05 f8f6f4'."""
    kinds = set()
    for ins in set(MMA.findall(ptx)):
        parts = ins.split(".")
        if ins.startswith("tcgen05"):
            kind = next((p.split("::")[1] for p in parts if p.startswith("kind::")), "?")
            kinds.add(f"tcgen05 {kind}")
        elif ins.startswith("wgmma"):
            kinds.add(f"wgmma {parts[-2] if len(parts) > 2 else '?'}")
        else:   # mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: D, A, B, C types
            kinds.add(f"mma.sync {parts[-3] if len(parts) > 4 else '?'}")
    return sorted(kinds)


def _cpu() -> float:
    """CPU seconds of this process and its finished children (ptxas): what a compile costs
    whatever else the machine runs."""
    import resource
    return time.process_time() + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime


def compile_one(job) -> dict:
    """Compile one (case, config) for one target; what ptxas and the PTX say."""
    arch, case, i = job
    label, kwargs, warps, stages = case.configs[i]
    cap, limit = TARGETS[arch]
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = _fn(*case.fn_path)
    names = list(fn.arg_names)
    consts = {**case.consts, **kwargs}
    consts.update({n: 1 for n in case.ones})
    sig = {n: "constexpr" if n in consts else case.types.get(n, "i32") for n in names}
    const_idx = {(names.index(n),): v for n, v in consts.items()}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if n not in consts and (case.types.get(n, "").startswith("*") or n in case.ints16)}
    row = {"arch": arch, "kernel": case.kernel, "variant": case.variant, "config": label,
           "offered": case.offered[i], "limit": limit}
    log = io.StringIO()
    t0 = time.perf_counter()
    cpu0 = _cpu()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn, sig, const_idx, attrs), target=GPUTarget("cuda", cap[0] * 10 + cap[1], 32),
                               options={"num_warps": warps, "num_stages": stages})
    except Exception as e:  # noqa: BLE001 - a variant that does not build is the finding
        row.update(status="FAIL", error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}")
        return row
    text = log.getvalue()
    regs = re.findall(r"Used (\d+) registers", text)
    spill = re.findall(r"(\d+) bytes spill stores", text)
    shared = int(k.metadata.shared)
    row.update(regs=int(regs[-1]) if regs else None, spill=int(spill[-1]) if spill else None, shared=shared,
               mma=mma_kinds(k.asm["ptx"]), seconds=round(time.perf_counter() - t0, 2),
               cpu_s=round(_cpu() - cpu0, 2),
               status="OK" if shared <= limit else "NO-FIT")
    if row["status"] == "OK" and row["spill"]:
        row["status"] = "SPILL"
    return row


def _init_worker(cache_dir: str, ptxas: str | None):
    os.environ["TRITON_CACHE_DIR"] = cache_dir      # a fresh cache: every compile runs ptxas, whose log we read
    from triton import knobs
    knobs.cache.dir = cache_dir
    knobs.nvidia.dump_ptxas_log = True
    if ptxas:
        knobs.nvidia.ptxas.path = ptxas
        knobs.nvidia.ptxas_blackwell.path = ptxas


def run(arches, quick=False, other_family=False, jobs=1, ptxas=None, progress=None, kernels=None) -> list[dict]:
    from pidkern.kernels._common import FAMILIES, arch_family
    todo = []
    for arch in arches:
        cap = TARGETS[arch][0]
        fam = arch_family(cap)
        other = next(f for f in FAMILIES if f != fam) if other_family else None
        for case in cases(fam, cap, quick, other):
            if kernels and not any(k in case.kernel for k in kernels):
                continue
            todo += [(arch, case, i) for i in range(len(case.configs))]
    with tempfile.TemporaryDirectory() as cache:
        if jobs <= 1:
            _init_worker(cache, ptxas)
            rows = []
            for job in todo:
                rows.append(compile_one(job))
                if progress:
                    progress(rows[-1], len(rows), len(todo))
            return rows
        with ProcessPoolExecutor(jobs, initializer=_init_worker, initargs=(cache, ptxas)) as pool:
            rows = []
            for row in pool.map(compile_one, todo):
                rows.append(row)
                if progress:
                    progress(row, len(rows), len(todo))
            return rows


def verdict(rows: list[dict]) -> list[str]:
    """The problems that fail the run: an offered config that cannot launch, or a kernel
    variant with no offered config that fits its target."""
    problems = []
    groups = {}
    for r in rows:
        groups.setdefault((r["arch"], r["kernel"], r["variant"]), []).append(r)
        if r["offered"] and r["status"] in ("FAIL", "NO-FIT"):
            what = (f"{r['shared']} B of shared memory > {r['limit']}" if r["status"] == "NO-FIT"
                    else r.get("error", "failed"))
            problems.append(f"{r['arch']} {r['kernel']} [{r['variant']}] {r['config']}: offered, cannot launch: {what}")
    for (arch, kernel, variant), rs in groups.items():
        if not any(r["offered"] and r["status"] in ("OK", "SPILL") for r in rs):
            problems.append(f"{arch} {kernel} [{variant}]: no offered config fits")
    return problems


def format_row(r: dict) -> str:
    tag = "" if r["offered"] else "  (not offered)"
    if r["status"] == "FAIL":
        return f"{r['arch']:8} {r['kernel']:34} {r['variant']:26} {r['config']:22} FAIL {r.get('error', '')}{tag}"
    spill = f"{r['spill']} B spilled" if r["spill"] else "no spill"
    return (f"{r['arch']:8} {r['kernel']:34} {r['variant']:26} {r['config']:22} {r['regs']!s:>3} regs "
            f"{spill:15} smem {r['shared']:>6}/{r['limit']:<6} {','.join(r['mma']) or '-':16} {r['status']}{tag}")


def main(argv=None):
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compile_matrix: unset TRITON_INTERPRET (it compiles, not interprets)")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default=",".join(DEFAULT_ARCHES),
                    help=f"comma-separated targets among {', '.join(TARGETS)} (default: all)")
    ap.add_argument("--quick", action="store_true", help="bf16 attention variants only (the 8-bit modes are skipped)")
    ap.add_argument("--other-family", action="store_true",
                    help="also compile the other architecture family's configs (reported, never failing)")
    ap.add_argument("--kernels", default="", help="comma-separated substrings of kernel names to compile (default: all)")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="compile processes (default 1)")
    ap.add_argument("--json", default=None, help="write every row as JSON to this path")
    ap.add_argument("--ptxas", default="bundled", choices=("bundled", "system"),
                    help="Triton's own ptxas (default) or the ptxas on PATH (e.g. CUDA 13's)")
    args = ap.parse_args(argv)
    arches = [a.strip() for a in args.arch.split(",") if a.strip()]
    for a in arches:
        if a not in TARGETS:
            raise SystemExit(f"--arch {a!r}: expected one of {', '.join(TARGETS)}")
    ptxas = None
    if args.ptxas == "system":
        ptxas = shutil.which("ptxas")
        if ptxas is None:
            raise SystemExit("--ptxas system: no ptxas on PATH")
    import triton
    from pidkern.kernels._common import arch_family
    print(f"triton {triton.__version__}; ptxas: {ptxas or 'bundled with Triton'}; targets: "
          + ", ".join(f"{a} ({arch_family(TARGETS[a][0])} configs)" for a in arches), flush=True)
    t0 = time.perf_counter()
    rows = run(arches, args.quick, args.other_family, max(1, args.jobs), ptxas,
               progress=lambda r, n, total: print(format_row(r), flush=True),
               kernels=[k for k in args.kernels.split(",") if k])
    problems = verdict(rows)
    spills = sum(1 for r in rows if r["offered"] and r.get("status") == "SPILL")
    cpu = sum(r.get("cpu_s", 0) for r in rows)
    print(f"\n{len(rows)} compiles in {time.perf_counter() - t0:.0f} s ({cpu:.0f} CPU s); {spills} offered configs "
          f"spill (slower, still launch)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "ptxas": ptxas or "bundled", "rows": rows,
                       "problems": problems}, f, indent=1)
    for p in problems:
        print("PROBLEM:", p)
    print("compile_matrix: " + ("FAILED" if problems else "every offered config launches on every target"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
