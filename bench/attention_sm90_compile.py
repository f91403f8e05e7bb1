"""Compile the attention kernel's variants for sm_90 without a GPU: registers, spills, MMAs.

    python -m bench.attention_sm90_compile

Triton compiles for a named target offline, and ptxas comes in its wheel. For every mode
(bf16 and the 8-bit ones), each flux-2k head dim (64 with text, 72 without), fused and core,
and each autotune config, this prints what ptxas reports (registers, spill stores) and which
tensor-core instructions the PTX uses. It says whether a variant builds for the H200, and
whether it spills. It says nothing about speed.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile


def main():
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("attention_sm90_compile: unset TRITON_INTERPRET (it compiles, not interprets)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pidkern.kernels import attention as K

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    names = list(K._attn_fwd.arg_names)
    pointers = {"Qi", "Ki", "Vi", "Oi", "Qt", "Kt", "Vt", "Ot"}
    tables = {"CosI", "SinI", "CosT", "SinT", "WQi", "WKi", "WQt", "WKt", "KS", "VS"}
    modes = [("bf16", 0, False)] + [(m, *K.MODES[m]) for m in K.MODES]
    configs = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in K._configs()]
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for tag, qk8, pv8 in modes:
            for hd, has_txt, norm in ((64, True, True), (72, False, True), (64, False, False), (72, False, False)):
                hd_a, hd_b = K._chunks(hd, qk8 > 0 or pv8)
                for bm, bn, warps, stages in sorted(set(configs)):
                    cx = dict(HD=hd, HD_A=hd_a, HD_B=hd_b, HAS_TXT=has_txt, NORM=norm, PREC="tf32", ALIGN=8,
                              QK8=qk8, PV8=pv8, BLOCK_M=bm, BLOCK_N=bn)
                    sig = {n: "constexpr" if n in cx else "*bf16" if n in pointers else "*fp32" if n in tables
                           else "fp32" if n in ("qk_scale", "eps") else "i32" for n in names}
                    const = {(names.index(n),): v for n, v in cx.items()}
                    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in pointers | tables}
                    what = (f"{tag:7} hd{hd} {'fused' if norm else 'core ':5} text={int(has_txt)} "
                            f"{bm}x{bn} w{warps} s{stages}")
                    try:
                        k = triton.compile(ASTSource(K._attn_fwd, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                                           options={"num_warps": warps, "num_stages": stages})
                    except Exception as e:  # noqa: BLE001 - a variant that does not build is the finding
                        failed += 1
                        print(f"{what}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                        continue
                    ptx = k.asm["ptx"]
                    path = os.path.join(tmp, "k.ptx")
                    with open(path, "w") as f:
                        f.write(ptx)
                    r = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                                       capture_output=True, text=True)
                    regs = re.findall(r"Used (\d+) registers", r.stderr)
                    spill = re.findall(r"(\d+) bytes spill stores", r.stderr)
                    found = re.findall(r"wgmma\.mma_async\.sync\.aligned\.[\w.]+", ptx)
                    mma = sorted({m.split(".", 5)[-1] for m in found})   # e.g. f32.e4m3.e4m3
                    print(f"{what}: {regs[0] if regs else '?'} registers, {spill[0] if spill else '?'} B spilled, "
                          f"wgmma {mma}{', mma.sync' if 'mma.sync' in ptx else ''}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
