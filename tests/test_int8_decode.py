"""precision="int8" on the fast path, and ComfyUI's quantized files run in their own
precision: the int8 image against the float32 reference per preset family (the bound
measured here and kept in docs/int8.md), a file's own codes and scales in the fast model's
layers (no requantisation), the plan's gemm entry, the CLI and the weight memory."""
import warnings

import pytest
import torch
from safetensors.torch import save_file

import pidkern
from pidkern import comfy_quant, ops
from pidkern.checkpoint import to_layout
from pidkern.config import PRESETS, tiny
from pidkern.layers import Fp8Linear, Int8Linear, NativeLinear
from pidkern.memory import weight_bytes

warnings.filterwarnings("ignore", message="pidkern.load: no checkpoint")
pytestmark = pytest.mark.filterwarnings("ignore:pidkern.load. no checkpoint")
TORCH_ROUTES = {"attention": "torch", "swiglu": "torch", "gate": "torch", "embed": "torch", "rms_modulate": "torch",
                "pixel_modulate": "torch"}
# the int8 image's bound: measured 8.1e-3 to 9.3e-3 on these four (docs/int8.md), fp8's
# yardstick is 3e-2
INT8_BOUND = 2e-2
PREFIX = "model.diffusion_model."


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(cfg, latent_hw, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, cfg.latent_channels, *latent_hw, generator=g), torch.randn(1, 8, cfg.text_dim, generator=g)


@pytest.mark.parametrize("base,latent_hw,overrides", [
    ("flux-2k", (3, 1), {}),
    ("flux2-2kto4k-v1.5", (1, 3), {}),
    ("flux2-2k", (1, 3), {}),
    ("siglip-2k", (1, 1), {"patch": 16}),
])
def test_int8_image_against_float32_reference(base, latent_hw, overrides):
    cfg = tiny(base, **overrides)
    native = pidkern.load(preset=cfg, device="cpu", dtype=torch.float32)
    eight = pidkern.load(preset=cfg, device="cpu", dtype=torch.float32, precision="int8")
    eight.net = native.net
    latent, text = inputs(cfg, latent_hw)
    ref = native.decode(latent, 0.3, text, steps=4, seed=5, backend="reference")
    img = eight.decode(latent, 0.3, text, steps=4, seed=5, plan=TORCH_ROUTES)
    assert img.shape == ref.shape and torch.isfinite(img).all()
    assert 1e-4 < rel_l2(img, ref) <= INT8_BOUND
    model = eight.engine().model
    assert all(isinstance(l, Int8Linear) for l in model.layers())        # all nine groups
    assert model.patch[0].w13_x.weight.convrot == 64                      # ConvRot by width


@pytest.mark.skipif(not ops.HAS_TRITON, reason="needs triton (the kernels run under its interpreter)")
def test_int8_with_the_triton_gemm_and_fused_kernels():
    cfg = tiny("flux-2k")
    native = pidkern.load(preset=cfg, device="cpu", dtype=torch.float32)
    eight = pidkern.load(preset=cfg, device="cpu", dtype=torch.float32, precision="int8")
    eight.net = native.net
    latent, text = inputs(cfg, (1, 2), seed=3)
    ref = native.decode(latent, 0.0, text, steps=1, seed=1, backend="reference")
    for plan in ({"gemm": "int8-triton"}, {"gemm": "int_mm", "attention": "qkv_rope+sdpa", "swiglu": "split"}):
        img = eight.decode(latent, 0.0, text, steps=1, seed=1, plan=plan)
        assert rel_l2(img, ref) <= INT8_BOUND


def test_plan_gemm_entry_for_int8(capsys):
    dec = pidkern.load(preset=tiny("flux-2k"), device="cpu", dtype=torch.float32, precision="int8")
    plan = dec.plan((1, 16, 1, 2))
    assert plan["precision"] == "int8" and plan["gemm"] == "int_mm"
    with pytest.raises(ValueError, match="plan gemm='scaled_mm': the model was loaded with precision='int8', whose "
                                         "GEMMs are int_mm or int8-triton"):
        dec.plan((1, 16, 1, 2), plan={"gemm": "scaled_mm"})
    from pidkern.cli import main
    assert main(["info", "--plan", "flux-2k", "1024x1024", "--device", "cpu", "--precision", "int8"]) == 0
    out = capsys.readouterr().out
    assert "precision        int8" in out and "gemm             int_mm" in out


def test_int8_weights_take_less_than_fp8s():
    native, eight8, int8 = (weight_bytes("flux-2k", 2, p) for p in ("native", "fp8", "int8"))
    assert int8 < eight8 < native
    assert abs(int8 / 2**30 - 0.94) < 0.01          # docs/int8.md's figure


def quantized_file(tmp_path, cfg, fmt, monkeypatch):
    """A tiny ComfyUI file with the blocks' Linears quantized by pidkern's writer (whose codes
    equal comfy-kitchen's, tests/test_comfy_quant.py)."""
    monkeypatch.setitem(PRESETS, cfg.name, cfg)
    from pidkern.api import random_net
    state = random_net(cfg, "cpu", torch.float32, seed=4).state_dict()
    file = dict(to_layout(state, cfg, "comfyui"))
    for k in list(file):
        v = file[k]
        name = k[len(PREFIX):]
        if v.dim() == 2 and k.endswith(".weight") and name.split(".", 1)[0] in ("patch_blocks", "pixel_blocks"):
            rot = 16 if fmt == "int8_tensorwise" and v.shape[1] % 16 == 0 else None
            parts, conf = comfy_quant.quantize_weight(v, fmt, convrot=rot)
            layer = k[: -len(".weight")]
            file.update({f"{layer}.{r}": t for r, t in parts.items()})
            file[f"{layer}.comfy_quant"] = comfy_quant.marker_tensor(conf)
    path = tmp_path / f"pid_{fmt}.safetensors"
    save_file(file, str(path))
    return path, file


@pytest.mark.parametrize("fmt,precision,layer", [("int8_tensorwise", "int8", Int8Linear),
                                                 ("float8_e4m3fn", "fp8", Fp8Linear),
                                                 ("mxfp8", "native", NativeLinear)])
def test_a_quantized_file_runs_in_its_own_precision(tmp_path, monkeypatch, fmt, precision, layer):
    cfg = tiny("flux-2kto4k-v1.5")
    path, file = quantized_file(tmp_path, cfg, fmt, monkeypatch)
    dec = pidkern.load(path, device="cpu", dtype=torch.float32)
    assert dec.precision == precision
    model = dec.engine().model
    qkv = model.patch[0].qkv_x
    assert isinstance(qkv, layer)
    if precision != "native":       # the file's own codes, not requantized ones
        assert torch.equal(qkv.weight.data.view(torch.uint8), file[PREFIX + "patch_blocks.0.attn.qkv_x.weight"]
                           .view(torch.uint8))
        w13 = model.patch[1].w13_x.weight
        w1 = file[PREFIX + "patch_blocks.1.mlp_x.w1.weight"]
        assert torch.equal(w13.data[: w1.shape[0]].view(torch.uint8), w1.view(torch.uint8))
    if precision == "int8":         # the regrouped modulation rows: the file's rows, each with its scale
        pre = model.pixel[0].mod_pre.weight
        full = dec.net.pixel_blocks[0].adaLN_modulation[0].weight
        assert torch.allclose(pre.dequantize(torch.float32), full[model._modulation_rows()[0]], rtol=0, atol=1e-6)
    elif precision == "fp8":        # fp8's groups are the patch GEMMs: the file's pixel layers run dequantized
        assert isinstance(model.pixel[0].mod_pre, NativeLinear)
    latent, text = inputs(cfg, (1, 2))
    ref = dec.decode(latent, 0.3, text, steps=2, seed=5, backend="reference")    # the exact dequantization
    img = dec.decode(latent, 0.3, text, steps=2, seed=5, plan=TORCH_ROUTES, backend="fast")
    assert rel_l2(img, ref) <= (INT8_BOUND if precision == "int8" else 3e-2)
    forced = pidkern.load(path, device="cpu", dtype=torch.float32, precision="native")
    assert forced.precision == "native"
    if precision == "int8":         # pidkern.decode's cached decoders: the file's own, and a forced native one
        from pidkern import api
        monkeypatch.setattr(api, "_cache", {})
        for p in (None, "native"):
            pidkern.decode(latent, 0.3, model=str(path), device="cpu", dtype=torch.float32, precision=p, text=text,
                           steps=1, backend="reference")
        assert sorted(d.precision for d in api._cache.values()) == ["int8", "native"]
    how = dec.plan((1, 16, 1, 2)).choices["precision"][1]
    if fmt == "mxfp8":              # the plan says how an mxfp8 file runs here
        assert "the file's mxfp8 Linears dequantized to float32 (cpu has no block-scaled fp8 GEMM)" in how
    else:
        assert how == "load"
