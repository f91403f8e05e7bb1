"""The released state dicts load unchanged: every key and shape of every preset (SPEC §1, §8)."""
import json
from pathlib import Path

import pytest
import torch

from pidkern.config import PRESETS, get_preset, tiny
from pidkern.reference import PiDNet

SHAPES = json.loads((Path(__file__).parent / "data" / "state_dict_shapes.json").read_text())

# SPEC §1, first table: latent channels, latent stride, unpack, sr scale, net version.
SPEC_TABLE = {
    "flux-2k": (16, 8, 1, 4, "v1"),
    "sd3-2k": (16, 8, 1, 4, "v1"),
    "sd3-2kto4k": (16, 8, 1, 4, "v1"),
    "sdxl-2kto4k": (4, 8, 1, 4, "v1"),
    "flux2-2k": (128, 16, 1, 4, "v1"),
    "dinov2-2k": (768, 16, 1, 4, "v1"),
    "siglip-2k": (1152, 16, 1, 8, "v1"),
    "flux-2kto4k-v1.5": (16, 8, 1, 4, "v1.5"),
    "flux2-2kto4k-v1.5": (128, 16, 2, 4, "v1.5"),
    "qwenimage-2kto4k-v1.5": (16, 8, 1, 4, "v1.5"),
}


def test_presets_are_the_ten_released():
    assert set(PRESETS) == set(SPEC_TABLE)
    assert set(SHAPES) == set(SPEC_TABLE)


@pytest.mark.parametrize("name", sorted(SPEC_TABLE))
def test_state_dict_keys_and_shapes(name):
    with torch.device("meta"):
        net = PiDNet(get_preset(name))
    got = {k: list(v.shape) for k, v in net.state_dict().items()}
    want = SHAPES[name]
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    assert not missing, f"{name}: keys the release has but PiDNet lacks: {missing[:10]}"
    assert not extra, f"{name}: keys PiDNet has but the release lacks: {extra[:10]}"
    wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not wrong, f"{name}: shape mismatches (got, release): {dict(list(wrong.items())[:10])}"


@pytest.mark.parametrize("name", sorted(SPEC_TABLE))
def test_preset_facts(name):
    ch, stride, unpack, sr, version = SPEC_TABLE[name]
    cfg = get_preset(name)
    assert (cfg.latent_channels, cfg.latent_stride, cfg.unpack, cfg.sr_scale, cfg.version) == (ch, stride, unpack, sr,
                                                                                              version)
    # shared numbers of SPEC §1
    assert (cfg.hidden, cfg.heads, cfg.head_dim, cfg.patch_blocks, cfg.pixel_blocks) == (1536, 24, 64, 14, 2)
    assert (cfg.patch, cfg.pixel_dim, cfg.pixel_attn_dim, cfg.pixel_heads, cfg.pixel_head_dim) == (16, 16, 1152, 16, 72)
    assert (cfg.text_dim, cfg.max_text, cfg.lq_every, cfg.mlp_hidden) == (2304, 300, 2, 4096)
    v15 = version == "v1.5"
    assert cfg.adapter_width == (1024 if v15 else 512)
    assert cfg.rope_ref_grid == (128 if v15 else 64)
    assert cfg.adapter_padding == ("replicate" if v15 else "zeros")
    assert cfg.num_lq_heads == 7
    # Output = latent x stride x sr; checked on a non-square latent so h and w cannot swap.
    assert cfg.output_size(64, 40) == (64 * stride * sr, 40 * stride * sr)


def test_output_size_examples():
    assert get_preset("flux-2k").output_size(64, 64) == (2048, 2048)
    assert get_preset("sdxl-2kto4k").output_size(128, 96) == (4096, 3072)
    assert get_preset("siglip-2k").sr_scale == 8
    assert get_preset("siglip-2k").output_size(16, 16) == (2048, 2048)
    assert get_preset("flux2-2kto4k-v1.5").output_size(32, 32) == (2048, 2048)


def test_get_preset_unknown_names_the_argument():
    with pytest.raises(ValueError, match="preset"):
        get_preset("flux-3k")


@pytest.mark.parametrize("name", sorted(SPEC_TABLE))
def test_tiny_keeps_the_structure(name):
    """tiny() shrinks widths only: the key set is the release's, cut to 2 patch blocks and 1 adapter head."""
    with torch.device("meta"):
        net = PiDNet(tiny(name))
    got = set(net.state_dict())
    want = {k for k in SHAPES[name]
            if not k.startswith("patch_blocks.") or int(k.split(".")[1]) < 2}
    want = {k for k in want
            if not (k.startswith(("lq_proj.output_heads.", "lq_proj.gate_modules.")) and int(k.split(".")[2]) >= 1)}
    assert got == want
