"""Weights as people have them: ComfyUI's layouts (three prefixes, the pixel adaLN whole or
split in two), the release's single-file EMA .pth, DCP training states read with or without
their EMA copy, the writers of each layout, and `pidkern info CKPT` / `convert --layout`.

Every file here is written by the test itself from its reading of the formats (SPEC §6 for
the per-pixel chunk order), never by the code under test, except where a round trip through
pidkern's writers is the point."""
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import pidkern
from pidkern.api import random_net
from pidkern.checkpoint import (config_metadata, convert, detect_layout, inspect_checkpoint, load_checkpoint,
                                merge_pixel_adaln, same_network, split_pixel_adaln)
from pidkern.config import PRESETS
from pidkern.cli import main
from pidkern.config import tiny

CPU = torch.device("cpu")
CHUNKS = ("shift1", "scale1", "gate1", "shift2", "scale2", "gate2")  # SPEC §6, per pixel, Dp values each


@pytest.fixture(scope="module", params=["flux-2k", "flux-2kto4k-v1.5"])
def net(request):
    cfg = tiny(request.param)
    return cfg, {k: v.clone() for k, v in random_net(cfg, CPU, torch.float32, seed=7).state_dict().items()}


def spec_halves(full, cfg):
    """ComfyUI's (msa, mlp) halves of a pixel adaLN tensor, row by row from SPEC §6: output
    row (p*6 + c)*Dp + d is pixel p's chunk c, channel d; the msa half holds chunks 0-2 of
    every pixel, the mlp half chunks 3-5, each as (p*3 + c')*Dp + d (d runs inside a slice)."""
    p2, dp = cfg.pixels_per_patch, cfg.pixel_dim
    msa = torch.empty((3 * p2 * dp, *full.shape[1:]), dtype=full.dtype)
    mlp = torch.empty_like(msa)
    for p in range(p2):
        for c in range(6):
            half, c3 = (msa, c) if c < 3 else (mlp, c - 3)
            half[(p * 3 + c3) * dp:(p * 3 + c3 + 1) * dp] = full[(p * 6 + c) * dp:(p * 6 + c + 1) * dp]
    return msa, mlp


def comfy_file(sd, cfg, prefix, split, drop_aux=False, dtype=torch.bfloat16):
    """A ComfyUI-layout state dict built by hand: `prefix` on every key, the pixel adaLN
    whole or split with `spec_halves`."""
    out = {}
    for k, v in sd.items():
        if drop_aux and k.startswith("lq_proj.lq_aux_rgb_head."):
            continue
        v = v.to(dtype)
        if split and k.startswith("pixel_blocks.") and ".adaLN_modulation.0." in k:
            block, _, param = k.partition(".adaLN_modulation.0.")
            out[f"{prefix}{block}.adaLN_modulation_msa.{param}"], out[f"{prefix}{block}.adaLN_modulation_mlp.{param}"] \
                = spec_halves(v, cfg)
        else:
            out[prefix + k] = v
    return out


def assert_same(got, want):
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def save_dcp(state, path):
    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(path), no_dist=True)


# --- the pixel adaLN rule ----------------------------------------------------------------

def test_split_rule_matches_the_spec_chunk_order(net):
    cfg, sd = net
    for param in ("weight", "bias"):
        full = sd[f"pixel_blocks.1.adaLN_modulation.0.{param}"]
        msa, mlp = spec_halves(full, cfg)
        got_msa, got_mlp = split_pixel_adaln(full, cfg)
        assert torch.equal(got_msa, msa) and torch.equal(got_mlp, mlp)
        assert torch.equal(merge_pixel_adaln(msa, mlp, cfg), full)
        assert not torch.equal(torch.cat([msa, mlp]), full)  # stacking the halves is wrong


def test_halves_give_the_modulation_comfyui_computes(net):
    """ComfyUI's PiTBlock views each half's output as [rows, P2, 3*Dp] and chunks it in three;
    that must give the SPEC's shift1/scale1/gate1 (msa) and shift2/scale2/gate2 (mlp)."""
    cfg, sd = net
    w, b = (sd[f"pixel_blocks.0.adaLN_modulation.0.{p}"] for p in ("weight", "bias"))
    s = torch.randn(5, cfg.hidden, generator=torch.Generator().manual_seed(0))
    p2, dp = cfg.pixels_per_patch, cfg.pixel_dim
    spec = dict(zip(CHUNKS, torch.nn.functional.linear(s, w, b).view(5, p2, 6 * dp).chunk(6, dim=-1)))
    (wa, wm), (ba, bm) = split_pixel_adaln(w, cfg), split_pixel_adaln(b, cfg)
    msa = torch.nn.functional.linear(s, wa, ba).view(5, p2, 3 * dp).chunk(3, dim=-1)
    mlp = torch.nn.functional.linear(s, wm, bm).view(5, p2, 3 * dp).chunk(3, dim=-1)
    for name, got in zip(CHUNKS, msa + mlp):
        torch.testing.assert_close(got, spec[name], rtol=0, atol=1e-6, msg=name)


# --- ComfyUI files -----------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "core.", "net."])
@pytest.mark.parametrize("split", [True, False])
def test_comfyui_files_load_as_the_release_network(tmp_path, net, prefix, split):
    cfg, sd = net
    path = tmp_path / "pid_tiny_bf16.safetensors"
    save_file(comfy_file(sd, cfg, prefix, split), path)
    got, got_cfg = load_checkpoint(path, cfg)
    assert got_cfg == cfg
    assert_same(got, {k: v.to(torch.bfloat16) for k, v in sd.items()})
    with safe_open(str(path), framework="pt") as f:
        want = "release" if prefix == "net." and not split else "comfyui"
        assert detect_layout(f.keys()) == want
    # The network loads them strictly, as pidkern.load does.
    dec = pidkern.load(path, preset=cfg, device="cpu", dtype="bfloat16")
    assert_same(dec.net.state_dict(), {k: v.to(torch.bfloat16) for k, v in sd.items()})


def test_comfyui_saved_file_without_the_training_only_head(tmp_path, net):
    """ComfyUI's own network has no v1.5 `lq_aux_rgb_head`, so its saved files lack it."""
    cfg, sd = net
    save_file(comfy_file(sd, cfg, "model.diffusion_model.", True, drop_aux=True), tmp_path / "c.safetensors")
    got, _ = load_checkpoint(tmp_path / "c.safetensors", cfg)
    aux = [k for k in sd if k.startswith("lq_proj.lq_aux_rgb_head.")]
    assert bool(aux) == cfg.is_v15
    for k in sd:
        want = torch.zeros_like(sd[k], dtype=torch.bfloat16) if k in aux else sd[k].to(torch.bfloat16)
        assert torch.equal(got[k], want), k
    info = inspect_checkpoint(tmp_path / "c.safetensors", cfg)
    assert sorted(info.filled) == sorted(aux)
    # Only ComfyUI files may lack it: the release always has it.
    if aux:
        save_file({f"net.{k}": v for k, v in sd.items() if k not in aux}, tmp_path / "r.safetensors")
        with pytest.raises(ValueError, match="missing key.*lq_aux_rgb_head"):
            load_checkpoint(tmp_path / "r.safetensors", cfg)


def test_comfyui_writer_matches_the_hand_built_layout(tmp_path, net):
    cfg, sd = net
    save_file({f"net.{k}": v for k, v in sd.items()}, tmp_path / "release.safetensors")
    dst, _ = convert(tmp_path / "release.safetensors", tmp_path / "comfy.safetensors", preset=cfg, layout="comfyui")
    with safe_open(str(dst), framework="pt") as f:
        written = {k: f.get_tensor(k) for k in f.keys()}
        assert f.metadata()["pidkern_preset"] == cfg.name
    assert_same(written, comfy_file(sd, cfg, "model.diffusion_model.", True, dtype=torch.float32))


# --- EMA -----------------------------------------------------------------------------------

def test_single_file_ema_pth(tmp_path, net):
    """The release's model_ema_bf16.pth: the EMA weights, bf16, under `net.` (no net_ema.)."""
    cfg, sd = net
    ema = {k: (v + 0.5).to(torch.bfloat16) for k, v in sd.items()}
    torch.save({f"net.{k}": v for k, v in ema.items()}, tmp_path / "model_ema_bf16.pth")
    got, _ = load_checkpoint(tmp_path / "model_ema_bf16.pth", cfg)
    assert_same(got, ema)
    assert detect_layout([f"net.{k}" for k in ema]) == "release"
    with pytest.raises(ValueError, match=r"model_ema_bf16.pth: ema=True, but it holds no EMA copy.*ema=False"):
        load_checkpoint(tmp_path / "model_ema_bf16.pth", cfg, ema=True)


def test_pth_training_state_picks_the_copy(tmp_path, net):
    cfg, sd = net
    ema = {k: v * 2 + 1 for k, v in sd.items()}
    torch.save({"net": sd, "net_ema": ema, "step": torch.tensor(3)}, tmp_path / "train.pth")
    assert_same(load_checkpoint(tmp_path / "train.pth", cfg)[0], sd)
    assert_same(load_checkpoint(tmp_path / "train.pth", cfg, ema=True)[0], ema)
    torch.save({f"net_ema.{k}": v for k, v in ema.items()}, tmp_path / "ema_only.pth")
    with pytest.raises(ValueError, match=r"ema_only.pth: holds only the EMA copy.*ema=True"):
        load_checkpoint(tmp_path / "ema_only.pth", cfg)
    assert_same(load_checkpoint(tmp_path / "ema_only.pth", cfg, ema=True)[0], ema)
    with pytest.raises(TypeError, match="ema='yes'"):
        load_checkpoint(tmp_path / "train.pth", cfg, ema="yes")


def test_dcp_training_state_ema_choice(tmp_path, net):
    """A release iteration folder: `model` (net., net_ema., fake_score., discriminator.)
    beside an optimizer DCP directory; `model` is the one read."""
    cfg, sd = net
    ema = {k: v - 0.25 for k, v in sd.items()}
    state = {f"net.{k}": v for k, v in sd.items()}
    state.update({f"net_ema.{k}": v for k, v in ema.items()})
    state.update({f"fake_score.{k}": torch.randn_like(v) for k, v in sd.items()})
    state["discriminator.head.weight"] = torch.randn(4, 4)
    save_dcp(state, tmp_path / "iter_000100" / "model")
    save_dcp({"optim.state.exp_avg": torch.zeros(5)}, tmp_path / "iter_000100" / "optim")
    assert_same(load_checkpoint(tmp_path / "iter_000100", cfg)[0], sd)
    assert_same(load_checkpoint(tmp_path / "iter_000100", cfg, ema=True)[0], ema)
    dec = pidkern.load(tmp_path / "iter_000100", preset=cfg, device="cpu", dtype="float32", ema=True)
    assert_same(dec.net.state_dict(), ema)
    info = inspect_checkpoint(tmp_path / "iter_000100", cfg)
    assert (info.layout, info.prefix, info.ema_available, info.ema_read) == ("release", "net.", True, False)
    assert info.skipped == {"net_ema": len(sd), "fake_score": len(sd), "discriminator": 1}
    info = inspect_checkpoint(tmp_path / "iter_000100", cfg, ema=True)
    assert (info.prefix, info.ema_read, info.skipped["net"]) == ("net_ema.", True, len(sd))
    assert info.dtypes == {"float32": len(sd)}
    assert info.parameters == sum(v.numel() for v in sd.values())


# --- round trips ---------------------------------------------------------------------------

def test_round_trip_release_comfyui_release_is_bit_exact(tmp_path, net):
    cfg, sd = net
    original = {f"net.{k}": v.to(torch.bfloat16) for k, v in sd.items()}
    torch.save(original, tmp_path / "model_ema_bf16.pth")
    convert(tmp_path / "model_ema_bf16.pth", tmp_path / "c.safetensors", preset=cfg, layout="comfyui")
    convert(tmp_path / "c.safetensors", tmp_path / "back.pth", layout="release")  # preset from metadata
    assert_same(torch.load(tmp_path / "back.pth", weights_only=True), original)
    convert(tmp_path / "c.safetensors", tmp_path / "plain.safetensors")
    convert(tmp_path / "plain.safetensors", tmp_path / "back.safetensors", layout="release")
    with safe_open(str(tmp_path / "back.safetensors"), framework="pt") as f:
        assert_same({k: f.get_tensor(k) for k in f.keys()}, original)


def test_round_trip_through_the_ema_copy(tmp_path, net):
    cfg, sd = net
    ema = {k: v * 3 for k, v in sd.items()}
    state = {f"net.{k}": v for k, v in sd.items()}
    state.update({f"net_ema.{k}": v for k, v in ema.items()})
    save_dcp(state, tmp_path / "dcp")
    convert(tmp_path / "dcp", tmp_path / "model_ema.pth", preset=cfg, layout="release", ema=True)
    assert_same(torch.load(tmp_path / "model_ema.pth", weights_only=True), {f"net.{k}": v for k, v in ema.items()})
    convert(tmp_path / "model_ema.pth", tmp_path / "c.safetensors", preset=cfg, layout="comfyui")
    assert_same(load_checkpoint(tmp_path / "c.safetensors")[0], ema)


# --- command line --------------------------------------------------------------------------

def run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_info_and_convert_commands(tmp_path, capsys, net):
    cfg, sd = net
    # A training state as .safetensors with pidkern metadata, so the CLI needs no --preset.
    state = {f"net.{k}": v for k, v in sd.items()}
    state.update({f"net_ema.{k}": (v + 1).to(torch.bfloat16) for k, v in sd.items()})
    save_file(state, tmp_path / "train.safetensors", metadata=config_metadata(cfg))
    n_params = sum(v.numel() for v in sd.values())

    rc, out, err = run(capsys, "info", tmp_path / "train.safetensors")
    assert rc == 0, err
    assert "layout: release" in out and "prefix 'net.'" in out and "pixel adaLN whole" in out
    assert f"preset: {cfg.name} (from the file's metadata)" in out
    assert "weights: regular; EMA: an EMA copy is available (--ema)" in out
    assert f"keys: {len(sd)} network tensors" in out and f"net_ema ({len(sd)})" in out
    assert f"dtype: float32 ({len(sd)})" in out and f"parameters: {n_params:,}" in out
    rc, out, err = run(capsys, "info", tmp_path / "train.safetensors", "--ema")
    assert rc == 0, err
    assert "EMA copy (net_ema.)" in out and f"dtype: bfloat16 ({len(sd)})" in out

    rc, out, err = run(capsys, "convert", tmp_path / "train.safetensors", tmp_path / "c.safetensors",
                       "--layout", "comfyui", "--ema")
    assert rc == 0, err
    assert out.strip() == str(tmp_path / "c.safetensors") and "comfyui layout, EMA weights" in err
    rc, out, err = run(capsys, "info", tmp_path / "c.safetensors")
    assert rc == 0, err
    assert "layout: comfyui" in out and "'model.diffusion_model.'" in out and "split into msa/mlp halves" in out
    assert "no EMA copy in the file" in out
    assert_same(load_checkpoint(tmp_path / "c.safetensors")[0], {k: (v + 1).to(torch.bfloat16) for k, v in sd.items()})

    rc, out, err = run(capsys, "convert", tmp_path / "c.safetensors", tmp_path / "r.pth", "--layout", "release")
    assert rc == 0, err
    assert_same(torch.load(tmp_path / "r.pth", weights_only=True),
                {f"net.{k}": (v + 1).to(torch.bfloat16) for k, v in sd.items()})

    # Bad requests exit 2 and name what is wrong.
    rc, out, err = run(capsys, "convert", tmp_path / "c.safetensors", tmp_path / "x.pth", "--layout", "comfyui")
    assert rc == 2 and "x.pth" in err and "comfyui layout is written as .safetensors" in err
    rc, out, err = run(capsys, "info", tmp_path / "c.safetensors", "--ema")
    assert rc == 2 and "c.safetensors: ema=True" in err and "no EMA copy" in err
    rc, out, err = run(capsys, "convert", tmp_path / "c.safetensors", tmp_path / "y.safetensors", "--layout", "ckpt")
    assert rc == 2 and "--layout" in err


# --- bad files ---------------------------------------------------------------------------

def test_bad_comfyui_files(tmp_path, net):
    cfg, sd = net
    good = comfy_file(sd, cfg, "model.diffusion_model.", True)
    half = "model.diffusion_model.pixel_blocks.1.adaLN_modulation_mlp.weight"

    def fails(state, *match):
        save_file(state, tmp_path / "bad.safetensors")
        with pytest.raises(ValueError) as err:
            load_checkpoint(tmp_path / "bad.safetensors", cfg)
        for m in ("bad.safetensors",) + match:
            assert m in str(err.value), (m, str(err.value))

    fails({k: v for k, v in good.items() if k != half}, "adaLN_modulation_msa.weight", "no mlp half",
          "pixel_blocks.1.adaLN_modulation_mlp.weight")
    whole = dict(good)
    whole["model.diffusion_model.pixel_blocks.1.adaLN_modulation.0.weight"] = \
        sd["pixel_blocks.1.adaLN_modulation.0.weight"].to(torch.bfloat16)
    fails(whole, "pixel_blocks.1's adaLN twice")
    extra = dict(good)
    extra["model.diffusion_model.pixel_blocks.0.lora_up.weight"] = torch.zeros(2, 2)
    fails(extra, "unexpected key(s): pixel_blocks.0.lora_up.weight")
    short = dict(good)
    short[half] = short[half][:-cfg.pixel_dim]
    fails(short, "pixel_blocks.1.adaLN_modulation.0.weight: expected")
    both = dict(good)
    both.update({"net." + k[len("model.diffusion_model."):]: v.clone() for k, v in good.items()})
    fails(both, "two entries hold network key")


def test_same_network_names_the_presets_shapes_cannot_tell_apart():
    groups = [("flux-2k", "sd3-2k", "sd3-2kto4k"), ("flux-2kto4k-v1.5", "qwenimage-2kto4k-v1.5")]
    for name, cfg in PRESETS.items():
        group = next((g for g in groups if name in g), (name,))
        assert same_network(cfg) == tuple(n for n in group if n != name), name
