"""Checkpoint reading (SPEC §8): every format round-trips exactly, the preset is detected
from shapes, and every kind of bad file fails with a message that names it."""
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import pidkern
from pidkern.api import random_net
from pidkern.checkpoint import (AmbiguousPresetWarning, _config_from_metadata, check_state_dict, config_metadata,
                                convert, detect_preset, load_checkpoint, network_key)
from pidkern.config import PRESETS, RELEASE_DIRS, tiny

SHAPES = json.loads((Path(__file__).parent / "data" / "state_dict_shapes.json").read_text())
SAME_NETWORK = [("flux-2k", "sd3-2k", "sd3-2kto4k"), ("flux-2kto4k-v1.5", "qwenimage-2kto4k-v1.5")]
CPU = torch.device("cpu")


def meta_state(name):
    """The released keys and shapes of a preset as meta tensors: shapes without memory."""
    return {k: torch.empty(v, device="meta") for k, v in SHAPES[name].items()}


@pytest.fixture(scope="module", params=["flux-2k", "flux2-2kto4k-v1.5"])
def tiny_net(request):
    cfg = tiny(request.param)
    return cfg, {k: v.clone() for k, v in random_net(cfg, CPU, torch.float32, seed=3).state_dict().items()}


def training_state(sd):
    """A training checkpoint's layout: the net under `net.`, plus copies and state inference skips."""
    out = {f"net.{k}": v for k, v in sd.items()}
    for group in ("net_ema", "fake_score"):  # same shapes, other values: loading one by mistake shows
        out.update({f"{group}.{k}": torch.randn_like(v) for k, v in sd.items()})
    out["discriminator.head.weight"] = torch.randn(7, 5)
    return out


def assert_same(got, want):
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


# --- round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_dcp_directory(tmp_path, tiny_net, layout):
    import torch.distributed.checkpoint as dcp
    cfg, sd = tiny_net
    state = training_state(sd)
    if layout == "nested":
        state = {"model": state, "optimizer": {"state": {"0": {"exp_avg": torch.randn(4)}}}, "step": 12}
    ckpt = tmp_path / "ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(ckpt), no_dist=True)
    got, got_cfg = load_checkpoint(ckpt, cfg)
    assert got_cfg == cfg
    assert_same(got, sd)
    # A folder that holds the DCP directory somewhere below resolves to it.
    got, _ = load_checkpoint(tmp_path, cfg)
    assert_same(got, sd)


@pytest.mark.parametrize("nest", [None, "state_dict", "model", "net", "module"])
def test_pt_file(tmp_path, tiny_net, nest):
    cfg, sd = tiny_net
    if nest is None:
        obj = dict(sd)
    elif nest == "net":
        obj = {"net": dict(sd), "net_ema": {k: torch.randn_like(v) for k, v in sd.items()}, "iteration": 5}
    elif nest == "module":  # DDP-wrapped keys
        obj = {"state_dict": {f"module.{k}": v for k, v in sd.items()}}
    else:
        obj = {nest: dict(sd), "optimizer": {"state": {0: {"exp_avg": torch.randn(3)}}}, "epoch": 2}
    path = tmp_path / "weights.pth"
    torch.save(obj, path)
    got, got_cfg = load_checkpoint(path, cfg)
    assert got_cfg == cfg
    assert_same(got, sd)


def test_training_pt_file(tmp_path, tiny_net):
    cfg, sd = tiny_net
    torch.save(training_state(sd), tmp_path / "train.pt")
    got, _ = load_checkpoint(tmp_path / "train.pt", cfg)
    assert_same(got, sd)


def test_safetensors_file(tmp_path, tiny_net):
    cfg, sd = tiny_net
    save_file(training_state(sd), tmp_path / "w.safetensors")
    got, got_cfg = load_checkpoint(tmp_path / "w.safetensors", cfg)
    assert got_cfg == cfg
    assert_same(got, sd)


def test_convert_round_trip_and_metadata(tmp_path, tiny_net):
    cfg, sd = tiny_net
    torch.save(training_state(sd), tmp_path / "train.pt")
    dst, got_cfg = convert(tmp_path / "train.pt", tmp_path / "out" / "clean.safetensors", preset=cfg)
    assert got_cfg == cfg and dst.is_file()
    with safe_open(str(dst), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(sd)  # clean keys only: no net., no training copies
    assert meta["pidkern_preset"] == cfg.name and meta["format"] == "pt"
    assert json.loads(meta["pidkern_config"])["hidden"] == cfg.hidden
    # No preset needed: the config travels in the metadata.
    got, got_cfg = load_checkpoint(dst)
    assert got_cfg == cfg
    assert_same(got, sd)
    assert not list(dst.parent.glob("*.tmp"))


def test_convert_dtype_and_load_dtype(tmp_path, tiny_net):
    cfg, sd = tiny_net
    save_file({f"net.{k}": v for k, v in sd.items()}, tmp_path / "w.safetensors")
    dst, _ = convert(tmp_path / "w.safetensors", tmp_path / "bf16.safetensors", preset=cfg, dtype=torch.bfloat16)
    got, _ = load_checkpoint(dst)
    assert_same(got, {k: v.to(torch.bfloat16) for k, v in sd.items()})
    got, _ = load_checkpoint(dst, dtype=torch.float16)
    assert all(v.dtype == torch.float16 for v in got.values())


def test_converted_preset_file_needs_no_preset(tmp_path, tiny_net):
    """A file holding only `pidkern_preset` metadata takes that preset."""
    cfg, sd = tiny_net
    save_file(dict(sd), tmp_path / "w.safetensors", metadata={"pidkern_preset": "flux-2k", "format": "pt"})
    with pytest.raises(ValueError, match="does not match preset flux-2k"):
        load_checkpoint(tmp_path / "w.safetensors")


@pytest.mark.parametrize("name", ["sd3-2k", "qwenimage-2kto4k-v1.5", "siglip-2k"])
def test_metadata_keeps_the_preset_name(name):
    """A converted sd3-2k stays sd3-2k although flux-2k is the same network."""
    assert _config_from_metadata(config_metadata(PRESETS[name]), "x.safetensors") is PRESETS[name]
    assert _config_from_metadata({"pidkern_preset": name}, "x.safetensors") is PRESETS[name]
    with pytest.raises(ValueError, match="x.safetensors.*pidkern_config"):
        _config_from_metadata({"pidkern_config": "{not json"}, "x.safetensors")


def test_api_load_uses_checkpoint_config(tmp_path, tiny_net):
    cfg, sd = tiny_net
    torch.save({"net": sd}, tmp_path / "w.pt")
    dst, _ = convert(tmp_path / "w.pt", tmp_path / "w.safetensors", preset=cfg)
    dec = pidkern.load(dst, device="cpu", dtype="float32")
    assert dec.config == cfg
    assert_same(dec.net.state_dict(), sd)


def test_network_key_rules():
    assert network_key("net.patch_blocks.0.attn.qkv_x.weight") == "patch_blocks.0.attn.qkv_x.weight"
    assert network_key("model.net._orig_mod.lq_proj.pit_head.bias") == "lq_proj.pit_head.bias"
    assert network_key("y_pos_embedding") == "y_pos_embedding"
    for skipped in ("net_ema.patch_blocks.0.norm_x1.weight", "fake_score.final_layer.linear.weight",
                    "discriminator.patch_blocks.0.x", "model.net_ema.lq_proj.pit_head.bias",
                    "optimizer.state.0.exp_avg", "step"):
        assert network_key(skipped) is None, skipped


# --- preset detection ----------------------------------------------------------------------

def _group(name):
    return next((g for g in SAME_NETWORK if name in g), (name,))


@pytest.mark.parametrize("name", list(PRESETS))
def test_detect_every_preset_from_shapes(name):
    group = _group(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = detect_preset(meta_state(name))
    assert cfg is PRESETS[group[0]]
    ambiguous = [w for w in caught if issubclass(w.category, AmbiguousPresetWarning)]
    if len(group) > 1:
        msg = str(ambiguous[0].message)
        assert all(n in msg for n in group) and "same network" in msg and "preset=" in msg
    else:
        assert not ambiguous
    check_state_dict(meta_state(name), cfg)  # the detected config accepts the shapes


@pytest.mark.parametrize("name", list(PRESETS))
def test_release_directory_name_picks_the_preset(tmp_path, name):
    path = tmp_path / RELEASE_DIRS[name] / "model"
    path.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ambiguity warning once the directory names it
        assert detect_preset(meta_state(name), path) is PRESETS[name]
    # Also as a file name, without the directory existing.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert detect_preset(meta_state(name), f"/nowhere/{RELEASE_DIRS[name]}.pth") is PRESETS[name]


def test_release_name_of_another_architecture_loses_to_shapes():
    with pytest.warns(UserWarning, match="going by the shapes"):
        cfg = detect_preset(meta_state("sdxl-2kto4k"), f"/ckpts/{RELEASE_DIRS['flux-2k']}")
    assert cfg.name == "sdxl-2kto4k"


def test_detect_rejects_unknown_shapes(tiny_net):
    cfg, sd = tiny_net
    with pytest.raises(ValueError, match="which no preset has.*preset="):
        detect_preset(sd, "some.pt")
    no_adapter = {k: v for k, v in meta_state("flux-2k").items() if not k.startswith("lq_proj.latent_proj.0")}
    with pytest.raises(ValueError, match="lq_proj.latent_proj.0.weight"):
        detect_preset(no_adapter)


def test_detect_through_a_file(tmp_path):
    """Detection works on a real file when the shapes are a preset's: the flux-2k adapter
    keys at full size, the rest dropped, is enough to see the fingerprint and fail checking."""
    state = {f"net.{k}": torch.zeros(v) for k, v in SHAPES["sdxl-2kto4k"].items() if k.startswith("lq_proj.latent")}
    save_file(state, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError) as err:
        load_checkpoint(tmp_path / "partial.safetensors")
    msg = str(err.value)
    assert "partial.safetensors" in msg and "sdxl-2kto4k" in msg and "missing key" in msg


# --- errors --------------------------------------------------------------------------------

def test_shape_mismatch_message_on_a_full_preset():
    state = meta_state("flux2-2k")
    state["patch_blocks.3.attn.proj_x.weight"] = torch.empty(1536, 1535, device="meta")
    with pytest.raises(ValueError) as err:
        check_state_dict(state, PRESETS["flux2-2k"], "released.pth")
    msg = str(err.value)
    assert "released.pth" in msg and "flux2-2k" in msg
    assert "patch_blocks.3.attn.proj_x.weight: expected [1536, 1536], got [1536, 1535]" in msg


def test_missing_unexpected_and_wrong_shape_in_files(tmp_path, tiny_net):
    cfg, sd = tiny_net
    bad = dict(sd)
    del bad["final_layer.linear.bias"]
    bad["patch_blocks.1.attn.qkv_x.weight"] = torch.randn(5, 3)
    bad["patch_blocks.7.norm_x1.weight"] = torch.randn(cfg.hidden)
    for path in (tmp_path / "bad.pt", tmp_path / "bad.safetensors"):
        (torch.save if path.suffix == ".pt" else save_file)(bad, path)
        with pytest.raises(ValueError) as err:
            load_checkpoint(path, cfg)
        msg = str(err.value)
        assert str(path) in msg and cfg.name in msg
        assert f"patch_blocks.1.attn.qkv_x.weight: expected [{3 * cfg.hidden}, {cfg.hidden}], got [5, 3]" in msg
        assert "missing key(s): final_layer.linear.bias" in msg
        assert "unexpected key(s): patch_blocks.7.norm_x1.weight" in msg


def test_missing_keys_in_dcp_checked_before_reading(tmp_path, tiny_net):
    import torch.distributed.checkpoint as dcp
    cfg, sd = tiny_net
    state = {f"net.{k}": v for k, v in sd.items() if not k.startswith("pixel_blocks.1.")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(tmp_path / "d"), no_dist=True)
    with pytest.raises(ValueError, match=r"does not match preset .*missing key\(s\): pixel_blocks\.1\."):
        load_checkpoint(tmp_path / "d", cfg)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_random_bytes(tmp_path, suffix):
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="junk"):
        load_checkpoint(path, tiny())


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file(tmp_path, tiny_net, suffix):
    cfg, sd = tiny_net
    whole = tmp_path / f"whole{suffix}"
    (torch.save if suffix == ".pt" else save_file)(dict(sd), whole)
    data = whole.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match="cut"):
        load_checkpoint(cut, cfg)


def test_corrupt_dcp(tmp_path, tiny_net):
    import torch.distributed.checkpoint as dcp
    cfg, sd = tiny_net
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({f"net.{k}": v for k, v in sd.items()}, checkpoint_id=str(tmp_path / "d"), no_dist=True)
    data_file = next((tmp_path / "d").glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[:1000])
    with pytest.raises(ValueError, match="d.*torch.distributed.checkpoint"):
        load_checkpoint(tmp_path / "d", cfg)
    (tmp_path / "d" / ".metadata").write_bytes(os.urandom(300))
    with pytest.raises(ValueError, match="metadata"):
        load_checkpoint(tmp_path / "d", cfg)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here.pt"):
        load_checkpoint(tmp_path / "nothing-here.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without a checkpoint"):
        load_checkpoint(tmp_path / "empty")


def test_folder_with_two_checkpoints_asks_which(tmp_path, tiny_net):
    cfg, sd = tiny_net
    save_file(dict(sd), tmp_path / "a.safetensors")
    save_file(dict(sd), tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="several checkpoints"):
        load_checkpoint(tmp_path, cfg)
    (tmp_path / "b.safetensors").unlink()
    assert_same(load_checkpoint(tmp_path, cfg)[0], sd)


def test_no_network_and_colliding_keys(tmp_path, tiny_net):
    cfg, sd = tiny_net
    torch.save({"optimizer": {"lr": torch.tensor(1.0)}}, tmp_path / "opt.pt")
    with pytest.raises(ValueError, match="no PiD network weights.*optimizer"):
        load_checkpoint(tmp_path / "opt.pt", cfg)
    key = "final_layer.linear.bias"
    torch.save({f"net.{key}": sd[key], f"model.{key}": sd[key]}, tmp_path / "twice.pt")
    with pytest.raises(ValueError, match="two entries hold network key"):
        load_checkpoint(tmp_path / "twice.pt", cfg)


def test_convert_refuses_other_suffix_and_bad_arguments(tmp_path, tiny_net):
    cfg, sd = tiny_net
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(ValueError, match="safetensors"):
        convert(tmp_path / "w.pt", tmp_path / "w.bin", preset=cfg)
    with pytest.raises(ValueError, match="not a known preset"):
        load_checkpoint(tmp_path / "w.pt", "flux-3k")
    with pytest.raises(TypeError, match="dtype"):
        load_checkpoint(tmp_path / "w.pt", cfg, dtype="bf16")
