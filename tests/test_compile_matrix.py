"""bench.compile_matrix's plumbing: which variants each target gets, the verdict, the MMA
parse, and one real offline compile in a fresh process (the suite runs the interpreter)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import compile_matrix as M
from pidkern.kernels._common import FAMILIES, SM80, SM90, arch_family

ROOT = Path(__file__).resolve().parent.parent


def test_families_by_capability():
    assert [arch_family(M.TARGETS[a][0]) for a in M.TARGETS] == [SM80, SM80, SM80, SM90, SM90, SM80]
    assert arch_family((12, 1)) == SM80 and arch_family((10, 3)) == SM90 and arch_family((7, 5)) == SM80


def test_e4m3_variants_only_from_sm_89():
    for arch, has_e4m3 in (("sm_86", False), ("sm_80", False), ("sm_89", True), ("sm_120", True)):
        cap = M.TARGETS[arch][0]
        variants = {c.variant.split()[0] for c in M.cases(arch_family(cap), cap) if c.kernel == "attention._attn_fwd"}
        assert {"bf16", "int8qk"} <= variants
        assert ({"fp8", "fp8qk", "int8"} <= variants) == has_e4m3, (arch, variants)


def test_offered_configs_are_the_kernels_own_per_family():
    from pidkern.kernels import attention, swiglu
    for fam in FAMILIES:
        cap = (9, 0) if fam == SM90 else (8, 9)
        cs = {c.kernel: c for c in M.cases(fam, cap, quick=True)}
        assert len(cs["attention._attn_fwd"].configs) == len(attention._configs(fam))
        assert [c[1:] for c in cs["swiglu._swiglu_kernel"].configs] == [
            (dict(c.kwargs), c.num_warps, c.num_stages) for c in swiglu._configs(fam)]
    # --other-family adds the other set, not offered
    case = next(c for c in M.cases(SM80, (8, 9), quick=True, other=SM90) if c.kernel == "swiglu._swiglu_kernel")
    assert True in case.offered and False in case.offered


def _row(**kw):
    row = dict(arch="sm_89", kernel="k", variant="v", config="c", offered=True, limit=101376, status="OK",
               shared=1000, regs=100, spill=0, mma=[])
    row.update(kw)
    return row


def test_verdict():
    assert M.verdict([_row(), _row(config="d", status="NO-FIT", shared=122880, offered=False)]) == []
    bad = M.verdict([_row(status="NO-FIT", shared=122880), _row(config="d")])
    assert len(bad) == 1 and "cannot launch" in bad[0] and "122880" in bad[0]
    none_fit = M.verdict([_row(offered=False), _row(config="d", status="FAIL", error="boom")])
    assert any("no offered config fits" in p for p in none_fit) and any("boom" in p for p in none_fit)
    assert M.verdict([_row(status="SPILL", spill=64)]) == []     # spills are slow, not fatal


def test_mma_kinds():
    ptx = ("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...}\n"
           "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {...}\n"
           "tcgen05.mma.cta_group::1.kind::f8f6f4 [...]\n")
    assert M.mma_kinds(ptx) == ["mma.sync s8", "tcgen05 f8f6f4", "wgmma bf16"]


def test_one_offline_compile(tmp_path):
    """The pixel-row rms_modulate for sm_120, in a process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    out = tmp_path / "m.json"
    proc = subprocess.run([sys.executable, "-m", "bench.compile_matrix", "--arch", "sm_120", "--kernels",
                           "_pixel_post", "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    if "ptxas" in proc.stderr and proc.returncode and not out.exists():
        pytest.skip(f"no usable ptxas here: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3 and all(r["status"] == "OK" and r["shared"] <= 99 * 1024 for r in rows)
    assert all(r["mma"] == ["mma.sync bf16"] and r["regs"] > 0 for r in rows)


def test_config_launch_reads_failed_configs_from_the_autotuners():
    """bench.config_launch's report on autotuners as Triton leaves them after tuning: a
    config timed infinite did not launch."""
    import triton

    from bench import config_launch as C
    from pidkern.kernels._common import ArchAutotune

    class Tuner:   # what triton.autotune keeps after a tuning run
        def __init__(self, timings):
            self.configs = list(timings)
            self.configs_timings = timings

    ok, bad = triton.Config({"BLOCK": 64}, num_warps=4), triton.Config({"BLOCK": 128}, num_warps=8)
    arch = ArchAutotune(None, lambda fam: [ok, bad], key=[])
    arch._tuned[("sm80",)] = Tuner({ok: [0.1, 0.1, 0.1], bad: [float("inf")] * 3})
    rows, problems = C.report({"k.t": arch})
    assert rows[0]["timed"] == 2 and rows[0]["chosen"] == str(ok) and rows[0]["failed"] == [str(bad)]
    assert len(problems) == 1 and "did not launch" in problems[0]
    assert "attention._attn_fwd_tuned" in C.tuners() and "rms_modulate._tuned" in C.tuners()


def test_arch_autotune_builds_one_autotuner_per_family_and_extra():
    import torch
    import triton

    from pidkern.kernels._common import INTERPRET_FAMILY, ArchAutotune, device_family
    seen = []

    def configs(family, width=None):
        seen.append((family, width))
        return [triton.Config({"BLOCK": 16 if family == SM80 else 32})]

    @triton.jit
    def k(x):
        pass

    arch = ArchAutotune(k, configs, key=["x"])
    a, b = arch.tuned(SM80, 8), arch.tuned(SM90, 8)
    assert arch.tuned(SM80, 8) is a and a is not b and arch.tuned(SM80, 16) is not a
    assert seen == [(SM80, 8), (SM90, 8), (SM80, 16)]
    assert [c.kwargs["BLOCK"] for c in a.configs] == [16] and [c.kwargs["BLOCK"] for c in b.configs] == [32]
    assert device_family(torch.device("cpu")) == INTERPRET_FAMILY
