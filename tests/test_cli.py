"""The `pidkern` command line: decode to PNGs end to end, convert, info, and bad input
exiting 2 with a message that names the argument."""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import pidkern
from pidkern.api import random_net
from pidkern.checkpoint import convert
from pidkern.cli import LATENT_KEYS, _batched, main, read_tensor
from pidkern.config import tiny

ROOT = Path(__file__).resolve().parents[1]
CFG = tiny("flux-2k")
LATENT_HW = (2, 3)  # a tiny flux-2k decodes 32x per side: 64x96


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A released-format tiny checkpoint (DCP, `net.` prefix, training keys), its converted
    .safetensors, and latents in every accepted format."""
    import torch.distributed.checkpoint as dcp
    d = tmp_path_factory.mktemp("cli")
    sd = random_net(CFG, torch.device("cpu"), torch.float32, seed=5).state_dict()
    state = {f"net.{k}": v for k, v in sd.items()}
    state.update({f"net_ema.{k}": torch.randn_like(v) for k, v in sd.items()})
    state["discriminator.head.weight"] = torch.randn(3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(d / "released"), no_dist=True)
    ckpt, _ = convert(d / "released", d / "tiny.safetensors", preset=CFG)
    g = torch.Generator().manual_seed(11)
    lat = torch.randn(CFG.latent_channels, *LATENT_HW, generator=g)
    torch.save(lat, d / "lat.pt")
    torch.save({"latent": lat[None], "other": torch.zeros(2)}, d / "lat_dict.pt")
    np.save(d / "lat.npy", lat.numpy())
    save_file({"latent": lat[None].contiguous(), "junk": torch.zeros(1)}, d / "lat.safetensors")
    torch.save(torch.randn(2, CFG.latent_channels, *LATENT_HW, generator=g), d / "lat2.pt")
    np.save(d / "text.npy", torch.randn(7, CFG.text_dim, generator=g).numpy())
    return {"dir": d, "ckpt": ckpt, "latent": lat, "sd": sd}


def run(args, capsys):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


_decoders = {}


def api_images(files, latent, **kwargs):
    """The same decode through the Python API, as uint8 [B, H, W, 3]."""
    if "dec" not in _decoders:
        _decoders["dec"] = pidkern.load(files["ckpt"], device="cpu", dtype="float32")
    return pidkern.to_uint8(_decoders["dec"].decode(latent, **kwargs))


def png_pixels(path):
    return torch.from_numpy(np.array(Image.open(path)))


@pytest.mark.parametrize("name", ["lat.pt", "lat_dict.pt", "lat.npy", "lat.safetensors"])
def test_latent_formats(files, name):
    got = _batched(read_tensor(files["dir"] / name, "LATENT", LATENT_KEYS), 4, "LATENT", name)
    assert torch.equal(got, files["latent"][None])


def test_decode_writes_the_api_image(files, capsys):
    out_png = files["dir"] / "out.png"
    rc, out, err = run(["decode", files["dir"] / "lat_dict.pt", "-o", out_png, "--checkpoint", files["ckpt"],
                        "--steps", 1, "--seed", 3, "--sigma", 0.25], capsys)
    assert rc == 0, err
    assert out.strip() == str(out_png)
    assert "decode: 100%" in err and "1/1" in err and "decoded 1 image of 96x64" in err   # the tqdm bar
    img = Image.open(out_png)
    assert img.size == (96, 64) and img.mode == "RGB"
    want = api_images(files, files["latent"][None], sigma=0.25, steps=1, seed=3)[0]
    assert torch.equal(png_pixels(out_png), want)


def test_decode_philox_noise(files, capsys):
    out_png = files["dir"] / "philox.png"
    rc, out, err = run(["decode", files["dir"] / "lat_dict.pt", "-o", out_png, "--checkpoint", files["ckpt"],
                        "--steps", 2, "--seed", 3, "--noise", "philox"], capsys)
    assert rc == 0, err
    want = api_images(files, files["latent"][None], steps=2, seed=3, noise="philox")[0]
    assert torch.equal(png_pixels(out_png), want)
    assert not torch.equal(want, api_images(files, files["latent"][None], steps=2, seed=3)[0])


def test_decode_batch_text_and_progress(files, capsys):
    out_png = files["dir"] / "batch.png"
    rc, out, err = run(["decode", files["dir"] / "lat2.pt", "-o", out_png, "--checkpoint", files["ckpt"],
                        "--steps", 2, "--text-embeds", files["dir"] / "text.npy", "--sampler", "ode"], capsys)
    assert rc == 0, err
    paths = [Path(p) for p in out.split()]
    assert paths == [files["dir"] / "batch-0.png", files["dir"] / "batch-1.png"]
    assert "1/2" in err and "2/2" in err
    lat = torch.load(files["dir"] / "lat2.pt")
    text = torch.from_numpy(np.load(files["dir"] / "text.npy"))[None].expand(2, -1, -1)
    want = api_images(files, lat, text=text, steps=2, seed=0, sampler="ode")
    for p, w in zip(paths, want):
        assert torch.equal(png_pixels(p), w)


def test_decode_from_the_released_dcp_directory(files, capsys):
    """A DCP directory of a tiny net has no preset to detect: a preset-shaped error, exit 2."""
    rc, out, err = run(["decode", files["dir"] / "lat.pt", "-o", files["dir"] / "x.png",
                        "--checkpoint", files["dir"] / "released", "--steps", 1], capsys)
    assert rc == 2
    assert err.startswith("pidkern: error: ") and "released" in err and "preset" in err
    assert "Traceback" not in err


def test_module_entry_point(files):
    out_png = files["dir"] / "sub.png"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "pidkern", "decode", str(files["dir"] / "lat.npy"), "-o",
                           str(out_png), "--checkpoint", str(files["ckpt"]), "--steps", "1", "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out_png)
    assert Image.open(out_png).size == (96, 64)


def test_convert_command(files, capsys):
    dst = files["dir"] / "again.safetensors"
    rc, out, err = run(["convert", files["ckpt"], dst, "--dtype", "bf16"], capsys)
    assert rc == 0, err
    assert out.strip() == str(dst) and "tiny-flux-2k" in err
    with safe_open(str(dst), framework="pt") as f:
        assert f.metadata()["pidkern_preset"] == CFG.name
        for k, v in files["sd"].items():
            assert torch.equal(f.get_tensor(k), v.to(torch.bfloat16)), k
    rc, out, err = run(["convert", files["dir"] / "released", files["dir"] / "r.safetensors"], capsys)
    assert rc == 2 and "pidkern: error:" in err and "preset" in err
    rc, out, err = run(["convert", files["ckpt"], files["dir"] / "out.pt"], capsys)
    assert rc == 2 and "out.pt" in err and ".safetensors" in err


def test_info(capsys):
    rc, out, err = run(["info"], capsys)
    assert rc == 0, err
    assert f"torch {torch.__version__}" in out and "pidkern._C extension" in out
    for name in pidkern.PRESETS:
        assert name in out
    for op in pidkern.ops.OPS:
        assert op in out


def test_bench_is_wired(capsys):
    pytest.importorskip("pidkern.benchmark")
    rc, out, err = run(["bench", "--help"], capsys)
    assert rc == 0 and "usage: pidkern bench" in out


@pytest.mark.parametrize("args, names", [
    (["decode", "{d}/nope.pt", "-o", "{d}/x.png", "--checkpoint", "{ckpt}"], "LATENT"),
    (["decode", "{d}/lat.pt", "-o", "{d}/x.png", "--checkpoint", "{d}/nope.safetensors"], "nope.safetensors"),
    (["decode", "{d}/lat.pt", "-o", "{d}/x.png"], "--checkpoint"),
    (["decode", "{d}/lat.pt", "-o", "{d}/x.png", "--checkpoint", "{ckpt}", "--sigma", "1.5"], "--sigma"),
    (["decode", "{d}/lat.pt", "-o", "{d}/x.png", "--checkpoint", "{ckpt}", "--steps", "5"], "--steps"),
    (["decode", "{d}/lat.pt", "-o", "{d}/x.png", "--checkpoint", "{ckpt}", "--preset", "flux-9k"], "--preset"),
    (["decode", "{d}/lat.pt", "-o", "{d}/x.png", "--checkpoint", "{ckpt}", "--dtype", "int8"], "--dtype"),
    (["decode", "{d}/lat.pt", "-o", "{d}/x.png", "--checkpoint", "{ckpt}", "--device", "tpu"], "device"),
    (["decode", "{d}/wrong.pt", "-o", "{d}/x.png", "--checkpoint", "{ckpt}"], "LATENT"),
    (["decode", "{d}/flat.pt", "-o", "{d}/x.png", "--checkpoint", "{ckpt}"], "LATENT"),
    (["decode", "{d}/lat.txt", "-o", "{d}/x.png", "--checkpoint", "{ckpt}"], "LATENT"),
    (["decode", "{d}/lat.pt", "-o", "{d}/x.png", "--checkpoint", "{ckpt}", "--text-embeds", "{d}/wrong.pt"],
     "--text-embeds"),
    (["decode", "{d}/lat.pt", "-o", "{d}/x.png", "--checkpoint", "{d}/junk.pt"], "junk.pt"),
    (["convert", "{d}/nope", "{d}/y.safetensors"], "nope"),
    (["frobnicate"], "frobnicate"),
])
def test_bad_input_exits_2_naming_it(files, capsys, args, names):
    d = files["dir"]
    torch.save(torch.randn(5, *LATENT_HW), d / "wrong.pt")      # 5 channels, tiny flux-2k takes 16
    torch.save(torch.randn(16, 6), d / "flat.pt")                # no spatial dims
    (d / "lat.txt").write_text("1 2 3")
    (d / "junk.pt").write_bytes(os.urandom(512))
    argv = [a.format(d=d, ckpt=files["ckpt"]) for a in args]
    rc, out, err = run(argv, capsys)
    assert rc == 2, err
    assert names in err
    assert "Traceback" not in err
    assert "error:" in err.strip().splitlines()[-1]  # the message is the last line, after any progress


def test_info_plan_prints_every_choice(capsys):
    from pidkern.plan import CHOICES, SETTINGS
    rc, out, err = run(["info", "--plan", "flux-2k", "1024x2048", "--device", "cpu"], capsys)
    assert rc == 0, err
    assert "1024x2048" in out
    for name in (*CHOICES, *SETTINGS):
        assert name in out
    # 128 MiB of float32 modulation rows per band: 128 * 2**20 / (6 * 256 * 16 * 4) patches
    assert "band_rows        1365" in out
    rc, out, err = run(["info", "--plan", "flux-2k", "1024x1000"], capsys)
    assert rc == 2 and "multiples of 16" in err
