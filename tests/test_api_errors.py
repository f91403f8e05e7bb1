"""Every bad input to the public API fails loudly, naming the argument; and the happy path."""
import math

import numpy as np
import pytest
import torch

import pidkern
from pidkern.api import Decoder, random_net
from pidkern.config import tiny

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dec():
    cfg = tiny("flux-2k")
    return Decoder(random_net(cfg, CPU, torch.float32, seed=1), CPU, torch.float32, "test")


def inputs(dec, b=2, hw=(1, 2), tokens=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = dec.config
    return (torch.randn(b, cfg.latent_channels, *hw, generator=g),
            torch.randn(b, tokens, cfg.text_dim, generator=g))


def fails(dec, exc, match, **kw):
    latent, text = inputs(dec)
    args = dict(latent=latent, sigma=0.1, text=text, steps=1, seed=0)
    args.update(kw)
    with pytest.raises(exc, match=match):
        dec.decode(**args)


# -- latent ------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [4, 15, 17, 32])
def test_latent_channels_must_fit_preset(dec, channels):
    fails(dec, ValueError, "latent", latent=torch.randn(1, channels, 1, 2), text=None)


def test_latent_shape_and_type(dec):
    fails(dec, ValueError, "latent", latent=torch.randn(16, 1, 2), text=None)
    fails(dec, TypeError, "latent", latent=torch.randn(1, 16, 1, 2).numpy(), text=None)
    fails(dec, TypeError, "latent", latent=torch.ones(1, 16, 1, 2, dtype=torch.int64), text=None)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_latent_non_finite(dec, bad):
    latent, text = inputs(dec)
    latent[1, 3, 0, 1] = bad
    fails(dec, ValueError, "latent", latent=latent, text=text)


# -- text --------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_text_non_finite(dec, bad):
    latent, text = inputs(dec)
    text[0, 2, 7] = bad
    fails(dec, ValueError, "text", latent=latent, text=text)


def test_text_width_and_length(dec):
    cfg = dec.config
    fails(dec, ValueError, "text", text=torch.randn(2, 5, cfg.text_dim + 1))
    fails(dec, ValueError, "text", text=torch.randn(2, 5, 2304))             # the full-size width
    fails(dec, ValueError, "text", text=torch.randn(2, cfg.max_text + 1, cfg.text_dim))
    fails(dec, ValueError, "text", text=torch.randn(2, 0, cfg.text_dim))
    fails(dec, ValueError, "text", text=torch.randn(3, 5, cfg.text_dim))     # batch mismatch
    fails(dec, ValueError, "text", text=torch.randn(5, cfg.text_dim))
    fails(dec, TypeError, "text", text=[[0.0] * cfg.text_dim])


def test_text_at_max_tokens_is_fine(dec):
    cfg = dec.config
    latent, _ = inputs(dec)
    out = dec.decode(latent, 0.0, text=torch.randn(2, cfg.max_text, cfg.text_dim), steps=1, seed=0)
    assert torch.isfinite(out).all()


# -- sigma -------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma", [-0.01, 1.01, 7, math.nan, math.inf])
def test_sigma_float_out_of_range(dec, sigma):
    fails(dec, ValueError, "sigma", sigma=sigma)


@pytest.mark.parametrize("sigma", [torch.tensor([0.2, 1.5]), torch.tensor([-0.1, 0.5]),
                                   torch.tensor([0.2, math.nan]), torch.tensor(2.0)])
def test_sigma_tensor_out_of_range(dec, sigma):
    fails(dec, ValueError, "sigma", sigma=sigma)


@pytest.mark.parametrize("sigma", [torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.1]),
                                   torch.full((2, 1), 0.1), torch.zeros(0)])
def test_sigma_wrong_length(dec, sigma):
    fails(dec, ValueError, "sigma", sigma=sigma)


@pytest.mark.parametrize("sigma", ["0.1", None, True, [0.1, 0.2]])
def test_sigma_wrong_type(dec, sigma):
    fails(dec, TypeError, "sigma", sigma=sigma)


def test_sigma_edges_accepted(dec):
    latent, text = inputs(dec)
    for s in (0.0, 1.0, 0, 1, torch.tensor([0.0, 1.0]), torch.tensor(0.5, dtype=torch.float64)):
        assert torch.isfinite(dec.decode(latent, s, text=text, steps=1, seed=0)).all()


# -- steps, size, sampler, backend -------------------------------------------------------

@pytest.mark.parametrize("steps", [0, 5, -1, 2.0, True, "2"])
def test_steps(dec, steps):
    fails(dec, ValueError, "steps", steps=steps)


def test_size(dec):
    cfg = dec.config
    h, w = cfg.output_size(1, 2)
    fails(dec, ValueError, "size", size=(h + cfg.patch // 2, w))        # not a multiple of the patch
    fails(dec, ValueError, "size", size=(h, w - 1))
    fails(dec, ValueError, "size", size=(h + cfg.patch, w))             # a multiple, but not this latent's
    fails(dec, ValueError, "size", size=(w, h))                         # transposed
    fails(dec, ValueError, "size", size=(0, w))
    fails(dec, TypeError, "size", size=(h, w, 3))
    fails(dec, TypeError, "size", size=(float(h), w))
    fails(dec, TypeError, "size", size="32x64")
    latent, text = inputs(dec)
    assert dec.decode(latent, 0.0, text=text, steps=1, seed=0, size=(h, w)).shape == (2, 3, h, w)


@pytest.mark.parametrize("name", ["euler", "SDE", "", "dpm"])
def test_sampler_name(dec, name):
    fails(dec, ValueError, "sampler", sampler=name)


# explicit id: conftest skips on CPU any test whose keywords contain "cuda", param ids included
@pytest.mark.parametrize("name", [pytest.param("cuda", id="name-cuda"), "triton", "Reference", None])
def test_backend_name(dec, name):
    fails(dec, ValueError, "backend", backend=name)


def test_seed_type(dec):
    fails(dec, TypeError, "seed", seed=1.5)
    fails(dec, TypeError, "seed", seed="7")


# -- load: preset, device, dtype ---------------------------------------------------------

def test_unknown_preset():
    with pytest.raises(ValueError, match="preset"):
        pidkern.load(preset="flux-9k", device="cpu")
    with pytest.raises(TypeError, match="preset"):
        pidkern.load(preset=12, device="cpu")
    with pytest.raises(ValueError, match="flux-9k"):
        pidkern.decode(torch.randn(1, 16, 1, 1), model="flux-9k", device="cpu")


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu0", 3.5])
def test_bad_device(device):
    with pytest.raises(ValueError, match="device"):
        pidkern.load(preset=tiny("flux-2k"), device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_gpu_device_string_without_gpu():
    with pytest.raises(ValueError, match="device"):
        pidkern.load(preset=tiny("flux-2k"), device="cuda")


@pytest.mark.parametrize("dtype", ["float64", "int8", "half-float", torch.float64, torch.int32, torch.uint8])
def test_bad_dtype(dtype):
    with pytest.raises(ValueError, match="dtype"):
        pidkern.load(preset=tiny("flux-2k"), device="cpu", dtype=dtype)


def test_good_strings_load():
    with pytest.warns(UserWarning, match="RANDOM"):
        d = pidkern.load(preset=tiny("flux-2k"), device="cpu", dtype="fp32")
    assert d.dtype == torch.float32 and d.device == CPU


# -- happy path and bytes ----------------------------------------------------------------

def test_decode_happy_path(dec):
    latent, text = inputs(dec, b=3, hw=(2, 1))
    sigma = torch.tensor([0.0, 0.3, 1.0])
    out = pidkern.decode(latent, sigma, model=dec, text=text, steps=2, seed=9)
    h, w = dec.config.output_size(2, 1)
    assert out.shape == (3, 3, h, w) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.min() >= -1 and out.max() <= 1
    assert torch.equal(out, dec.decode(latent, sigma, text=text, steps=2, seed=9))
    # the text=None default runs too
    assert pidkern.decode(latent, 0.2, model=dec, steps=1, seed=0).shape == (3, 3, h, w)


def test_to_uint8_rounding():
    # (x+1)*127.5: x=0 lands exactly on 127.5 -> 128 (half to even); others clamp or round
    vals = [0.0, -1.0, 1.0, -2.0, 3.0, -0.5, 0.5, 0.25, -0.75, 0.9]
    x = torch.tensor(vals).reshape(1, 1, 2, 5).expand(1, 3, 2, 5).clone()
    x[0, 1] = -x[0, 1]
    x[0, 2] = x[0, 2] * 0.5
    got = pidkern.to_uint8(x)
    assert got.dtype == torch.uint8 and got.shape == (1, 2, 5, 3)
    for c in range(3):
        for i in range(2):
            for j in range(5):
                v = min(1.0, max(-1.0, float(x[0, c, i, j])))
                assert got[0, i, j, c].item() == round((v + 1) * 127.5), (c, i, j, v)   # Python round: half even
    assert got[0, 0, 0, 0].item() == 128
    assert got[0, 0, 1, 0].item() == 0 and got[0, 0, 2, 0].item() == 255
    assert got[0, 0, 3, 0].item() == 0 and got[0, 0, 4, 0].item() == 255


def test_to_uint8_bad_input():
    for bad in (torch.zeros(3, 4, 4), torch.zeros(1, 4, 4, 4), "img"):
        with pytest.raises(ValueError, match="images"):
            pidkern.to_uint8(bad)


def test_save_png(tmp_path):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(2, 3, 8, 16, generator=g) * 2.2 - 1.1
    outs = pidkern.save_png(imgs, tmp_path / "sub" / "pic.png")
    assert [p.name for p in outs] == ["pic-0.png", "pic-1.png"]
    want = pidkern.to_uint8(imgs)
    for i, p in enumerate(outs):
        arr = torch.from_numpy(np.array(Image.open(p).convert("RGB")))
        assert torch.equal(arr, want[i])
    one = pidkern.save_png(imgs[:1], tmp_path / "single.png")
    assert one == [tmp_path / "single.png"] and one[0].exists()
    assert torch.equal(torch.from_numpy(np.array(Image.open(one[0]))), want[0])
