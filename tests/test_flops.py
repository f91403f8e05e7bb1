"""The analytic FLOP model (pidkern.flops) against PERF.md and against a FLOP counter on the reference."""
import pytest
import torch

from pidkern.config import PRESETS, get_preset, tiny
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


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_channel_counts_are_the_networks_own(name):
    """The widths the FLOP model multiplies are those of the modules the network builds."""
    from pidkern.flops import adapter_input_channels
    for cfg in (get_preset(name), tiny(name, patch=64)):     # patch 64: space-to-depth for most presets
        with torch.device("meta"):
            net = PiDNet(cfg)
        convs = [m for m in net.lq_proj.latent_proj.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs[0].in_channels == adapter_input_channels(cfg)
        assert len(convs) == 2 + 2 * cfg.adapter_res_blocks and convs[-1].out_channels == cfg.adapter_width
        assert net.patch_blocks[0].mlp_x.w1.out_features == cfg.mlp_hidden
        assert net.pixel_blocks[0].adaLN_modulation[0].out_features == 6 * cfg.pixel_dim * cfg.pixels_per_patch


def test_space_to_depth_adapter_flops_match_flop_counter():
    cfg = tiny("flux-2k", patch=64)          # grid ratio 1/2: the latent is folded 2x2 into channels
    assert cfg.grid_ratio == (1, 2)
    torch.manual_seed(0)
    net = PiDNet(cfg).eval()
    x = torch.randn(1, 3, 128, 128)
    args = (x, torch.rand(1), torch.randn(1, 4, cfg.text_dim), torch.randn(1, cfg.latent_channels, 4, 4),
            torch.rand(1))
    with flop_counter() as fc, torch.no_grad():
        net(*args)
    assert forward_flops(cfg, 1, 128, 128, text_tokens=4) == pytest.approx(fc.get_total_flops(), rel=0.02)
