"""Windowed decoding (pidkern.window): the plumbing proven exact, then the PiD decode.

The exactness reference is a stand-in network whose velocity at a pixel depends only on
the pixels within `RADIUS` of it (three small convolutions) and on the latent cell under
it. Run through the same sampler, window and blend code, windowed decoding must equal
the whole-canvas decode to float rounding whenever no window's weight reaches within
RADIUS of a cut it makes (the outer quarter of every overlap has no weight, so overlap
>= 4 * RADIUS), and must differ when it does.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import pidkern
from pidkern._ext import philox_draws
from pidkern.api import Decoder
from pidkern.config import get_preset, tiny
from pidkern.sampler import release_draws, sample
from pidkern.window import (WindowGrid, cell, default_overlap, default_window, make_grid, rank_windows,
                            resolve_grid, windowed_velocity)

RADIUS = 4


class StandIn(torch.nn.Module):
    """A local velocity model: 5x5, 3x3 and 1x1 convolutions over the image and the latent
    (nearest-upsampled to pixels after a 1x1 projection), plus t and sigma terms."""

    def __init__(self, latent_channels: int, upscale: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.up = upscale
        self.proj = torch.randn(4, latent_channels, generator=g) / latent_channels ** 0.5
        self.w1 = torch.randn(8, 3 + 4, 5, 5, generator=g) / 10
        self.w2 = torch.randn(8, 8, 3, 3, generator=g) / 8
        self.w3 = torch.randn(3, 8, 3, 3, generator=g) / 8

    def forward(self, x, t, latent, sigma):
        lat = F.interpolate(torch.einsum("oc,bchw->bohw", self.proj, latent), scale_factor=self.up, mode="nearest")
        u = torch.tanh(F.conv2d(torch.cat([x, lat], 1), self.w1, padding=2))
        u = torch.tanh(F.conv2d(u, self.w2, padding=1) + t)
        return F.conv2d(u, self.w3, padding=1) + x * sigma[:, None, None, None]


def standin_decode(model, grid, latent, sigma, *, steps, sampler, noise, seed, batch_windows=1):
    b = latent.shape[0]

    def evaluate(crops, t, ids):
        lat = torch.cat([grid.crop_latent(latent, k) for k in ids])
        return model(crops, t, lat, sigma.repeat(len(ids)))
    draws = (philox_draws if noise == "philox" else release_draws)(seed, torch.device("cpu"))
    vel = windowed_velocity(grid, evaluate, batch_windows)
    return sample(vel, (b, 3, *grid.canvas), steps=steps, sampler=sampler, draw=draws, device=torch.device("cpu"))


@pytest.mark.parametrize("sampler,noise", [("sde", "release"), ("ode", "release"), ("sde", "philox")])
def test_windows_equal_the_whole_canvas_for_a_local_network(sampler, noise):
    cfg = tiny("flux-2k")
    model = StandIn(cfg.latent_channels, cfg.upscale)
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(2, cfg.latent_channels, 7, 9, generator=g)      # 224 x 288: odd cell counts
    sigma = torch.tensor([0.1, 0.4])
    canvas = (224, 288)
    whole = make_grid(cfg, canvas, 256, 0)
    assert len(whole) == 2            # 224 rows whole, 288 columns in two windows: not the whole canvas yet
    one = WindowGrid(canvas, canvas, 0, (0,), (0,), cfg.upscale)    # the whole canvas as one window
    ref = standin_decode(model, one, latent, sigma, steps=4, sampler=sampler, noise=noise, seed=3)
    grid = make_grid(cfg, canvas, 128, 4 * RADIUS)
    assert len(grid) > 4 and len(set(grid.rows)) == len(grid.rows)
    got = standin_decode(model, grid, latent, sigma, steps=4, sampler=sampler, noise=noise, seed=3,
                         batch_windows=3)
    assert got.shape == ref.shape == (2, 3, 224, 288)
    assert (got - ref).abs().max() <= 1e-5
    # a window's weight reaching into its own cut's receptive field: no longer exact
    near = make_grid(cfg, canvas, 128, 4 * RADIUS - 12)
    bad = standin_decode(model, near, latent, sigma, steps=4, sampler=sampler, noise=noise, seed=3)
    assert (bad - ref).abs().max() > 1e-3


def test_blend_weights_sum_to_one_and_vanish_near_cuts():
    cfg = tiny("flux-2k")
    for canvas, size, overlap in [((224, 288), 128, 64), ((160, 480), (128, 160), 32), ((96, 416), 128, 96)]:
        grid = make_grid(cfg, canvas, size, overlap)
        total = torch.zeros(canvas, dtype=torch.float64)
        for k, (y, x) in enumerate(grid.boxes()):
            wk = grid.weight(k, dtype=torch.float64)
            assert (wk >= 0).all()
            total[y:y + grid.size[0], x:x + grid.size[1]] += wk
            m = overlap // 4
            if x > 0:            # an inner cut on the left: no weight within the outer quarter of the overlap
                assert (wk[:, :m] == 0).all()
            if x + grid.size[1] < canvas[1]:
                assert (wk[:, grid.size[1] - m:] == 0).all()
        assert torch.allclose(total, torch.ones_like(total), rtol=0, atol=1e-12)
        # every window inside the canvas, aligned, and neighbours overlapping by >= overlap
        for starts, side, n in ((grid.rows, grid.size[0], canvas[0]), (grid.cols, grid.size[1], canvas[1])):
            assert starts[0] == 0 and starts[-1] + side == n
            assert all(s % cell(cfg) == 0 for s in starts)
            assert all(b - a <= side - overlap for a, b in zip(starts, starts[1:]))


def test_grid_defaults_per_family_and_rank_split():
    assert (default_window(get_preset("flux-2k")), default_overlap(get_preset("flux-2k"))) == (2048, 512)
    assert (default_window(get_preset("flux-2kto4k-v1.5")), default_overlap(get_preset("flux-2kto4k-v1.5"))) == \
        (4096, 1024)
    assert default_window(tiny("siglip-2k")) == 256 and cell(tiny("siglip-2k")) == 128
    g = make_grid(get_preset("flux-2k"), (8192, 8192), "auto")
    assert g.size == (2048, 2048) and len(g) == 25 and g.rows == (0, 1536, 3072, 4608, 6144)
    for n, world in ((25, 2), (7, 3), (2, 3)):
        parts = [rank_windows(n, r, world) for r in range(world)]
        assert sum(parts, []) == list(range(n))


def test_bad_windows_name_the_argument_and_the_allowed_values():
    cfg = tiny("flux-2k")
    with pytest.raises(ValueError, match=r"window=512: outside the trained range .* from 128 to 256 px in steps "
                                         r"of 32"):
        make_grid(cfg, (512, 512), 512)
    with pytest.raises(ValueError, match=r"window=96: outside the trained range"):
        make_grid(cfg, (512, 512), 96)
    with pytest.raises(ValueError, match=r"window=\(128, 144\): sides must be positive multiples of 32"):
        make_grid(cfg, (512, 512), (128, 144))
    with pytest.raises(ValueError, match=r"overlap=128: expected 0 <= overlap < the window's smaller side "
                                         r"\(128 px\)"):
        make_grid(cfg, (512, 512), 128, 128)
    with pytest.raises(ValueError, match=r"overlap=-32"):
        make_grid(cfg, (512, 512), 128, -32)
    with pytest.raises(TypeError, match=r"overlap=1.5"):
        make_grid(cfg, (512, 512), 128, 1.5)
    with pytest.raises(ValueError, match=r"window='big'"):
        make_grid(cfg, (512, 512), "big")
    with pytest.raises(ValueError, match=r"overlap=64: needs window="):
        resolve_grid(cfg, (512, 512), None, 64)
    # the plain decode past the trained range: refused for trained weights, naming window='auto'
    with pytest.raises(ValueError, match=r"outside the trained range .* window='auto'"):
        resolve_grid(cfg, (512, 320), None)
    assert resolve_grid(cfg, (512, 320), None, trained=False) is None
    assert resolve_grid(cfg, (512, 320), "whole") is None
    assert resolve_grid(cfg, (256, 256), None) is None


@pytest.fixture(scope="module")
def tiny_decoder():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pidkern.load(preset=tiny("flux-2k"), device="cpu")


def test_a_window_covering_the_image_is_the_plain_decode(tiny_decoder):
    dec = tiny_decoder
    latent = torch.randn(2, 16, 5, 7, generator=torch.Generator().manual_seed(2))   # 160 x 224
    text = torch.randn(2, 5, dec.config.text_dim, generator=torch.Generator().manual_seed(3))
    for noise, sampler in (("release", "sde"), ("philox", "ode")):
        plain = dec.decode(latent, 0.3, text, steps=2, seed=4, noise=noise, sampler=sampler)
        for window in ((160, 224), 256, "auto"):
            got = dec.decode(latent, 0.3, text, steps=2, seed=4, noise=noise, sampler=sampler, window=window,
                             overlap=32)
            assert torch.equal(got, plain), window


def test_pid_windows_shape_determinism_and_progress(tiny_decoder):
    dec = tiny_decoder
    latent = torch.randn(1, 16, 5, 7, generator=torch.Generator().manual_seed(5))    # 160 x 224
    seen = []
    a = dec.decode(latent, 0.2, steps=2, seed=7, window=128, overlap=64, progress=lambda d, t: seen.append((d, t)))
    grid = dec.window_grid((160, 224), 128, 64)
    assert a.shape == (1, 3, 160, 224) and torch.isfinite(a).all() and a.abs().max() <= 1
    assert seen == [(k, 2 * len(grid)) for k in range(1, 2 * len(grid) + 1)]
    assert torch.equal(a, dec.decode(latent, 0.2, steps=2, seed=7, window=128, overlap=64))
    assert not torch.equal(a, dec.decode(latent, 0.2, steps=2, seed=8, window=128, overlap=64))
    plain = dec.decode(latent, 0.2, steps=2, seed=7)
    assert (a - plain).abs().max() > 1e-3        # a global-attention net: windows are not the whole


def test_trained_weights_refuse_the_plain_decode_past_the_range():
    cfg = tiny("flux-2k")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = pidkern.load(preset=cfg, device="cpu").net
    dec = Decoder(net, torch.device("cpu"), torch.float32, source="trained.safetensors")
    latent = torch.randn(1, 16, 9, 9)          # 288 x 288 px > 256^2 in area
    with pytest.raises(ValueError, match=r"decodes to 288x288, outside the trained range of tiny-flux-2k .* "
                                         r"window='auto'"):
        dec.decode(latent, steps=1)
    assert dec.decode(latent, steps=1, window="whole").shape == (1, 3, 288, 288)
    assert dec.decode(latent, steps=1, window="auto").shape == (1, 3, 288, 288)


def test_windowed_memory_model_meets_the_targets_and_bounds_the_card():
    from pidkern.memory import estimate_memory
    from pidkern.window import CANVAS_DEVICE_BYTES, canvas_state_bytes
    gib = 2**30
    one = estimate_memory("flux-2k", 1, 2048, 2048)
    e8 = estimate_memory("flux-2k", 1, 8192, 8192, window=2048)
    e16 = estimate_memory("flux-2k", 1, 16384, 16384, window=2048)
    assert e8 <= 8 * gib and e16 <= 16 * gib
    # 8192²: one window's decode + the canvas state (3 float32 images) + 25 windows' tokens (+ one band)
    tokens = 25 * 128 * 128 * 512 * 2
    assert canvas_state_bytes(1, (8192, 8192)) <= CANVAS_DEVICE_BYTES
    assert one + canvas_state_bytes(1, (8192, 8192)) + tokens < e8 < one + canvas_state_bytes(1, (8192, 8192)) \
        + tokens + 128 * 2**20
    # 16384²: the canvas is on the host; the card holds one window batch and its crops in flight
    assert one < e16 < one + 128 * 2**20
    assert estimate_memory("flux-2k", 1, 16384, 16384, window=2048, canvas="device") > 16384 ** 2 * 36
    # a window covering the image is the plain decode's memory
    assert estimate_memory("flux-2k", 1, 2048, 2048, window=2048) == one
    assert estimate_memory("flux-2k", 2, 8192, 8192, window=2048, batch_windows=2) > e8


def test_plan_shows_the_grid_batch_and_canvas(tiny_decoder):
    dec = tiny_decoder
    wp = dec.plan((1, 16, 7, 9), window=128, overlap=64)
    assert (len(wp.grid), wp.grid.size, wp.batch_windows, wp.canvas) == (12, (128, 128), 1, "device")
    assert wp.window_plan is not None and str(wp).startswith("windowed decode: 3x4 windows of 128x128 over 224x288")
    assert "each batch of windows:" in str(wp)
    assert not hasattr(dec.plan((1, 16, 4, 4), window=128 + 128), "grid")     # covers the image: the plain plan


def test_upscale_16x_is_4x_then_4x_windowed_with_the_tiled_encode():
    pytest.importorskip("diffusers")
    from pidkern import pipelines
    from tiny_diffusers import tiny_kl_vae
    vae = tiny_kl_vae()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dec = pidkern.load(preset=tiny("flux-2k"), device="cpu")
        img = torch.randint(0, 256, (3, 13, 21), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        passes = []
        got = pipelines.upscale(img, dec, vae, seed=5, output_type="pt", decode_kwargs=dict(steps=1), scale=16,
                                on_pass=lambda i, k, n, hw: passes.append((i, k, n, hw)))[0]
        assert got.shape == (3, 208, 336) and passes == [(0, 0, 2, (52, 84)), (0, 1, 2, (208, 336))]
        assert not vae.use_tiling                     # the VAE's own setting is left as it was
        # the reference: the 4x upscale, its result encoded in tiles, decoded in windows ('auto':
        # 208 x 336 is past tiny flux-2k's 256² trained area)
        first = pipelines.upscale(img, dec, vae, seed=5, output_type="pt", decode_kwargs=dict(steps=1))[0]
        x = pipelines.pad_image(first[None], pipelines.pad_multiple(dec))
        vae.enable_tiling()
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()
        vae.disable_tiling()
        latent = (z - vae.config.shift_factor) * vae.config.scaling_factor
        want = dec.decode(latent, 0.0, steps=1, seed=5, window="auto")[0, :, :208, :336]
        assert torch.equal(got, want)
        with torch.no_grad():
            untiled = vae.encode(x).latent_dist.mode()
        assert not torch.equal(untiled, z)            # the tiled encode is what ran
    for bad in (8, 2, 1, 16.0, True, 0):
        with pytest.raises(ValueError, match=rf"scale={bad!r}: expected a power of 4 \(4, 16, 64, ...\)"):
            pipelines.upscale(img, dec, vae, scale=bad)


def test_cli_upscale_scale_16_and_decode_window(tmp_path, capsys):
    pytest.importorskip("diffusers")
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    from pidkern.api import random_net
    from pidkern.checkpoint import save_safetensors
    from pidkern.cli import main
    from tiny_diffusers import tiny_kl_vae
    cfg = tiny("flux-2k")
    save_safetensors(random_net(cfg, torch.device("cpu"), torch.float32, seed=4).state_dict(), cfg,
                     tmp_path / "pid.safetensors")
    tiny_kl_vae().save_pretrained(tmp_path / "vae")
    px = torch.randint(0, 256, (13, 21, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    Image.fromarray(px.numpy()).save(tmp_path / "a.png")
    common = ["--checkpoint", tmp_path / "pid.safetensors", "--steps", "1", "--device", "cpu"]

    def run(args):
        rc = main([str(a) for a in args])
        return (rc, *capsys.readouterr())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc, out, err = run(["upscale", tmp_path / "a.png", "-o", tmp_path / "big.png", "--vae", tmp_path / "vae",
                            "--scale", "16", *common])
        assert rc == 0, err
        assert Image.open(tmp_path / "big.png").size == (21 * 16, 13 * 16)
        assert "upscale pass 2/2" in err and "a.png -> 336x208" in err
        rc, out, err = run(["upscale", tmp_path / "a.png", "-o", tmp_path / "x.png", "--vae", tmp_path / "vae",
                            "--scale", "8", *common])
        assert rc == 2 and "--scale 8: expected a power of 4" in err
        # decode: --window / --overlap are Decoder.decode's; the plain decode past the range names window='auto'
        latent = torch.randn(1, 16, 9, 9, generator=torch.Generator().manual_seed(1))
        save_file({"latent": latent}, str(tmp_path / "lat.safetensors"))
        rc, out, err = run(["decode", tmp_path / "lat.safetensors", "-o", tmp_path / "d.png", *common])
        assert rc == 2 and "window='auto'" in err
        rc, out, err = run(["decode", tmp_path / "lat.safetensors", "-o", tmp_path / "d.png", "--window", "128",
                            "--overlap", "64", *common])
        assert rc == 0, err
        dec = pidkern.load(tmp_path / "pid.safetensors", device="cpu")
        want = pidkern.to_uint8(dec.decode(latent, steps=1, seed=0, window=128, overlap=64))[0]
        assert torch.equal(torch.from_numpy(np.array(Image.open(tmp_path / "d.png"))), want)
        rc, out, err = run(["decode", tmp_path / "lat.safetensors", "-o", tmp_path / "d.png", "--window", "100",
                            *common])
        assert rc == 2 and "window=100: sides must be positive multiples of 32" in err


# -- many processes: the windows spread over gloo ranks --------------------------------------

# world size -> (batch, decode kwargs): each case once, to keep process start-up few
WINDOW_CASES = {2: (2, dict(steps=2, seed=3)), 3: (1, dict(steps=2, seed=4, sampler="ode", noise="philox"))}


def _window_inputs(batch):
    g = torch.Generator().manual_seed(9)
    return torch.randn(batch, 16, 5, 7, generator=g), torch.tensor([0.1, 0.3])[:batch]   # 160 x 224: 2 x 3 windows


def _window_worker(rank: int, world: int, out_dir: str):
    import os

    import torch.distributed as dist
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    results = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dec = pidkern.load(preset=tiny("flux-2k"), device="cpu", parallel="sequence")
        batch, kw = WINDOW_CASES[world]
        latent, sigma = _window_inputs(batch)
        results["image"] = dec.decode(latent, sigma, window=128, overlap=64, output="all", **kw)
        results["rank0-only"] = dec.decode(latent[:1], 0.2, steps=1, seed=0, window=128, overlap=64)
        try:
            dec.decode(latent, sigma, steps=1, seed=0, window=128, overlap=64 if rank == 0 else 32)
            results["disagree"] = None
        except ValueError as e:
            results["disagree"] = str(e)
    except Exception:
        import traceback
        results["crash"] = traceback.format_exc()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_windows_over_gloo_ranks_match_one_process(world, tmp_path, tiny_decoder):
    import time

    import torch.multiprocessing as mp
    ctx = mp.start_processes(_window_worker, args=(world, str(tmp_path)), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} ranks did not finish in 180 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert all("crash" not in r for r in ranks), [r.get("crash") for r in ranks]
    batch, kw = WINDOW_CASES[world]
    latent, sigma = _window_inputs(batch)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = tiny_decoder.decode(latent, sigma, window=128, overlap=64, **kw)
    finally:
        torch.set_num_threads(before)
    assert len(tiny_decoder.window_grid((160, 224), 128, 64)) == 6
    for r in ranks:
        assert r["image"].shape == want.shape and (r["image"] - want).abs().max() <= 1e-5
    assert ranks[0]["rank0-only"].shape == (1, 3, 160, 224) and all(r["rank0-only"] is None for r in ranks[1:])
    assert all("window" in (r["disagree"] or "") and "disagree" in r["disagree"] for r in ranks)


def test_cost_model_windowed_rows():
    from bench.parallel_cost import render_windows, window_table
    rows = window_table()
    assert [(r["side"], r["world"], r["windows"], r["busiest"]) for r in rows[:4]] == \
        [(8192, 1, 25, 25), (8192, 2, 25, 13), (8192, 4, 25, 7), (8192, 8, 25, 4)]
    for r in rows:
        assert r["allreduce_bytes"] == 2 * (r["world"] - 1) / r["world"] * 3 * r["side"] ** 2 * 4
        assert r["NVLink"]["decode_ms"] <= r["PCIe"]["decode_ms"]
    assert rows[0]["NVLink"]["speedup"] == pytest.approx(1.0)
    assert [r["NVLink"]["speedup"] for r in rows[:4]] == sorted(r["NVLink"]["speedup"] for r in rows[:4])
    assert render_windows(rows).count("\n") == len(rows) + 1


def test_window_check_smoke_reports_the_overhead(capsys, tmp_path):
    import json

    from bench.window_check import main
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["--smoke", "--side", "224", "--steps", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tiny-flux-2k 224² in 2x2 windows of 128x128" in out and "overhead vs 4 x one" in out
    r = json.loads(next(tmp_path.glob("window_check_*.json")).read_text())["window"]
    assert r["windows"] == 4 and r["overhead"] == pytest.approx(r["windowed_ms"] / (4 * r["one_window_ms"]))
    assert r["windows_per_s"] == pytest.approx(4e3 / r["windowed_ms"])


def test_fast_path_windows_match_the_reference_windows():
    """FastPiD (Triton kernels under TRITON_INTERPRET=1) on each window, blended by the same
    code: the reference path's windowed image within the engine's parity bar (rel L2 1e-5).
    A trained range of 32..64 px keeps the interpreted windows small (one and two cells)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dec = pidkern.load(preset=tiny("flux-2k", trained_res=(32, 64)), device="cpu")
    latent = torch.randn(1, 16, 2, 3, generator=torch.Generator().manual_seed(0))     # 64 x 96: 2 windows
    text = torch.randn(1, 5, dec.config.text_dim, generator=torch.Generator().manual_seed(1))
    assert len(dec.window_grid((64, 96), 64, 32)) == 2
    ref = dec.decode(latent, 0.2, text, steps=1, seed=1, window=64, overlap=32, backend="reference")
    fast = dec.decode(latent, 0.2, text, steps=1, seed=1, window=64, overlap=32, backend="fast")
    assert ((fast - ref).norm() / ref.norm()).item() <= 1e-5


@pytest.mark.parametrize("sampler", ["sde", "ode"])
def test_the_banded_in_place_update_is_the_whole_update(sampler):
    """A large canvas updates in row bands (float64 temporaries of one band): the same bits."""
    w = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))

    def velocity(x, t):
        return torch.einsum("oc,bchw->bohw", w, x).tanh() * (1 + t)
    outs = [sample(velocity, (2, 3, 37, 11), steps=4, sampler=sampler, draw=release_draws(5, torch.device("cpu")),
                   device=torch.device("cpu"), band_rows=band) for band in (None, 7, 1)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.cuda
def test_captured_window_batches_match_the_eager_ones():
    """plan={"graphs": True}: one CUDA graph per (batch of windows, time), replayed over the
    canvas and again by the next decode; the eager fast path's image."""
    from pidkern import window
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dec = pidkern.load(preset=tiny("flux-2k"), device="cuda", dtype="float32")
    latent = torch.randn(1, 16, 7, 9, generator=torch.Generator().manual_seed(0)).cuda()
    eager = dec.decode(latent, 0.2, steps=4, seed=1, window=128, overlap=64, backend="fast", plan={"graphs": False})
    graph = dec.decode(latent, 0.2, steps=4, seed=1, window=128, overlap=64, backend="fast", plan={"graphs": True})
    assert ((graph - eager).norm() / eager.norm()).item() <= 1e-5
    runners = window._captured[dec.engine()]["runners"]
    assert len(runners) == 4                      # one per sampler time, every window replays it
    again = dec.decode(latent, 0.2, steps=4, seed=1, window=128, overlap=64, backend="fast", plan={"graphs": True})
    assert len(runners) == 4 and torch.equal(again, graph)
