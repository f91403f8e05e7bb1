"""ComfyUI-quantized PiD files: every format of ComfyUI's QUANT_ALGOS, quantized by
comfy-kitchen itself and written with ComfyUI's markers (per-layer `.comfy_quant` tensors,
the header's `_quantization_metadata`, the older scaled-fp8 form), loads with its preset
detected, and decodes as the network holding comfy-kitchen's own dequantized weights. Bad
markers and scales are errors naming the layer and the format."""
import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

import pidkern
from pidkern import comfy_quant
from pidkern.api import random_net
from pidkern.checkpoint import inspect_checkpoint, load_checkpoint, to_layout
from pidkern.int8 import hadamard
from pidkern.mxfp8 import swizzle, unswizzle
from pidkern.config import PRESETS, tiny

ck = pytest.importorskip("comfy_kitchen", reason="comfy-kitchen (the comfy extra) is the reference")
from comfy_kitchen.tensor import QuantizedTensor, get_layout_class  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:pidkern.load. no checkpoint")
CPU = torch.device("cpu")
PREFIX = "model.diffusion_model."
# format -> (comfy-kitchen layout, its quantize options, the marker ComfyUI writes, widths K it takes)
CASES = {
    "float8_e4m3fn": ("TensorCoreFP8Layout", {}, {"format": "float8_e4m3fn"}, 1),
    "float8_e5m2": ("TensorCoreFP8Layout", {"dtype": torch.float8_e5m2}, {"format": "float8_e5m2"}, 1),
    "mxfp8": ("TensorCoreMXFP8Layout", {}, {"format": "mxfp8"}, 1),
    "nvfp4": ("TensorCoreNVFP4Layout", {}, {"format": "nvfp4"}, 16),
    "int8_tensorwise": ("TensorWiseINT8Layout", {}, {"format": "int8_tensorwise"}, 1),
    "int8_convrot": ("TensorWiseINT8Layout", {"per_channel": True, "convrot": True, "convrot_groupsize": 16},
                     {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 16}, 16),
    "convrot_w4a4": ("TensorCoreConvRotW4A4Layout", {"convrot_groupsize": 64},
                     {"format": "convrot_w4a4", "convrot_groupsize": 64}, 64),
    "asym_w4a8_int8": ("AsymW4A8Int8Layout", {"group_size": 16, "convrot_groupsize": 16},
                       {"format": "asym_w4a8_int8", "group_size": 16, "convrot_groupsize": 16}, 16),
    "awq_w4a16": (None, {}, {"format": "awq_w4a16", "group_size": 16}, 16),
}


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def is_block_linear(key, v):
    return key.endswith(".weight") and v.dim() == 2 and key.split(".", 1)[0] in ("patch_blocks", "pixel_blocks")


def awq(w, group):
    """An AWQ W4A16 weight built from the layout's rule: uint4 codes q, two per byte (low
    nibble first), W = (q - 8) * scale + zero per K-group, scale and zero stored [K/G, N]."""
    n, k = w.shape
    g = w.view(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    zero = lo + 8 * scale
    q = ((g - zero.unsqueeze(-1)) / scale.unsqueeze(-1) + 8).round().clamp(0, 15).to(torch.uint8).view(n, k)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).view(torch.int8)
    cls = get_layout_class("TensorCoreAWQW4A16Layout")
    params = cls.Params(scale=scale.t().contiguous(), zeros=zero.t().contiguous(), group_size=group,
                        orig_dtype=torch.float32, orig_shape=(n, k))
    qt = QuantizedTensor(packed, "TensorCoreAWQW4A16Layout", params)
    return qt.state_dict("weight"), qt.dequantize()


def comfy_quantized(cfg, case, form="marker", seed=3):
    """(file tensors, header metadata, the network's state with comfy-kitchen's dequantized
    weights): the block Linears a format takes, in ComfyUI's key layout."""
    layout, opts, marker, width = CASES[case]
    state = {k: v.clone() for k, v in random_net(cfg, CPU, torch.float32, seed=seed).state_dict().items()}
    file = to_layout(state, cfg, "comfyui")          # ComfyUI's keys, pixel adaLN split in halves
    layers = {}
    for key in list(file):
        net_key = key[len(PREFIX):]
        w = file[key]
        if not is_block_linear(net_key.replace("adaLN_modulation_msa", "adaLN_modulation.0").replace(
                "adaLN_modulation_mlp", "adaLN_modulation.0"), w) or w.shape[1] % width:
            continue
        if layout is None:
            tensors, deq = awq(w, marker["group_size"])
        else:
            with ck.registry.use_backend("eager"):
                qt = QuantizedTensor.from_float(w, layout, **opts)
                tensors, deq = qt.state_dict("weight"), qt.dequantize().float()
        layer = key[: -len(".weight")]
        del file[key]
        file.update({f"{layer}.{suffix}": t for suffix, t in tensors.items()})
        layers[layer] = (marker, deq)
    meta = {}
    if form == "marker":
        for layer, (m, _) in layers.items():
            file[f"{layer}.comfy_quant"] = comfy_quant.marker_tensor(m)
    elif form == "nested":      # the options inside "params"
        for layer, (m, _) in layers.items():
            top = {"format": m["format"]}
            rest = {k: v for k, v in m.items() if k != "format"}
            file[f"{layer}.comfy_quant"] = comfy_quant.marker_tensor({**top, "params": rest} if rest else top)
    else:                       # the header form
        meta["_quantization_metadata"] = json.dumps({"format_version": "1.0",
                                                     "layers": {layer: m for layer, (m, _) in layers.items()}})
    # the reference: the network's state with comfy-kitchen's dequantized weights in place
    deq_file = {k: v for k, v in to_layout(state, cfg, "comfyui").items()}
    for layer, (_, d) in layers.items():
        deq_file[f"{layer}.weight"] = d
    from pidkern.checkpoint import merge_pixel_adaln
    ref = {}
    for k, v in deq_file.items():
        name = k[len(PREFIX):]
        if ".adaLN_modulation_msa." in name:
            block, _, param = name.partition(".adaLN_modulation_msa.")
            ref[f"{block}.adaLN_modulation.0.{param}"] = merge_pixel_adaln(
                v, deq_file[f"{PREFIX}{block}.adaLN_modulation_mlp.{param}"], cfg)
        elif ".adaLN_modulation_mlp." not in name:
            ref[name] = v
    return file, meta, ref, layers


@pytest.fixture
def tiny_preset(monkeypatch):
    """A tiny v1.5 network registered as a preset, so its preset is detected from shapes
    as a released one's is."""
    cfg = tiny("flux-2kto4k-v1.5")
    monkeypatch.setitem(PRESETS, cfg.name, cfg)
    return cfg


def decode(dec, cfg):
    g = torch.Generator().manual_seed(4)
    latent = torch.randn(1, cfg.latent_channels, 1, 2, generator=g)
    text = torch.randn(1, 6, cfg.text_dim, generator=g)
    return dec.decode(latent, 0.2, text, steps=2, seed=1, backend="reference")


@pytest.mark.parametrize("case", list(CASES))
def test_every_format_loads_and_decodes_as_comfy_kitchen_dequantizes(tmp_path, tiny_preset, case):
    cfg = tiny_preset
    file, meta, ref, layers = comfy_quantized(cfg, case)
    assert layers, "the case quantized no layer"
    path = tmp_path / f"pid_{case}.safetensors"
    save_file(file, str(path), metadata=meta)

    info = inspect_checkpoint(path)
    assert info.config == cfg and info.preset_from == "shapes" and info.layout == "comfyui"
    formats = {f for group in info.quantized.values() for f in group}
    assert formats == {"int8_tensorwise+convrot16" if case == "int8_convrot" else CASES[case][2]["format"]}
    assert sum(n for group in info.quantized.values() for n in group.values()) == len(layers)

    state, got_cfg = load_checkpoint(path)
    assert got_cfg == cfg
    for k, v in ref.items():
        if k in state and not k.startswith("lq_proj.lq_aux_rgb_head."):
            assert state[k].shape == v.shape, k
    for layer, (_, d) in layers.items():
        name = layer[len(PREFIX):]
        if "adaLN_modulation_" not in name:
            assert rel_l2(state[name + ".weight"], d) <= 1e-6, name     # the weight itself, exactly

    dec = pidkern.load(path, device="cpu", dtype=torch.float32)
    assert dec.config == cfg
    oracle = pidkern.load(preset=cfg, random=True, device="cpu", dtype=torch.float32)
    oracle.net.load_state_dict({k: v for k, v in ref.items()}, strict=False)
    img, want = decode(dec, cfg), decode(oracle, cfg)
    assert rel_l2(img, want) <= 1e-5


@pytest.mark.parametrize("form", ["nested", "metadata"])
def test_marker_forms(tmp_path, tiny_preset, form):
    cfg = tiny_preset
    file, meta, ref, layers = comfy_quantized(cfg, "int8_convrot", form=form)
    path = tmp_path / "pid.safetensors"
    save_file(file, str(path), metadata=meta)
    state, _ = load_checkpoint(path)
    name = next(iter(layers))
    assert rel_l2(state[name[len(PREFIX):] + ".weight"], layers[name][1]) <= 1e-6


def test_scaled_fp8_files(tmp_path, tiny_preset):
    """The older scaled-fp8 form: a `scaled_fp8` entry and `<layer>.scale_weight` per layer,
    read as float8_e4m3fn with that per-tensor scale (ComfyUI's convert_old_quants)."""
    cfg = tiny_preset
    state = random_net(cfg, CPU, torch.float32, seed=1).state_dict()
    file = dict(to_layout(state, cfg, "comfyui"))
    key = PREFIX + "patch_blocks.0.attn.qkv_x.weight"
    w = file[key]
    scale = w.abs().amax() / 448
    file[key] = ck.quantize_per_tensor_fp8(w, scale, torch.float8_e4m3fn)
    file[key.replace(".weight", ".scale_weight")] = scale
    file[key.replace(".weight", ".scale_input")] = torch.tensor(1.0)
    file[PREFIX + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / "pid_fp8_scaled.safetensors"
    save_file(file, str(path))
    got, _ = load_checkpoint(path)
    want = ck.dequantize_per_tensor_fp8(file[key], scale, torch.float32)
    assert torch.equal(got["patch_blocks.0.attn.qkv_x.weight"], want)


def bad_file(tmp_path, cfg, edit):
    file, meta, _, layers = comfy_quantized(cfg, "int8_convrot")
    layer = PREFIX + "patch_blocks.0.attn.qkv_x"
    edit(file, layer)
    path = tmp_path / "bad.safetensors"
    save_file(file, str(path), metadata=meta)
    return path, layer


@pytest.mark.parametrize("edit,message", [
    (lambda f, l: f.__setitem__(f"{l}.comfy_quant", comfy_quant.marker_tensor({"convrot": True})),
     r"names no \"format\""),
    (lambda f, l: f.__setitem__(f"{l}.comfy_quant", comfy_quant.marker_tensor({"format": "int3_magic"})),
     r"unknown quantization format 'int3_magic'"),
    (lambda f, l: f.pop(f"{l}.weight_scale"), r"format 'int8_tensorwise'.*missing scale tensor"),
    (lambda f, l: f.__setitem__(f"{l}.weight_scale", torch.ones(7)),
     r"format 'int8_tensorwise'.*scale .*weight_scale' has shape \[7\]"),
    (lambda f, l: f.__setitem__(f"{l}.comfy_quant", comfy_quant.marker_tensor(
        {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256})),
     r"format 'int8_tensorwise'.*convrot_groupsize=256 does not divide the layer's input width K=64"),
    (lambda f, l: f.__setitem__(f"{l}.comfy_quant", comfy_quant.marker_tensor(
        {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 32})),
     r"convrot_groupsize=32; .*power of 4"),
    (lambda f, l: f.__setitem__(f"{l}.weight", f[f"{l}.weight"].float()),
     r"format 'int8_tensorwise'.*stored as float32; the format stores int8"),
    (lambda f, l: f.__setitem__(f"{l}.comfy_quant", torch.tensor(list(b"{not json"), dtype=torch.uint8)),
     r"not UTF-8 JSON"),
])
def test_bad_markers_and_scales_name_the_layer(tmp_path, tiny_preset, edit, message):
    path, layer = bad_file(tmp_path, tiny_preset, edit)
    with pytest.raises(comfy_quant.QuantFormatError, match=message) as e:
        load_checkpoint(path)
    assert repr(layer) in str(e.value) and str(path) in str(e.value)
    with pytest.raises(comfy_quant.QuantFormatError):
        inspect_checkpoint(path)          # the index alone already refuses it


def test_mxfp8_scale_shape_and_orphan_marker(tmp_path, tiny_preset):
    cfg = tiny_preset
    file, meta, _, _ = comfy_quantized(cfg, "mxfp8")
    layer = PREFIX + "patch_blocks.0.mlp_x.w2"
    file[f"{layer}.weight_scale"] = file[f"{layer}.weight_scale"][:64]
    save_file(file, str(tmp_path / "a.safetensors"))
    with pytest.raises(comfy_quant.QuantFormatError, match=r"format 'mxfp8'.*expected \[128, 4\]"):
        load_checkpoint(tmp_path / "a.safetensors")
    file, _, _, _ = comfy_quantized(cfg, "mxfp8")
    file[PREFIX + "nothing_here.comfy_quant"] = comfy_quant.marker_tensor({"format": "mxfp8"})
    save_file(file, str(tmp_path / "b.safetensors"))
    with pytest.raises(comfy_quant.QuantFormatError, match=r"'model.diffusion_model.nothing_here'.*no "):
        load_checkpoint(tmp_path / "b.safetensors")


def test_hadamard_and_swizzle_match_comfy_kitchen():
    from comfy_kitchen.float_utils import to_blocked
    from comfy_kitchen.tensor.int8_utils import _build_hadamard
    for size in (4, 16, 64, 256):
        assert torch.equal(hadamard(size), _build_hadamard(size))
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 255, (37, 9), generator=g, dtype=torch.uint8)
    blocked = to_blocked(s, flatten=False)
    assert torch.equal(swizzle(s), blocked)
    assert torch.equal(unswizzle(blocked, 37, 9), s)


@pytest.mark.parametrize("fmt,opts", [("float8_e4m3fn", {}), ("int8_tensorwise", {}),
                                      ("int8_tensorwise", {"convrot": 16}), ("mxfp8", {})])
def test_writers_match_comfy_kitchen_bit_for_bit(fmt, opts):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 48, generator=g) * torch.logspace(-2, 1, 48)
    tensors, conf = comfy_quant.quantize_weight(w, fmt, **opts)
    layout, kw = {"float8_e4m3fn": ("TensorCoreFP8Layout", {}), "mxfp8": ("TensorCoreMXFP8Layout", {}),
                  "int8_tensorwise": ("TensorWiseINT8Layout", {"per_channel": True})}[fmt]
    if opts:
        kw.update(convrot=True, convrot_groupsize=opts["convrot"])
    with ck.registry.use_backend("eager"):
        want = QuantizedTensor.from_float(w, layout, **kw).state_dict("weight")
    assert set(want) == set(tensors)
    for k, v in want.items():
        got = tensors[k]
        if v.dtype.is_floating_point and v.dtype.itemsize == 1:
            v, got = v.view(torch.uint8), got.view(torch.uint8)
        assert got.shape == v.shape and torch.equal(got.to(v.dtype), v), k
    assert conf["format"] == fmt and conf.get("convrot", False) == bool(opts)


def test_info_names_the_format_per_layer_group(tmp_path, tiny_preset, capsys):
    from pidkern.cli import main
    file, meta, _, layers = comfy_quantized(tiny_preset, "int8_convrot")
    # a second format on one group, as mixed files have
    fp8_layer = PREFIX + "pixel_blocks.0.mlp.fc2"
    for suffix in ("weight", "weight_scale", "comfy_quant"):
        file.pop(f"{fp8_layer}.{suffix}", None)
    w = random_net(tiny_preset, CPU, torch.float32, seed=3).state_dict()["pixel_blocks.0.mlp.fc2.weight"]
    with ck.registry.use_backend("eager"):
        file.update({f"{fp8_layer}.{k}": v for k, v in
                     QuantizedTensor.from_float(w, "TensorCoreFP8Layout").state_dict("weight").items()})
    file[f"{fp8_layer}.comfy_quant"] = comfy_quant.marker_tensor({"format": "float8_e4m3fn"})
    path = tmp_path / "pid_int8_convrot.safetensors"
    save_file(file, str(path), metadata=meta)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    blocks = tiny_preset.patch_blocks
    assert f"quantized (ComfyUI markers): {len(layers)} Linears" in out
    assert f"  patch.qkv: int8_tensorwise+convrot16 ({2 * blocks})" in out
    assert "  pixel.mlp: float8_e4m3fn (1), int8_tensorwise+convrot16 (3)" in out
    dst = tmp_path / "again.safetensors"
    assert main(["convert", str(path), str(dst), "--layout", "comfyui", "--quantize", "int8_tensorwise",
                 "--convrot", "16"]) == 0
    capsys.readouterr()
    assert inspect_checkpoint(dst).quantized["pixel.mlp"] == {"int8_tensorwise+convrot16": 4}


def test_convert_dequantizes_keeps_and_quantizes(tmp_path, tiny_preset):
    from pidkern.checkpoint import convert
    cfg = tiny_preset
    file, meta, ref, _ = comfy_quantized(cfg, "int8_convrot")
    src = tmp_path / "pid_int8_convrot.safetensors"
    save_file(file, str(src), metadata=meta)
    # the bf16 pidkern layout
    dst, _ = convert(src, tmp_path / "bf16.safetensors")
    state, _ = load_checkpoint(dst)
    assert all(v.dtype == torch.bfloat16 for v in state.values() if v.is_floating_point())
    key = "patch_blocks.1.mlp_x.w2.weight"
    assert torch.equal(state[key], ref[key].bfloat16())
    # written back as stored: every byte of every quantized layer, with its marker
    kept, _ = convert(src, tmp_path / "kept.safetensors", layout="comfyui", quantize="keep")
    from safetensors import safe_open
    with safe_open(str(kept), "pt") as f:
        for k, v in file.items():
            if k.endswith(("comfy_quant", "weight_scale")) or v.dtype == torch.int8:
                got = f.get_tensor(k)
                assert torch.equal(got, v) if not k.endswith("comfy_quant") else \
                    json.loads(bytes(got.tolist())) == json.loads(bytes(v.tolist())), k
    again, _ = load_checkpoint(kept)
    assert torch.equal(again[key], load_checkpoint(src)[0][key])
    # a plain checkpoint quantized by pidkern's writer, read back by comfy-kitchen's dequantize
    plain = random_net(cfg, CPU, torch.float32, seed=2).state_dict()
    from pidkern.checkpoint import save_checkpoint
    base = save_checkpoint(plain, cfg, tmp_path / "plain.safetensors")
    for fmt, convrot in (("int8_tensorwise", 64), ("mxfp8", None), ("float8_e4m3fn", None)):
        q, _ = convert(base, tmp_path / f"{fmt}.safetensors", layout="comfyui", quantize=fmt, convrot=convrot)
        info = inspect_checkpoint(q)
        assert info.quantized and all(g.startswith(("patch.", "pixel.")) for g in info.quantized)
        loaded, _ = load_checkpoint(q)
        with safe_open(str(q), "pt") as f:
            layer = PREFIX + "patch_blocks.0.mlp_x.w1"
            marker = json.loads(bytes(f.get_tensor(f"{layer}.comfy_quant").tolist()))
            layout = {"int8_tensorwise": "TensorWiseINT8Layout", "mxfp8": "TensorCoreMXFP8Layout",
                      "float8_e4m3fn": "TensorCoreFP8Layout"}[fmt]
            cls = get_layout_class(layout)
            extra = {"convrot": True, "convrot_groupsize": 64} if marker.get("convrot") else {}
            scale = f.get_tensor(f"{layer}.weight_scale")
            params = cls.Params(scale=scale, orig_dtype=torch.float32, orig_shape=(96, 64), **extra)
            want = QuantizedTensor(f.get_tensor(f"{layer}.weight"), layout, params).dequantize()
        assert (fmt == "int8_tensorwise") == bool(marker.get("convrot"))
        assert rel_l2(loaded["patch_blocks.0.mlp_x.w1.weight"], want) <= 1e-6
        assert rel_l2(loaded["patch_blocks.0.mlp_x.w1.weight"], plain["patch_blocks.0.mlp_x.w1.weight"]) < 0.05
    with pytest.raises(ValueError, match="quantize='int8_tensorwise': quantized layers are written in the comfyui"):
        convert(base, tmp_path / "x.safetensors", quantize="int8_tensorwise")
    with pytest.raises(ValueError, match="convrot=64: the ConvRot rotation is an int8_tensorwise option"):
        convert(base, tmp_path / "x.safetensors", layout="comfyui", quantize="mxfp8", convrot=64)


@pytest.mark.parametrize("fmt,layout,kw", [("float8_e4m3fn", "TensorCoreFP8Layout", {}),
                                           ("int8_tensorwise", "TensorWiseINT8Layout", {"per_channel": True}),
                                           ("mxfp8", "TensorCoreMXFP8Layout", {}),
                                           ("nvfp4", "TensorCoreNVFP4Layout", {})])
@pytest.mark.parametrize("shape", [(48, 64), (40, 96), (136, 320)])
def test_stored_bytes_is_what_comfy_kitchen_stores(fmt, layout, kw, shape):
    """The memory model's bytes per layer equal the bytes of comfy-kitchen's own tensors."""
    w = torch.randn(*shape)
    with ck.registry.use_backend("eager"):
        stored = QuantizedTensor.from_float(w, layout, **kw).state_dict("weight")
    assert comfy_quant.stored_bytes(shape, fmt) == sum(t.numel() * t.element_size() for t in stored.values())
    assert comfy_quant.stored_bytes(shape, None) == 2 * w.numel()


def test_comfy_files_table():
    from bench import comfy_files
    table = {(r[0].split(" (")[0], r[2].split(" ")[0]): r[4] for r in comfy_files.rows()}
    assert table[("PiD v1", "mxfp8")] < 0.6 * table[("PiD v1", "bfloat16")]
    assert table[("PiD v1.5", "int8_tensorwise")] < 0.6 * table[("PiD v1.5", "bfloat16")]
    assert 2.5 < table[("caption encoder", "float8_e4m3fn")] < table[("caption encoder", "bfloat16")] < 5.3


def test_load_quantized_gives_the_stored_codes(tmp_path, tiny_preset):
    from pidkern.checkpoint import load_quantized
    cfg = tiny_preset
    file, meta, _, layers = comfy_quantized(cfg, "int8_convrot")
    path = tmp_path / "pid.safetensors"
    save_file(file, str(path), metadata=meta)
    state, got_cfg, stored = load_quantized(path)
    assert got_cfg == cfg
    # the split pixel adaLN's halves come back merged under the network's key
    assert set(stored) == {layer[len(PREFIX):] + ".weight" for layer in layers if "adaLN_modulation_m" not in layer} \
        | {f"pixel_blocks.{i}.adaLN_modulation.0.weight" for i in range(cfg.pixel_blocks)}
    key = "patch_blocks.0.attn.qkv_x.weight"
    w = stored[key].int8(torch.float32)
    assert torch.equal(w.data, file[PREFIX + key]) and w.convrot == 16
    assert torch.equal(w.dequantize(), state[key])
    with pytest.raises(ValueError, match="is not float8_e4m3fn"):
        stored[key].fp8_rows()
    file, meta, _, _ = comfy_quantized(cfg, "float8_e4m3fn")
    save_file(file, str(path), metadata=meta)
    _, _, stored = load_quantized(path)
    codes, rows = stored[key].fp8_rows()
    assert codes.dtype == torch.float8_e4m3fn and rows.shape == (codes.shape[0], 1)
    assert torch.equal(codes.float() * rows, stored[key].dequantize())


def test_split_pixel_adaln_halves_merge_exactly(tmp_path, tiny_preset):
    from pidkern.checkpoint import load_quantized
    file, meta, _, _ = comfy_quantized(tiny_preset, "int8_convrot")
    path = tmp_path / "pid.safetensors"
    save_file(file, str(path), metadata=meta)
    state, _, stored = load_quantized(path)
    key = "pixel_blocks.1.adaLN_modulation.0.weight"
    w = stored[key].int8(torch.float32)
    assert w.shape == state[key].shape and torch.equal(w.dequantize(), state[key])
    half = w.rows(slice(0, 10))
    assert torch.equal(half.dequantize(), state[key][:10])
    both = type(w).cat([half, w.rows([3, 1])])
    assert torch.equal(both.dequantize(), torch.cat([state[key][:10], state[key][[3, 1]]]))


def test_mxfp8_activation_blocks_and_weight_are_comfy_kitchens():
    """The operands of the native mxfp8 GEMM: an activation quantized per block of 32 (rows
    and K padded to 32) gives comfy-kitchen's codes and swizzled scales bit for bit, and
    a stored weight dequantizes as comfy-kitchen's. (The block-scaled GEMM itself needs
    compute capability 10.0 / 12.0: on the CPU it is refused, never faked.)"""
    from pidkern import mxfp8
    g = torch.Generator().manual_seed(8)
    x = torch.randn(45, 70, generator=g) * torch.logspace(-3, 2, 70)
    x[3] = 0
    codes, exps = mxfp8.quantize_blocks(x)
    want_codes, want_scales = ck.quantize_mxfp8(x, pad_32x=True)
    assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8))
    assert torch.equal(swizzle(exps), want_scales.view(torch.uint8))
    w = mxfp8.Mxfp8Weight(want_codes, want_scales, (45, 70), torch.float32)
    assert torch.equal(w.dequantize(), ck.dequantize_mxfp8(want_codes, want_scales, torch.float32)[:45, :70])
    assert "no block-scaled fp8" in mxfp8.mx_supported("cpu")
    with pytest.raises(RuntimeError, match="mxfp8 GEMM: cpu has no block-scaled fp8 GEMM"):
        mxfp8.linear(torch.randn(2, 70), w)
