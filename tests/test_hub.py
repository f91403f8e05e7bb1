"""Released weights by name through huggingface_hub: loads from a Hugging Face cache laid
out as the hub lays it out, with the hub's offline mode on (no network, ever), the
`hf download` hint when the cache is empty, revision pinning, hub ids for the caption
encoder and the VAE; and `pidkern.decode` without model= never builds random weights."""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import constants

import pidkern
from pidkern import api
from pidkern.checkpoint import detect_preset, expected_shapes
from pidkern.config import PRESETS, RELEASE_DIRS
from hf_stand_ins import REVISION, put_file, put_folder, put_release, stand_in_config

ROOT = Path(__file__).resolve().parents[1]
FLUX = RELEASE_DIRS["flux-2k"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hugging Face cache holding a stand-in for the FLUX.1 2k release (main) and a
    second version of it at another commit (no ref)."""
    d = tmp_path_factory.mktemp("hub")
    cache = d / "hub"
    main = put_release(cache, FLUX, d, seed=1)
    other = put_release(cache, FLUX, d, seed=2, revision="f" * 40, ref=None)
    return {"cache": cache, "dir": d, "main": main, "other": other}


@pytest.fixture
def offline(hub, monkeypatch):
    """huggingface_hub's own switches (what HF_HUB_CACHE and HF_HUB_OFFLINE set)."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


@pytest.fixture
def empty_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(api, "_last_loaded", None)


def same_weights(dec, state):
    got = dec.net.state_dict()
    assert got.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("name", [FLUX, "flux-2k"])
def test_load_by_name_from_the_offline_cache(offline, name):
    dec = pidkern.load(name, device="cpu", progress=False)
    same_weights(dec, offline["main"])
    assert dec.config == stand_in_config("flux-2k")


def test_revision_pins_a_commit(offline):
    dec = pidkern.load(FLUX, device="cpu", revision="f" * 40, progress=False)
    same_weights(dec, offline["other"])
    with pytest.raises(ValueError, match="revision"):
        pidkern.load(offline["dir"] / f"{FLUX}-1.pth", revision="f" * 40)


def test_empty_cache_offline_names_the_download_command(empty_offline):
    with pytest.raises(FileNotFoundError) as e:
        pidkern.load(FLUX, device="cpu")
    msg = str(e.value)
    assert f"hf download nvidia/PiD checkpoints/{FLUX}/model_ema_bf16.pth" in msg
    assert "path/to/model_ema_bf16.pth" in msg          # the local-file alternative


def test_no_checkpoint_is_no_longer_random(empty_offline):
    for kwargs in ({}, {"preset": "flux-2k"}, {"preset": PRESETS["sd3-2k"]}):
        with pytest.raises(ValueError, match="random=True"):
            pidkern.load(device="cpu", **kwargs)
    with pytest.raises(ValueError, match="one or the other"):
        pidkern.load(FLUX, random=True)


def test_release_name_picks_among_presets_of_one_network(tmp_path):
    """A cached file is a link to a blob named by its hash: the release name in the link's
    path still tells flux-2k, sd3-2k and sd3-2kto4k apart (they are one network)."""
    blob = tmp_path / "blobs" / "abc123"
    blob.parent.mkdir()
    blob.write_bytes(b"x")
    for preset in ("sd3-2k", "sd3-2kto4k", "flux-2k"):
        link = tmp_path / "snapshots" / REVISION / "checkpoints" / RELEASE_DIRS[preset] / "model_ema_bf16.pth"
        link.parent.mkdir(parents=True)
        os.symlink(blob, link)
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error")      # no "ambiguous preset" warning
            assert detect_preset(expected_shapes(PRESETS[preset]), path=link).name == preset


def test_cli_decode_with_a_released_name_offline(hub, tmp_path):
    """`pidkern decode --checkpoint <release name>` in a fresh process with HF_HUB_OFFLINE=1
    and HF_HUB_CACHE pointing at the populated cache writes the API's image."""
    cfg = stand_in_config("flux-2k")
    lat = torch.randn(1, cfg.latent_channels, 2, 3, generator=torch.Generator().manual_seed(3))
    torch.save(lat, tmp_path / "lat.pt")
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub["cache"]))
    out = tmp_path / "out.png"
    r = subprocess.run([sys.executable, "-m", "pidkern", "decode", str(tmp_path / "lat.pt"), "-o", str(out),
                        "--checkpoint", FLUX, "--steps", "1", "--device", "cpu"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    from PIL import Image
    dec = api.Decoder(api.random_net(cfg, torch.device("cpu"), torch.float32), torch.device("cpu"), torch.float32, "x")
    dec.net.load_state_dict(hub["main"])
    want = pidkern.to_uint8(dec.decode(lat, steps=1, seed=0, progress=False))[0]
    assert torch.equal(torch.from_numpy(np.array(Image.open(out))), want)
    # the same with an empty cache: exit 2, one line naming the command
    env["HF_HUB_CACHE"] = str(tmp_path / "nothing")
    r = subprocess.run([sys.executable, "-m", "pidkern", "decode", str(tmp_path / "lat.pt"), "-o", str(out),
                        "--checkpoint", "flux-2k", "--device", "cpu"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 2
    assert "hf download nvidia/PiD" in r.stderr and "Traceback" not in r.stderr


# -- pidkern.decode without model= ---------------------------------------------------------------

def test_decode_with_nothing_loaded_fails_at_once(empty_offline):
    latent = torch.randn(1, 16, 4, 4)
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as e:
        pidkern.decode(latent, 0.0)
    assert time.perf_counter() - t0 < 1.0
    msg = str(e.value)
    for part in ("model=", "backbone=", "16", "FLUX.1", "SD3", "Qwen-Image", "random=True"):
        assert part in msg, part


def test_decode_uses_the_decoder_load_returned_last(offline, monkeypatch):
    monkeypatch.setattr(api, "_last_loaded", None)
    dec = pidkern.load(FLUX, device="cpu", progress=False)
    latent = torch.randn(1, 16, 2, 2, generator=torch.Generator().manual_seed(0))
    got = pidkern.decode(latent, 0.1, steps=1, seed=4)
    torch.testing.assert_close(got, dec.decode(latent, 0.1, steps=1, seed=4), rtol=0, atol=0)
    del dec                                        # held weakly: once dropped, nothing is loaded
    import gc
    gc.collect()                                   # the Decoder's own reference cycles
    with pytest.raises(ValueError, match="model="):
        pidkern.decode(latent, 0.1)


def test_decode_with_backbone_loads_its_release(offline, monkeypatch):
    monkeypatch.setattr(api, "_last_loaded", None)
    monkeypatch.setattr(api, "_cache", {})
    latent = torch.randn(1, 16, 2, 2, generator=torch.Generator().manual_seed(0))
    got = pidkern.decode(latent, 0.0, backbone="flux", device="cpu", steps=1, seed=1)
    dec = pidkern.load(FLUX, device="cpu", progress=False)
    torch.testing.assert_close(got, dec.decode(latent, 0.0, steps=1, seed=1), rtol=0, atol=0)


def test_latent_checked_before_any_weight(empty_offline):
    """A wrong latent fails on its shape, not on the missing download behind it."""
    with pytest.raises(ValueError, match="takes \\[B, 16, h, w\\]"):
        pidkern.decode(torch.randn(1, 5, 8, 8), 0.0, backbone="flux")
    with pytest.raises(ValueError, match="come from sdxl"):           # another family's latent: named
        pidkern.decode(torch.randn(1, 4, 8, 8), 0.0, backbone="flux")
    with pytest.raises(FileNotFoundError, match="hf download"):
        pidkern.decode(torch.randn(1, 16, 8, 8), 0.0, model="flux-2k", device="cpu")


# -- hub ids for the caption encoder and the VAE ---------------------------------------------------

def test_text_encoder_and_vae_by_hub_id(hub, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    from tiny_diffusers import tiny_kl_vae
    from tiny_gemma import save_tiny_gemma
    cache = tmp_path / "hub"
    put_folder(cache, "Efficient-Large-Model/gemma-2-2b-it", save_tiny_gemma(tmp_path / "gemma"))
    tiny_kl_vae().save_pretrained(tmp_path / "vae")
    put_folder(cache, "black-forest-labs/FLUX.1-dev", tmp_path / "vae", prefix="vae")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    enc = pidkern.CaptionEncoder.from_pretrained("Efficient-Large-Model/gemma-2-2b-it", device="cpu",
                                                 dtype=torch.float32)
    local = pidkern.CaptionEncoder.from_pretrained(tmp_path / "gemma", device="cpu", dtype=torch.float32)
    torch.testing.assert_close(enc.encode("a cat"), local.encode("a cat"), rtol=0, atol=0)
    from pidkern.cli import load_vae
    vae = load_vae("black-forest-labs/FLUX.1-dev")
    ref = tiny_kl_vae()
    for k, v in ref.state_dict().items():
        assert torch.equal(vae.state_dict()[k], v), k
    with pytest.raises(FileNotFoundError, match="hf download stabilityai/stable-diffusion-3-medium-diffusers"):
        load_vae("stabilityai/stable-diffusion-3-medium-diffusers")
