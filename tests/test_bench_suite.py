"""The benchmark harness: smoke run of the whole suite, dry run, baseline cost models, CLI flags."""
import argparse
import json
import math

import pytest
import torch

import bench.__main__ as bench_main
from bench.baselines import count_flops, realesrgan, seedvr2, vae
from pidkern import benchmark as pb
from pidkern import ops
from pidkern.config import tiny


def test_smoke_suite_runs_and_writes_outputs(tmp_path, monkeypatch, capsys):
    # PyTorch math for the fused ops: the interpreter would time nothing useful and is slow
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rc = bench_main.main(["--smoke", "--out", str(tmp_path)])
    files = sorted(p.suffix for p in tmp_path.iterdir())
    assert ".json" in files and ".md" in files
    payload = json.loads(next(tmp_path.glob("*.json")).read_text())
    rows = payload["results"]
    names = {r["name"] for r in rows}
    assert {"fast", "fp8", "release", "bf16", "compile", "cascade: VAE + Real-ESRGAN", "cascade: VAE + SeedVR2-3B"} <= names
    assert {f"fast -{o}" for o in pb.OPTIMISATIONS} <= names
    for r in rows:
        assert "median_ms" in r or "error" in r or "skipped" in r, r
        if r["name"].startswith("fast"):
            continue  # the engine's own rows: recorded either way, the harness must not hide them
        assert "error" not in r, (r["name"], r.get("traceback"))
        assert r["median_ms"] > 0 and r["first_call_ms"] > 0 and math.isfinite(r["tflops"]) and r["tflop"] > 0
    assert rc == (1 if any("error" in r for r in rows) else 0)
    und = next(r for r in rows if r["name"] == "undistilled")      # DPM-Solver++ with guidance: 2B per step
    assert "error" not in und and "dpm++ 2 steps" in und["note"], und
    fp8 = next(r for r in rows if r["name"] == "fp8")
    assert "error" not in fp8, fp8.get("traceback")    # the 8-bit engine runs (emulated) on the CPU too
    md = next(tmp_path.glob("*.md")).read_text()
    assert "| release |" in md and "VAE + TSD-SR | not modelled" in md
    assert payload["gemm_ceiling"]["tflops"] > 0 and payload["env"]["torch"] == torch.__version__


def test_dry_run_lists_rows(capsys):
    assert bench_main.main(["--dry-run", "--sizes", "1024,2048", "--batches", "1,4"]) == 0
    out = capsys.readouterr().out
    assert "release" in out and "compile" in out and "fast -graphs" in out
    assert "VAE + SeedVR2-3B" in out and "not modelled" in out
    assert "177.847 TFLOP" in out and "711.388 TFLOP" in out   # decode_flops, scaled by the batch


def test_cli_arguments_cover_every_optimisation():
    p = pb.add_arguments(argparse.ArgumentParser())
    flags = [f"--disable-{o.replace('_', '-')}" for o in pb.OPTIMISATIONS]
    args = p.parse_args(flags + ["--preset", "sd3-2k", "--size", "512", "--suite", "full", "--json", "x.json"])
    assert set(pb.disabled_options(args)) == set(pb.OPTIMISATIONS)
    # every fused op's kernel can be switched off through the plan (qkv_rope by its attention route)
    assert set(ops.OPS) - {"qkv_rope"} <= set(pb.OPTIMISATIONS) and "qkv_rope+sdpa" in pb.ATTENTION_ROUTES
    assert args.suite == "full" and args.size == 512


def test_quick_job_dry_run_and_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    p = pb.add_arguments(argparse.ArgumentParser())
    res = pb.run_default(p.parse_args(["--dry-run", "--device", "cpu"]))
    assert res["dry_run"] and "128x128" in res["what"] and "1 steps" in res["what"]
    out = tmp_path / "r.json"
    res = pb.run_default(p.parse_args(["--smoke", "--device", "cpu", "--backend", "reference", "--reps", "1",
                                       "--json", str(out)]))
    assert res["median_ms"] > 0 and res["tflop"] > 0 and json.loads(out.read_text())["result"]["batch"] == 1
    err = capsys.readouterr().err
    assert "decode steps" in err and "/2 " in err        # tqdm over the first call + 1 timed run, 1 step each
    pb.run_default(p.parse_args(["--smoke", "--device", "cpu", "--backend", "reference", "--reps", "1",
                                 "--steps", "1", "--quiet"]))
    assert "decode steps" not in capsys.readouterr().err


def test_ablations_are_plan_overrides():
    over = pb.ablation_plan(["gate", "graphs"], "qkv_rope+sdpa", plan="swiglu.text=split")
    assert over == {"gate": "torch", "graphs": False, "attention.patch": "qkv_rope+sdpa",
                    "attention.pixel": "prep+sdpa", "swiglu.text": "split"}
    with pytest.raises(ValueError, match="disable"):
        pb.ablation_plan(["turbo"])


def test_full_suite_is_not_imported_by_the_package():
    p = pb.add_arguments(argparse.ArgumentParser())
    with pytest.raises(ValueError, match="python -m bench"):
        pb.main(p.parse_args(["--suite", "full"]))


def test_fill_random_is_finite_and_fast_shaped():
    net = pb.random_net(tiny("flux-2kto4k-v1.5"), "cpu", torch.bfloat16)
    params = dict(net.named_parameters())
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in params.values())
    assert torch.equal(params["patch_blocks.0.norm_x1.weight"], torch.ones_like(params["patch_blocks.0.norm_x1.weight"]))
    w = params["patch_blocks.0.attn.qkv_x.weight"].float()
    assert 0.5 < w.std().item() * math.sqrt(w.shape[1]) < 2   # 1/sqrt(fan_in) scale
    assert not torch.equal(w, params["patch_blocks.1.attn.qkv_x.weight"].float())


def test_realesrgan_flops_match_analytic():
    counted = count_flops(lambda: realesrgan.model(True), lambda d: (torch.empty(2, 3, 12, 20, device=d),))
    assert counted == pytest.approx(realesrgan.analytic_flops(12, 20, batch=2, **realesrgan.SMOKE), rel=1e-9)
    full = realesrgan.analytic_flops(512, 512)
    assert 8e12 < full < 1.2e13  # ~9.4 TFLOP for 512² -> 2048²


def test_causal_conv_costs_three_taps():
    two = count_flops(lambda: vae.decoder(True), lambda d: (torch.empty(1, 16, 6, 5, device=d),))
    three = count_flops(lambda: vae.decoder(True, temporal=True), lambda d: (torch.empty(1, 16, 6, 5, device=d),))
    # 3x3 convs cost 3x, 1x1 convs and attention the same: strictly between 2x and 3x
    assert 2 * two < three < 3 * two
    x = torch.randn(1, 16, 6, 5)
    dec = vae.decoder(True, temporal=True).eval()
    with torch.no_grad():
        assert dec(x).shape == (1, 3, 48, 40)


def test_seedvr2_windows_partition_the_grid():
    cfg = seedvr2.DiTConfig()
    assert seedvr2.window_size(128, 128, cfg) == (20, 20)     # 400 video tokens per window at 2048²
    for shifted in (False, True):
        groups = seedvr2.windows(128, 128, cfg, shifted)
        idx = torch.cat([g.flatten() for g in groups])
        assert torch.equal(idx.sort().values, torch.arange(128 * 128))
    assert sum(g.shape[0] for g in seedvr2.windows(128, 128, cfg, False)) == 49
    assert 3.0e9 < seedvr2.dit_param_count() < 3.6e9


def test_seedvr2_smoke_forward_is_finite():
    m = pb.fill_random_(seedvr2.model(smoke=True)).eval()
    img, text = torch.rand(1, 3, 16, 24) * 2 - 1, torch.randn(1, seedvr2.SMOKE.text_tokens, seedvr2.SMOKE.text_in)
    with torch.no_grad():
        out = m(img, text, 64)
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
