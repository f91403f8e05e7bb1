"""Sequence-parallel decoding (pidkern.parallel) against one process.

The reference is the plain single-process decode of the same weights and inputs: the
parallel decode must give the same image (float32, relative L2 <= 1e-5). Each world size
is spawned once (gloo on 127.0.0.1) and runs every case, to keep process start-up (about
5 s on two cores) out of the per-case cost.
"""
from __future__ import annotations

import os
import traceback
import warnings
import zlib
from contextlib import contextmanager

import pytest
import torch
import torch.multiprocessing as mp

import pidkern
from pidkern.config import tiny
from pidkern.parallel import split_rows

FAMILIES = ("flux-2k", "flux2-2k", "siglip-2k", "sdxl-2kto4k", "dinov2-2k", "flux-2kto4k-v1.5",
            "flux2-2kto4k-v1.5", "qwenimage-2kto4k-v1.5")
# A guard against a hung group, not a timing: a loaded 2-core machine needs ~200 s for 3 ranks.
TIMEOUT_S = 600


# gloo's connections between the ranks stay on the loopback interface
LOOPBACK = {"GLOO_SOCKET_IFNAME": "lo"}


def case_inputs(name: str, base: str, lh: int, lw: int, batch: int = 1, with_text: bool = False, **shape):
    """The same latent, sigma and text on every rank and in the parent."""
    cfg = tiny(base, **shape)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    latent = torch.randn(batch, cfg.latent_channels, lh, lw, generator=g)
    sigma = torch.rand(batch, generator=g) * 0.5
    text = torch.randn(batch, 7, cfg.text_dim, generator=g) if with_text else None
    return cfg, latent, sigma, text


# name -> (base preset, latent h, latent w, batch, with text, decode kwargs)
# 1x1 latents: 4 to 16 patch rows, uneven over 3 ranks for most families
CASES = {f"{b}": (b, 1, 1, 1, False, dict(steps=2)) for b in FAMILIES}
CASES.update({
    "odd-4steps-text": ("flux-2k", 3, 5, 1, True, dict(steps=4, seed=11)),   # 12 x 20 patch rows x cols
    "batch2-ode": ("flux-2kto4k-v1.5", 1, 3, 2, True, dict(steps=3, sampler="ode", seed=5)),
    "philox": ("sdxl-2kto4k", 2, 1, 1, False, dict(steps=4, noise="philox", seed=3)),
    # the fast path (FastPiD, Triton kernels under TRITON_INTERPRET=1 on the CPU), checked
    # against the one-process reference decode (the fast path's own error is ~3e-7)
    "fast-philox-v15": ("flux2-2kto4k-v1.5", 1, 1, 1, True, dict(steps=2, noise="philox", backend="fast")),
})


# sp_attention="ulysses": heads that do not divide by 2 or 3 (3 patch heads, 5 pixel heads: padded
# on 2 ranks, and the pixel heads on 3). The reference case has 5 patch rows (32-pixel patches),
# uneven on 2 and 3 ranks; the fast one (8-pixel patches: the interpreter is slow on bigger ones)
# 8 rows, uneven on 3; the reference one a batch of 2.
ODD_HEADS = dict(hidden=48, heads=3, pixel_attn_dim=80, pixel_heads=5)
ULYSSES = {
    "ulysses-reference": ("flux-2k", 5, 1, 2, True, dict(steps=2, seed=2), dict(patch=32)),
    "ulysses-fast": ("flux2-2kto4k-v1.5", 1, 1, 1, True, dict(steps=2, noise="philox", backend="fast"), {}),
}


def _decoder(cfg, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # random weights: intended here
        return pidkern.load(preset=cfg, device="cpu", dtype="float32", **kw)


def _worker(rank: int, world: int, out_dir: str):
    import torch.distributed as dist
    torch.set_num_threads(1)
    os.environ.update(LOOPBACK)
    # rendezvous through a file: no port to pick, none another process can take first
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    results, errors = {}, {}
    try:
        decoders = {}
        for name, (base, lh, lw, batch, with_text, kw) in CASES.items():
            cfg, latent, sigma, text = case_inputs(name, base, lh, lw, batch, with_text)
            dec = decoders.get(base) or decoders.setdefault(base, _decoder(cfg, parallel="sequence"))
            kw = dict(kw)
            results[name] = dec.decode(latent, sigma, text=text, seed=kw.pop("seed", 0), **kw)
        # what the cost model says a rank receives (bench.parallel_cost), in float32
        from bench.parallel_cost import kv_gather_bytes, ulysses_bytes
        for case in ("batch2-ode", "fast-philox-v15"):   # each its decoder's last decode
            base, lh, lw, batch, _, kw = CASES[case]
            cfg = tiny(base)
            h, w = cfg.output_size(lh, lw)
            results["traffic", case] = (decoders[base].last_kv_bytes,
                                        kw["steps"] * kv_gather_bytes(cfg, h, world, width=w, batch=batch, dtype_bytes=4))
        for name, (base, lh, lw, batch, with_text, kw, shape) in ULYSSES.items():
            cfg, latent, sigma, text = case_inputs(name, base, lh, lw, batch, with_text, **ODD_HEADS, **shape)
            dec = _decoder(cfg, parallel="sequence", sp_attention="ulysses")
            kw = dict(kw)
            results[name] = dec.decode(latent, sigma, text=text, seed=kw.pop("seed", 0), **kw)
            h, w = cfg.output_size(lh, lw)
            results["traffic", name] = (dec.last_kv_bytes, kw["steps"] * ulysses_bytes(
                cfg, h, world, width=w, batch=batch, dtype_bytes=4, text_len=text.shape[1], rank=rank))
        results["repr"] = repr(dec)
        results["plan"] = str(dec.last_plan)
        # The captured path (CUDA graphs under NCCL): the same band decode, run here through a
        # stand-in for graphs.capture: the warm-up that races (random static inputs), then each
        # replay reruns what would be captured, logging the collectives each rank issues. The
        # next decode of a shape takes that path (2 ranks: the all-gather; 3: the all-to-all).
        calls = []

        def stand_in(run, device, warm_ups=2):
            out = run(True)

            class Replay:
                def replay(self):
                    real = {f: getattr(dist, f) for f in ("all_gather_single", "all_to_all_single")}
                    for f, fn in real.items():
                        setattr(dist, f, lambda *a, _f=f, _fn=fn, **k: (calls.append(_f), _fn(*a, **k))[1])
                    try:
                        out.copy_(run(False))
                    finally:
                        for f, fn in real.items():
                            setattr(dist, f, fn)
            return Replay(), out
        import pidkern.engine
        pidkern.engine.capture = stand_in     # the band graph is captured by the engine's own capture
        name, case_dec = ("fast-philox-v15", decoders["flux2-2kto4k-v1.5"]) if world == 2 else ("ulysses-fast", dec)
        case_dec.last_plan.set("graphs", True, "test: the captured path")
        base, lh, lw, batch, with_text, kw, *shape = {**CASES, **ULYSSES}[name]
        shape = {**ODD_HEADS, **shape[0]} if shape else {}
        cfg, latent, sigma, text = case_inputs(name, base, lh, lw, batch, with_text, **shape)
        results["graph", name] = case_dec.decode(latent, sigma, text=text, seed=0, **kw)
        results["graph-traffic", name] = (case_dec.last_kv_bytes, results["traffic", name][1])
        results["graph-collectives"] = calls
        # every rank gets the image with output="all"
        cfg, latent, sigma, _ = case_inputs("flux-2k", "flux-2k", 1, 1)
        results["all"] = decoders["flux-2k"].decode(latent, sigma, steps=2, seed=0, output="all")

        # misconfigured groups: each rank raises, naming what differs
        def expect_error(key, fn):
            try:
                fn()
                errors[key] = None
            except (ValueError, TypeError) as e:
                errors[key] = str(e)
        dec = decoders["flux-2k"]
        expect_error("seed", lambda: dec.decode(latent, sigma, steps=1, seed=rank))
        expect_error("sigma", lambda: dec.decode(latent, 0.1 * rank, steps=1, seed=0))
        expect_error("latent", lambda: dec.decode(latent + rank, sigma, steps=1, seed=0))
        other = _decoder(cfg if rank == 0 else tiny("sd3-2k"), parallel="sequence")
        expect_error("preset", lambda: other.decode(latent, sigma, steps=1, seed=0))
        changed = _decoder(cfg, parallel="sequence")
        if rank == world - 1:
            with torch.no_grad():
                changed.net.final_layer.linear.bias.add_(1e-3)
            changed.fingerprint = pidkern.parallel.fingerprint(changed.net)
        expect_error("weights", lambda: changed.decode(latent, sigma, steps=1, seed=0))
        few = _decoder(tiny("flux-2k", patch=32), parallel="sequence")   # 1 patch row
        expect_error("rows", lambda: few.decode(torch.zeros(1, 16, 1, 1), 0.0, steps=1, seed=0))
        expect_error("plan", lambda: dec.decode(latent, sigma, steps=1, plan={"graphs": False}))
        # one rank's own bad input: every rank raises (none waits in a collective)
        expect_error("local", lambda: dec.decode(latent, sigma, steps=1 if rank == 0 else 9, seed=0))
        expect_error("output", lambda: dec.decode(latent, sigma, steps=1, seed=0, output="all" if rank else None))
        # seed=None on every rank: one shared seed, so still one image
        results["seed-none"] = dec.decode(latent, sigma, steps=2, seed=None, output="all")
    except Exception:
        errors["crash"] = traceback.format_exc()
    torch.save(dict(results=results, errors=errors), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _spawn(world: int, tmp_path, worker=_worker):
    ctx = mp.start_processes(worker, args=(world, str(tmp_path)), nprocs=world, join=False,
                             start_method="spawn")
    import time
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} ranks did not finish within {TIMEOUT_S} s")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def single_process(name):
    base, lh, lw, batch, with_text, kw, *shape = {**CASES, **ULYSSES}[name]
    kw = dict(kw, backend="reference")
    shape = {**ODD_HEADS, **shape[0]} if shape else {}
    cfg, latent, sigma, text = case_inputs(name, base, lh, lw, batch, with_text, **shape)
    return _decoder(cfg).decode(latent, sigma, text=text, seed=kw.pop("seed", 0), **kw)


@contextmanager
def one_thread():
    """Tiny decodes gain nothing from a second intra-op thread, and lose 10-40x when
    another process holds the other core (OpenMP's workers wait on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference_images():
    with one_thread():
        return {name: single_process(name) for name in (*CASES, *ULYSSES)}


@pytest.mark.parametrize("world", [2, 3])
def test_sequence_parallel_matches_one_process(world, tmp_path, reference_images):
    ranks = _spawn(world, tmp_path)
    for r, got in enumerate(ranks):
        assert "crash" not in got["errors"], f"rank {r}:\n{got['errors']['crash']}"
    rank0 = ranks[0]["results"]
    for name, want in reference_images.items():
        got = rank0[name]
        assert got.shape == want.shape, name
        err = rel_l2(got, want)
        assert err <= 1e-5, f"{name} on {world} ranks: relative L2 {err:.2e}"
        for r in range(1, world):
            assert ranks[r]["results"][name] is None, f"rank {r} got an image without output='all'"
    for r in range(world):
        for case in ("batch2-ode", "fast-philox-v15", *ULYSSES):
            got, modelled = ranks[r]["results"]["traffic", case]
            assert got == modelled and got > 0, f"{case}, rank {r}: received {got} bytes, the cost model says {modelled}"
    assert "sp_attention=ulysses" in rank0["repr"]
    assert "sp_attention     ulysses" in rank0["plan"]
    assert "graphs           False          rule: not CUDA" in rank0["plan"]
    name = "fast-philox-v15" if world == 2 else "ulysses-fast"   # the captured path: the one-process image
    err = rel_l2(rank0["graph", name], reference_images[name])
    assert err <= 1e-5, f"{name}, captured path, on {world} ranks: relative L2 {err:.2e}"
    for r in range(world):
        got, modelled = ranks[r]["results"]["graph-traffic", name]
        assert got == modelled, f"{name}, captured path, rank {r}: {got} bytes, the cost model says {modelled}"
    # every rank captures the same collectives, per step one per attention layer (2 patch and 2 pixel
    # blocks) for the all-gather, two for the all-to-all
    logs = [ranks[r]["results"]["graph-collectives"] for r in range(world)]
    assert logs[0] == (["all_gather_single"] * 8 if world == 2 else ["all_to_all_single"] * 16)
    assert all(log == logs[0] for log in logs)
    for r in range(world):   # output="all", and a shared seed drawn when every rank passes None
        assert rel_l2(ranks[r]["results"]["all"], reference_images["flux-2k"]) <= 1e-5
        assert torch.equal(ranks[r]["results"]["seed-none"], ranks[0]["results"]["seed-none"])

    for r in range(world):
        errs = ranks[r]["errors"]
        assert "seed: rank 0 has 0, rank 1 has 1" in errs["seed"], errs["seed"]
        assert "sigma:" in errs["sigma"] and "weights" not in errs["sigma"], errs["sigma"]
        assert "latent:" in errs["latent"] and "latent_shape" not in errs["latent"], errs["latent"]
        assert "preset: rank 0 has 'tiny-flux-2k', rank 1 has 'tiny-sd3-2k'" in errs["preset"], errs["preset"]
        assert f"rank {world - 1} has" in errs["weights"] and "weights:" in errs["weights"], errs["weights"]
        assert "1 patch rows, fewer than the" in errs["rows"] and f"{world} ranks" in errs["rows"], errs["rows"]
        assert "a plan configures the fast backend, but this decode runs backend='reference'" in errs["plan"]
        want = "steps=9: expected an integer from 1 to 4" if r else "rank 1 of the group refused its inputs (steps=9"
        assert want in errs["local"], errs["local"]
        assert "output: rank 0 has 'rank0', rank 1 has 'all'" in errs["output"], errs["output"]


def test_split_rows_is_contiguous_and_even():
    for rows in range(1, 40):
        for world in range(1, rows + 1):
            bands = split_rows(rows, world)
            counts = [n for _, n in bands]
            assert sum(counts) == rows and max(counts) - min(counts) <= 1 and min(counts) >= 1
            assert all(bands[i][0] + bands[i][1] == bands[i + 1][0] for i in range(world - 1))
    with pytest.raises(ValueError, match="3 patch rows, fewer than the 4 ranks"):
        split_rows(3, 4)


def test_load_parallel_needs_a_group():
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(ValueError, match="initialised torch.distributed process group"):
        _decoder(tiny("flux-2k"), parallel="sequence")
    with pytest.raises(ValueError, match="parallel='pipeline': expected one of"):
        _decoder(tiny("flux-2k"), parallel="pipeline")
    with pytest.raises(ValueError, match="parallel='sequence' was probably meant"):
        _decoder(tiny("flux-2k"), group=object())
    with pytest.raises(ValueError, match="sp_attention='ring': expected one of"):
        _decoder(tiny("flux-2k"), parallel="sequence", sp_attention="ring")
    with pytest.raises(ValueError, match="sp_attention='ulysses': needs parallel='sequence'"):
        _decoder(tiny("flux-2k"), sp_attention="ulysses")


def test_cli_torchrun_sequence_parallel_writes_the_one_process_png(tmp_path, capsys):
    """`torchrun --nproc-per-node 2 -m pidkern decode ... --sequence-parallel` against the
    single-process command on the same tiny checkpoint: the same PNG (with the head
    all-to-all, --sp-attention ulysses; the default all-gather is checked through the API)."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from pidkern.api import random_net
    from pidkern.checkpoint import convert
    from pidkern.cli import main

    cfg = tiny("flux-2kto4k-v1.5")
    torch.save(random_net(cfg, torch.device("cpu"), torch.float32, seed=4).state_dict(), tmp_path / "net.pt")
    ckpt, _ = convert(tmp_path / "net.pt", tmp_path / "tiny.safetensors", preset=cfg)
    torch.save(torch.randn(cfg.latent_channels, 3, 2, generator=torch.Generator().manual_seed(1)), tmp_path / "lat.pt")
    common = [str(tmp_path / "lat.pt"), "--checkpoint", str(ckpt), "--steps", "3", "--seed", "7", "--sigma", "0.3",
              "--device", "cpu"]
    with one_thread():
        assert main(["decode", *common, "-o", str(tmp_path / "one.png")]) == 0
    capsys.readouterr()
    env = dict(os.environ, OMP_NUM_THREADS="1", **LOOPBACK)
    # --standalone: torchrun's own rendezvous on localhost, on a port it binds itself
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "pidkern", "decode", *common, "-o", str(tmp_path / "two.png"),
           "--sequence-parallel", "--sp-attention", "ulysses"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(tmp_path / "two.png")]   # rank 0 alone writes and prints
    one = np.asarray(Image.open(tmp_path / "one.png"), dtype=np.int16)
    two = np.asarray(Image.open(tmp_path / "two.png"), dtype=np.int16)
    assert one.shape == two.shape == (96, 64, 3)
    assert np.abs(one - two).max() <= 1

    # outside torchrun the flag says how to launch
    assert main(["decode", *common, "-o", str(tmp_path / "x.png"), "--sequence-parallel"]) == 2
    assert "run under torchrun" in capsys.readouterr().err
    assert main(["decode", *common, "-o", str(tmp_path / "x.png"), "--sp-attention", "ulysses"]) == 2
    assert "--sp-attention ulysses: needs --sequence-parallel" in capsys.readouterr().err


def test_rank_flops_split_the_image_work_and_replicate_the_text():
    """Summed over the bands, a rank's FLOPs (pidkern.flops query_rows=) give one process's,
    plus the text queries every rank computes again: 4 (Ly)(L+Ly)D per patch block."""
    from pidkern.config import get_preset
    from pidkern.flops import _step_parts
    cfg, side, ly, world = get_preset("flux-2k"), 1024, 300, 3
    hs = side // cfg.patch
    L = hs * hs
    whole = _step_parts(cfg, side, side, ly)
    bands = [_step_parts(cfg, side, side, ly, n) for _, n in split_rows(hs, world)]
    assert _step_parts(cfg, side, side, ly, hs) == whole
    text_attn = cfg.patch_blocks * 4 * ly * (L + ly) * cfg.hidden
    assert sum(b["patch_attention"] for b in bands) == whole["patch_attention"] + (world - 1) * text_attn
    for part in ("pixel_attention", "pixel_gemm", "adapter_gates"):
        assert sum(b[part] for b in bands) == whole[part], part


def test_cost_model_table():
    from bench import parallel_cost as pc
    from pidkern.config import get_preset
    cfg = get_preset("flux-2k")
    assert pc.measured_ms()[2048] == pytest.approx(428.0, abs=0.1)   # the H200 run in bench/results
    # every rank receives the K and V of the other bands at all 16 attention layers, in bf16
    L = (4096 // 16) ** 2
    per_token = 2 * (14 * 1536 + 2 * 1152) * 2
    assert pc.kv_gather_bytes(cfg, 4096, 4) == 3 * (L // 4) * per_token
    rows = pc.table()
    assert [(r["side"], r["world"]) for r in rows] == [(s, n) for s in (2048, 4096, 8192) for n in (1, 2, 4, 8)]
    # Ulysses: rank r of N with n of the L image tokens receives, per attention layer, q, k, v of
    # its ceil(H/N) heads for the L - n tokens it lacks and the other N - 1 head groups' output
    # for its n tokens and the T = 300 text tokens (patch layers; pixel layers have no text)
    n = L // 4
    patch = 14 * (24 // 4) * 64 * (3 * (L - n) + 3 * (300 + n))
    pixel = 2 * (16 // 4) * 72 * (3 * (L - n) + 3 * n)
    assert pc.ulysses_bytes(cfg, 4096, 4) == pc.ulysses_bytes(cfg, 4096, 4, rank=2) == (patch + pixel) * 2
    assert pc.ulysses_bytes(cfg, 4096, 1) == 0
    for r in rows:
        if r["world"] == 1:
            assert r["kv_bytes"] == r["ulysses_bytes"] == 0 and r["NVLink"]["speedup"] == pytest.approx(1.0)
        else:   # compute shrinks at most N-fold, and a slower link never helps
            assert r["compute_ms"] >= r["one_gpu_step_ms"] / r["world"]
            for scheme in ("", " Ulysses"):
                assert r["PCIe" + scheme]["step_ms"] > r["NVLink" + scheme]["step_ms"] > r["compute_ms"]
        if r["world"] >= 4:   # from 4 ranks on the all-to-all moves at most half the all-gather's bytes
            assert r["ulysses_bytes"] <= r["kv_bytes"] / 2 + 1e7
            assert r["PCIe Ulysses"]["step_ms"] < r["PCIe"]["step_ms"]
    text = pc.render(rows)
    assert text.count("\n") == 13 and "8192² (extrapolated)" in text


def test_band_tables_are_rows_of_the_whole_image_tables():
    from pidkern.reference import pixel_sincos, rope_angles_2d
    hs, ws = 7, 5
    whole = rope_angles_2d(hs, ws, 16, 64)
    for first, count in split_rows(hs, 3):
        assert torch.equal(rope_angles_2d(hs, ws, 16, 64, rows=(first, count)), whole[first * ws:(first + count) * ws])
    table = pixel_sincos(40, 24, 16)
    assert torch.equal(pixel_sincos(16, 24, 16, first_row=8), table[8:24])


def test_estimate_memory_per_rank():
    from pidkern.memory import estimate_memory, weight_bytes
    w = weight_bytes("flux-2k")
    assert estimate_memory("flux-2k", 1, 2048, 2048, world_size=1) == estimate_memory("flux-2k", 1, 2048, 2048)
    one = estimate_memory("flux-2k", 1, 8192, 8192) - w
    per_rank = [estimate_memory("flux-2k", 1, 8192, 8192, world_size=n) - w for n in (2, 4, 8)]
    assert one > per_rank[0] > per_rank[1] > per_rank[2]
    # what every rank holds whole (a full-size float32 image, the gathered K and V of one
    # patch attention in bf16) bounds how far a rank's share can fall
    floor = 3 * 8192 * 8192 * 4 + 2 * (8192 // 16) ** 2 * 1536 * 2
    assert all(r > floor for r in per_rank)
    with pytest.raises(ValueError, match="the image has 2 patch rows, fewer than the 4 ranks"):
        estimate_memory("flux-2k", 1, 32, 64, world_size=4)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=f"world_size={bad!r}: expected a positive int"):
            estimate_memory("flux-2k", 1, 64, 64, world_size=bad)


def test_band_plan_graphs_follow_the_collectives():
    """A CUDA graph captures NCCL collectives only: the plan of a band decode says so."""
    from pidkern.plan import resolve
    cfg = tiny("flux-2k")
    cuda = torch.device("cuda")   # resolve reads the device type only: no GPU needed

    def graphs(device, **kw):
        plan = resolve(cfg, 1, 64, 64, 7, device, 2, True, **kw)
        return plan.choices["graphs"]
    assert graphs(cuda) == (True, "rule: CUDA")                                  # one process
    assert graphs(cuda, collectives="nccl") == (True, "rule: CUDA, NCCL collectives captured")
    assert graphs(cuda, collectives="gloo") == (False, "rule: gloo collectives cannot be captured")
    assert graphs("cpu", collectives="gloo") == (False, "rule: not CUDA")
    assert graphs(cuda, collectives="gloo", overrides={"graphs": False}) == (False, "override")
    with pytest.raises(ValueError, match="graphs=on: a CUDA graph can capture NCCL collectives only, and this "
                                         "decode's process group uses gloo"):
        graphs(cuda, collectives="gloo", overrides={"graphs": True})
    with pytest.raises(ValueError, match="graphs=on: CUDA graphs need a CUDA device"):
        graphs("cpu", collectives="gloo", overrides={"graphs": True})


def test_parallel_check_refuses_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: bench.parallel_check would run")
    from bench import parallel_check
    with pytest.raises(RuntimeError, match="no CUDA device"):
        parallel_check.check()
    assert parallel_check.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def _nccl_worker(rank: int, world: int, out_dir: str):
    """One rank of an NCCL group on its own GPU: the captured band decode (graphs on, by the
    plan's rule) under both sp_attention schemes, and a replay with new inputs."""
    import torch.distributed as dist
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    out = {}
    try:
        cfg, latent, sigma, text = case_inputs("nccl", "flux2-2kto4k-v1.5", 1, 1, 1, True, **ODD_HEADS)
        dev = torch.device("cuda", rank)
        for scheme in ("gather", "ulysses"):
            dec = _decoder(cfg, parallel="sequence", sp_attention=scheme, device=dev)
            for seed in (0, 1):   # the capture, then a replay with another seed
                img = dec.decode(latent.to(dev), sigma.to(dev), text=text.to(dev), seed=seed, steps=2,
                                 backend="fast")
                out[scheme, seed] = None if img is None else img.cpu()
            out[scheme, "plan"] = str(dec.last_plan)
            out[scheme, "graphs"] = dec.last_plan.choices["graphs"]
    except Exception:
        out["crash"] = traceback.format_exc()
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.cuda
def test_nccl_captured_band_decode_matches_one_process(tmp_path):
    """On CUDA under NCCL (1 rank per GPU, up to 2): the plan captures the band decode with its
    collectives, and its image equals one process's fast decode in float32."""
    import torch.distributed as dist
    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    world = min(2, torch.cuda.device_count())
    got = _spawn(world, tmp_path, _nccl_worker)[0]
    assert "crash" not in got, got["crash"]
    cfg, latent, sigma, text = case_inputs("nccl", "flux2-2kto4k-v1.5", 1, 1, 1, True, **ODD_HEADS)
    dev = torch.device("cuda", 0)
    one = _decoder(cfg, device=dev)
    for scheme in ("gather", "ulysses"):
        assert got[scheme, "graphs"] == (True, "rule: CUDA, NCCL collectives captured"), got[scheme, "plan"]
        for seed in (0, 1):
            want = one.decode(latent.to(dev), sigma.to(dev), text=text.to(dev), seed=seed, steps=2,
                              backend="fast", plan={"graphs": False}).cpu()
            err = rel_l2(got[scheme, seed], want)
            assert err <= 1e-5, f"{scheme}, seed {seed}, {world} NCCL ranks: relative L2 {err:.2e}"


def test_sequence_parallel_keeps_every_load_option(tmp_path):
    """sequence_parallel(decoder) decodes as the decoder it wraps: an fp8 decoder stays fp8
    (its fast model quantized, its images the one-process fp8 images), and the dtype,
    autocast, source and text encoder carry over. One rank of a gloo group, in-process."""
    import torch.distributed as dist
    from pidkern.layers import Fp8Linear
    from pidkern.parallel import sequence_parallel
    cfg = tiny("flux-2k")
    dec = _decoder(cfg, precision="fp8")
    dec.text_encoder = None
    g = torch.Generator().manual_seed(5)
    latent, text = torch.randn(1, cfg.latent_channels, 1, 2, generator=g), torch.randn(1, 6, cfg.text_dim, generator=g)
    with one_thread():
        one = dec.decode(latent, 0.2, text, steps=1, seed=3, backend="fast", plan={"attention": "prep+sdpa"})
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        sp = sequence_parallel(dec, dist.group.WORLD)
        assert (sp.precision, sp.dtype, sp.autocast, sp.source, sp.text_encoder) == \
            (dec.precision, dec.dtype, dec.autocast, dec.source, dec.text_encoder)
        assert sp.engine().model.precision == "fp8"
        assert any(isinstance(lin, Fp8Linear) for lin in sp.engine().model.layers())
        with one_thread():
            out = sp.decode(latent, 0.2, text=text, steps=1, seed=3, backend="fast", plan={"attention": "prep+sdpa"})
        assert sp.last_plan["precision"] == "fp8" and sp.last_plan["gemm"] == "scaled_mm"
        assert rel_l2(out, one) < 1e-5, rel_l2(out, one)
        # and the fp8 images are not the native ones (the option really took effect)
        native = _decoder(cfg)
        native.net.load_state_dict(dec.net.state_dict())
        with one_thread():
            ref = native.decode(latent, 0.2, text, steps=1, seed=3, backend="fast", plan={"attention": "prep+sdpa"})
        assert rel_l2(out, ref) > 1e-4
    finally:
        dist.destroy_process_group()
