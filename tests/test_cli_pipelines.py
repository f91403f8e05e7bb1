"""`pidkern upscale` and `pidkern decode --backbone/--prompt` on tiny components saved to
disk (a tiny PiD checkpoint, diffusers VAEs and a Gemma-2 directory written with
save_pretrained): the commands give the Python API's images (upscale as a real
`python -m pidkern` subprocess; the rest through `main`, to keep the file's time down: a
fresh interpreter pays ~8 s of diffusers and transformers imports); bad paths, unreadable
images and a VAE of another backbone exit 2 with one line."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

import pidkern  # noqa: E402
from pidkern import pipelines  # noqa: E402
from pidkern.api import random_net  # noqa: E402
from pidkern.checkpoint import save_safetensors  # noqa: E402
from pidkern.cli import main  # noqa: E402
from pidkern.config import tiny  # noqa: E402
from tiny_diffusers import tiny_kl_vae  # noqa: E402
from tiny_gemma import TEXT_DIM, save_tiny_gemma  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CFG = tiny("flux-2k", text_dim=TEXT_DIM, max_text=300)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    net = random_net(CFG, torch.device("cpu"), torch.float32, seed=4)
    save_safetensors(net.state_dict(), CFG, d / "pid.safetensors")
    tiny_kl_vae().save_pretrained(d / "vae")
    tiny_kl_vae(latent_channels=4, scaling_factor=0.13025, shift_factor=None).save_pretrained(d / "vae_sdxl")
    save_tiny_gemma(d / "gemma")
    g = torch.Generator().manual_seed(0)
    for name, (h, w) in (("a.png", (13, 21)), ("b.png", (8, 16))):
        px = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(px).save(d / name)
    (d / "broken.png").write_bytes(b"\x89PNG but not really")
    from safetensors.torch import save_file
    save_file({"latent": torch.randn(1, 2, 64, generator=g)}, str(d / "packed.safetensors"))   # 16x32 FLUX image
    save_file({"latent": torch.randn(16, 2, 4, generator=g)}, str(d / "raw.safetensors"))      # vae.encode's
    return d


def run(args, capsys):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def subprocess_run(args):
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pidkern", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def pixels(path):
    return torch.from_numpy(np.array(Image.open(path)))


@pytest.fixture(scope="module")
def api_decoder(files):
    return pidkern.load(files / "pid.safetensors", device="cpu", text_encoder=files / "gemma")


def test_upscale_command_gives_the_api_images(files, api_decoder):
    out = files / "up.png"
    r = subprocess_run(["upscale", files / "a.png", files / "b.png", "-o", out,
                        "--checkpoint", files / "pid.safetensors", "--vae", files / "vae",
                        "--text-encoder", files / "gemma", "--prompt", "a red cat", "--seed", 2, "--steps", 1,
                        "--quiet"])
    assert r.returncode == 0, r.stderr
    written = [Path(p) for p in r.stdout.split()]
    assert written == [files / "up-0.png", files / "up-1.png"]
    assert "%|" not in r.stderr and "upscaled" not in r.stderr       # --quiet: no bar, no timings
    vae = tiny_kl_vae()
    for i, (src, path) in enumerate(zip(("a.png", "b.png"), written)):
        want = pipelines.upscale(files / src, api_decoder, vae, prompt="a red cat", seed=2 + i,
                                 decode_kwargs={"steps": 1})[0]
        assert want.size == (Image.open(files / src).size[0] * 4, Image.open(files / src).size[1] * 4)
        assert torch.equal(pixels(path), torch.from_numpy(np.array(want)))


def test_decode_command_takes_a_packed_pipeline_latent(files, api_decoder, capsys):
    out = files / "dec.png"
    rc, _, err = run(["decode", files / "packed.safetensors", "--backbone", "flux", "--gen-size", "16x32",
                      "--prompt", "a red cat", "--text-encoder", files / "gemma", "-o", out,
                      "--checkpoint", files / "pid.safetensors", "--steps", 1, "--seed", 1], capsys)
    assert rc == 0, err
    assert "decode: 100%" in err             # the tqdm bar over the steps
    from safetensors.torch import load_file
    tokens = load_file(str(files / "packed.safetensors"))["latent"]
    # FLUX packs 2x2 latent cells per token, channel-major: [B, (h/2)(w/2), 4C] -> [B, C, h, w].
    latent = tokens.view(1, 1, 2, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 16, 2, 4)
    want = api_decoder.decode(latent, 0.0, prompt="a red cat", steps=1, seed=1)
    assert torch.equal(pixels(out), pidkern.to_uint8(want)[0])


def test_decode_command_takes_a_raw_vae_latent(files, capsys):
    out = files / "raw.png"
    rc, _, err = run(["decode", files / "raw.safetensors", "--backbone", "flux", "--vae", files / "vae", "-o", out,
                      "--checkpoint", files / "pid.safetensors", "--steps", 1, "--quiet"], capsys)
    assert rc == 0, err
    from safetensors.torch import load_file
    z = load_file(str(files / "raw.safetensors"))["latent"][None]
    want = pidkern.load(files / "pid.safetensors").decode((z - 0.1159) * 0.3611, 0.0, steps=1, seed=0)   # FLUX.1's
    assert torch.equal(pixels(out), pidkern.to_uint8(want)[0])


def test_upscale_jpeg_and_progress(files, capsys):
    rc, out, err = run(["upscale", files / "b.png", "-o", files / "b4.jpg", "--quality", 80, "--steps", 1,
                        "--checkpoint", files / "pid.safetensors", "--vae", files / "vae"], capsys)
    assert rc == 0, err
    pic = Image.open(files / "b4.jpg")
    assert pic.format == "JPEG" and pic.size == (64, 32)
    assert "upscale: " in err and "upscaled 1 image" in err
    assert "zero caption embeddings" in err        # no --text-encoder: said, not silent


@pytest.mark.parametrize("case, args, message", [
    ("missing image", ["upscale", "{d}/nope.png"], "image '{d}/nope.png' does not exist"),
    ("unreadable image", ["upscale", "{d}/broken.png"], "image '{d}/broken.png': cannot read it as an image"),
    ("missing VAE", ["upscale", "{d}/a.png", "--vae", "{d}/novae"], "--vae '{d}/novae' does not exist"),
    ("VAE of another backbone", ["upscale", "{d}/a.png", "--vae", "{d}/vae_sdxl"],
     "vae: a AutoencoderKL (sdxl latents) does not match the decoder tiny-flux-2k"),
    # .gif is refused with its reason (256 colours) rather than as an unknown extension
    ("bad extension", ["upscale", "{d}/a.png", "-o", "{d}/x.xyz"], "-o '{d}/x.xyz': unknown image extension '.xyz'"),
    ("gif output", ["upscale", "{d}/a.png", "-o", "{d}/x.gif"], "-o '{d}/x.gif': GIF holds at most 256 colours"),
    ("packed without size", ["decode", "{d}/packed.safetensors", "--backbone", "flux"], "--gen-size: LATENT"),
    ("VAE of another backbone for a raw latent", ["decode", "{d}/raw.safetensors", "--backbone", "sd3", "--vae",
                                                  "{d}/vae"], "makes flux, zimage, zimage-turbo latents, not 'sd3'"),
    ("unknown backbone", ["decode", "{d}/raw.safetensors", "--backbone", "flux3"], "--backbone: backbone='flux3'"),
    ("prompt without encoder", ["decode", "{d}/packed.safetensors", "--backbone", "flux", "--gen-size", "16x32",
                                "--prompt", "a cat"], "--prompt: needs --text-encoder"),
])
def test_bad_input_exits_2_with_one_line(files, capsys, case, args, message):
    args = [a.format(d=files) for a in args]
    defaults = {"-o": files / "bad.png", "--vae": files / "vae"} if args[0] == "upscale" else {"-o": files / "bad.png"}
    for flag, value in defaults.items():
        if flag not in args:
            args += [flag, value]
    rc, out, err = run(args + ["--checkpoint", files / "pid.safetensors", "--quiet"], capsys)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("pidkern: error: "), err
    assert message.format(d=files) in err
