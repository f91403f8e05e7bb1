"""The analytic FLOP model (pidkern.flops) against PERF.md and against a FLOP counter on the reference."""
import pytest
import torch

from pidkern.config import get_preset, tiny
from pidkern.flops import decode_flops, flop_counter, forward_flops
from pidkern.reference import PiDNet

# PERF.md, "The work": TFLOP per 4-step decode of a v1 preset, and the share in attention
PERF_TOTALS = {1024: (26.0, 0.28), 2048: (177.8, 0.59), 4096: (1935.0, 0.85)}


@pytest.mark.parametrize("size", sorted(PERF_TOTALS))
def test_reproduces_perf_totals(size):
    tflop, share = PERF_TOTALS[size]
    f = decode_flops(get_preset("flux-2k"), 1, size, size, steps=4)
    assert f["tflop"] == pytest.approx(tflop, rel=0.01)
    assert f["attention_share"] == pytest.approx(share, abs=0.01)


def test_perf_breakdown_at_2048():
    # PERF.md's per-step parts (3.3 / 6.0 / 1.5 / 0.27 TFLOP) add up to its total only as
    # quarters of one network call: 4 steps x 4 x (3.3 + 6.0 + 1.5 + 0.27) + 0.9 = 177.9.
    f = decode_flops(get_preset("flux-2k"), 1, 2048, 2048)
    step = {k: v / 1e12 for k, v in f["per_step_breakdown"].items()}
    assert step["patch_gemm"] / 4 == pytest.approx(3.3, rel=0.02)
    assert step["patch_attention"] / 4 == pytest.approx(6.0, rel=0.02)
    assert (step["pixel_gemm"] + step["pixel_attention"]) / 4 == pytest.approx(1.5, rel=0.02)
    assert step["adapter_gates"] / 4 == pytest.approx(0.27, rel=0.02)
    assert f["once"] / 1e12 == pytest.approx(0.9, rel=0.03)   # adapter convs + heads, once per decode


def test_composition():
    cfg = get_preset("sd3-2kto4k")
    one = decode_flops(cfg, 1, 1536, 1024, steps=3)
    three = decode_flops(cfg, 3, 1536, 1024, steps=3)
    assert three["total"] == pytest.approx(3 * one["total"])
    assert one["total"] == pytest.approx(3 * one["per_step"] + one["once"])
    again = decode_flops(cfg, 1, 1536, 1024, steps=3, adapter_per_step=True)
    assert again["total"] == pytest.approx(3 * (one["per_step"] + one["once"]))
    assert sum(one["breakdown"].values()) == pytest.approx(one["total"])
    with pytest.raises(ValueError):
        decode_flops(cfg, 1, 1000, 1024)


@pytest.mark.parametrize("base,batch,h,w,text", [
    ("flux-2k", 3, 96, 160, 24),              # v1, nearest-upsampled latent, odd non-square grid
    ("flux2-2kto4k-v1.5", 2, 128, 64, 17),   # v1.5: per-token gate, pit head, unpack
    ("siglip-2k", 1, 128, 128, 24),          # sr 8
    ("dinov2-2k", 1, 64, 192, 5),
])
def test_matches_flop_counter_on_reference(base, batch, h, w, text):
    cfg = tiny(base)
    torch.manual_seed(0)
    net = PiDNet(cfg).eval()
    lat_h, lat_w = h // cfg.upscale, w // cfg.upscale
    x = torch.randn(batch, 3, h, w)
    latent = torch.randn(batch, cfg.latent_channels, lat_h, lat_w)
    args = (x, torch.rand(batch), torch.randn(batch, text, cfg.text_dim), latent, torch.rand(batch))
    with flop_counter() as fc, torch.no_grad():
        out = net(*args)
    assert out.shape == x.shape
    counted = fc.get_total_flops()
    assert counted > 0
    assert forward_flops(cfg, batch, h, w, text_tokens=text) == pytest.approx(counted, rel=0.02)
