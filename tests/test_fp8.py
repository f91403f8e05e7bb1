"""precision="fp8": the e4m3 GEMM against independent references, the fp8 image against the
float32 reference per preset family, the plan's precision and gemm entries, and the weight
memory of an fp8 model."""
import json
import importlib.util
import warnings

import pytest
import torch

import pidkern
from pidkern import ops
from pidkern.config import tiny
from pidkern.fp8 import Fp8Weight
from pidkern.layers import Fp8Linear
from pidkern.memory import estimate_memory, weight_bytes

warnings.filterwarnings("ignore", message="pidkern.load: no checkpoint")
pytestmark = pytest.mark.filterwarnings("ignore:pidkern.load. no checkpoint")

E4M3 = torch.float8_e4m3fn
# every fused op on its PyTorch math: these tests are about the GEMMs (the kernels have
# their own parity tests, and one test below runs them with fp8 weights)
TORCH_ROUTES = {"attention": "torch", "swiglu": "torch", "gate": "torch", "embed": "torch", "rms_modulate": "torch",
                "pixel_modulate": "torch"}


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def e4m3_rows(t):
    """The scheme from its definition: per row, scale = max|t| / 448 and codes = e4m3(t / scale)."""
    t = t.double()
    s = t.abs().amax(-1, keepdim=True) / 448.0
    return (t / s).float().to(E4M3).double(), s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_is_the_product_of_its_quantized_operands(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 64, generator=g) * torch.logspace(-2, 1, 37)[:, None]).to(dtype)   # rows of every scale
    w = (torch.randn(48, 64, generator=g) / 8).to(dtype)
    b = torch.randn(48, generator=g).to(dtype)
    qw = Fp8Weight.quantize(w)
    y = Fp8Linear(qw, b)(x, "scaled_mm")
    assert y.dtype == dtype and y.shape == (37, 48)
    # exact up to the accumulation and the output's rounding: float64 of the same codes and scales
    cx, sx = e4m3_rows(x.float())
    cw, sw = e4m3_rows(w.float())
    assert torch.equal(qw.data.double(), cw) and torch.allclose(qw.scale.double(), sw, rtol=1e-6)
    exact = (cx * sx) @ (cw * sw).T + b.double()
    out_eps = 2e-6 if dtype == torch.float32 else 2 ** -8
    assert ((y.double() - exact).abs() <= out_eps * exact.abs() + 1e-5).all()
    # and the unquantized product within e4m3's rounding: |x - x'| <= 2^-4 |x| + 2^-10 s
    # per operand (3 mantissa bits, subnormals below 2^-6 * s)
    xd, wd = x.double(), w.double()
    ex, ew = 2 ** -4 * xd.abs() + 2 ** -10 * sx, 2 ** -4 * wd.abs() + 2 ** -10 * sw
    bound = ex @ wd.abs().T + xd.abs() @ ew.T + ex @ ew.T
    err = (y.double() - (xd @ wd.T + b.double())).abs()
    assert (err <= bound + out_eps * exact.abs() + 1e-5).all()
    assert err.max() > 0          # it really is 8-bit


def test_fp8_weight_rules():
    with pytest.raises(ValueError, match=r"weight: shape \(40, 64\)"):
        Fp8Weight.quantize(torch.randn(40, 64))             # N not a multiple of 16: stays native
    w = Fp8Weight.quantize(torch.zeros(16, 32))             # an all-zero row: finite scale, zero codes
    assert torch.isfinite(w.scale).all() and (w.data.float() == 0).all()
    layer = Fp8Linear(w)
    assert layer(torch.randn(3, 32)).abs().max() == 0
    with pytest.raises(ValueError, match="gemm='fp16'"):
        layer(torch.randn(3, 32), "fp16")


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao (the fp8 extra) not installed")
def test_torchao_route_runs_the_same_quantized_product():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 19, 64, generator=g).bfloat16(), torch.randn(32, 64, generator=g).bfloat16()
    qw = Fp8Linear.quantize(w)
    y_ao = qw(x, "torchao")
    y = qw(x, "scaled_mm")
    assert y_ao.shape == y.shape == (2, 19, 32) and y_ao.dtype == torch.bfloat16
    assert rel_l2(y_ao, y) < 1e-2        # same codes; the two differ only in bf16 rounding


def fp8_pair(base, overrides=None, dtype=torch.float32):
    cfg = tiny(base, **(overrides or {}))
    native = pidkern.load(preset=cfg, device="cpu", dtype=dtype)
    eight = pidkern.load(preset=cfg, device="cpu", dtype=dtype, precision="fp8")
    eight.net = native.net          # the same weights
    return cfg, native, eight


@pytest.mark.parametrize("base,latent_hw,overrides", [
    ("flux-2k", (3, 1), {}),                   # v1 (an odd grid: 12 x 4 patches)
    ("flux2-2kto4k-v1.5", (1, 3), {}),         # v1.5
    ("flux2-2k", (1, 3), {}),                  # FLUX.2 latents
    ("siglip-2k", (1, 1), {"patch": 16}),      # SigLIP, 8x
])
def test_fp8_image_against_float32_reference(base, latent_hw, overrides):
    cfg, native, eight = fp8_pair(base, overrides)
    g = torch.Generator().manual_seed(2)
    latent = torch.randn(1, cfg.latent_channels, *latent_hw, generator=g)
    text = torch.randn(1, 8, cfg.text_dim, generator=g)
    ref = native.decode(latent, 0.3, text, steps=4, seed=5, backend="reference")
    before = {k: v.clone() for k, v in native.net.state_dict().items()}
    img = eight.decode(latent, 0.3, text, steps=4, seed=5, plan=TORCH_ROUTES)      # auto: fp8 is the fast path
    assert img.shape == ref.shape and torch.isfinite(img).all()
    err = rel_l2(img, ref)
    assert 1e-4 < err <= 3e-2, err       # 8-bit, and within the bar
    # the reference path is untouched: same network, same image, whatever the precision
    assert all(torch.equal(v, before[k]) for k, v in eight.net.state_dict().items())
    assert torch.equal(eight.decode(latent, 0.3, text, steps=4, seed=5, backend="reference"), ref)


@pytest.mark.skipif(not ops.HAS_TRITON, reason="needs triton (the kernels run under its interpreter)")
def test_fp8_with_the_fused_kernels():
    """The Triton routes (interpreted) with fp8 weights: the gate-up GEMM in fp8 and the
    silu_mul kernel after it, the QKV GEMM in fp8 before the attention kernel."""
    cfg, native, eight = fp8_pair("flux-2k")
    g = torch.Generator().manual_seed(3)
    latent = torch.randn(1, cfg.latent_channels, 1, 2, generator=g)
    text = torch.randn(1, 8, cfg.text_dim, generator=g)
    ref = native.decode(latent, 0.0, text, steps=1, seed=1, backend="reference")
    for plan in ({}, {"attention": "qkv_rope+sdpa", "swiglu": "split"}):
        img = eight.decode(latent, 0.0, text, steps=1, seed=1, plan=plan)
        assert rel_l2(img, ref) <= 3e-2


def test_plan_records_precision_and_gemm(capsys):
    cfg, native, eight = fp8_pair("flux-2k")
    shape = (1, cfg.latent_channels, 1, 2)
    p8, pn = eight.plan(shape), native.plan(shape)
    assert (p8["precision"], p8["gemm"]) == ("fp8", "scaled_mm") and (pn["precision"], pn["gemm"]) == ("native", "native")
    text = str(p8)
    assert "precision" in text and "fp8" in text and "scaled_mm" in text
    assert eight.engine().model.precision == "fp8" and "precision=fp8" in repr(eight)
    latent = torch.zeros(shape)
    with pytest.raises(ValueError, match="precision='native'.*loaded with precision='fp8'"):
        eight.decode(latent, plan={"precision": "native"})
    with pytest.raises(ValueError, match="gemm='scaled_mm'.*precision='native'"):
        native.decode(latent, backend="fast", plan={"gemm": "scaled_mm"})
    with pytest.raises(ValueError, match="plan gemm='native'"):
        eight.decode(latent, plan="gemm=native")
    with pytest.raises(ValueError, match="precision='int8'"):
        pidkern.load(preset=cfg, device="cpu", precision="int8")
    with pytest.raises(ValueError, match="precision='fp16'"):
        pidkern.decode(latent, model=eight, precision="fp16")
    with pytest.raises(ValueError, match="precision='native': model is a Decoder loaded with precision='fp8'"):
        pidkern.decode(latent, model=eight, precision="native")
    with pytest.raises(ValueError, match="plan precision='half'"):
        eight.plan(shape, plan={"precision": "half"})


def test_gemm_race_times_both_routes_and_keeps_one():
    """The CUDA-only race, run here on the CPU with the plan's entry opened by hand."""
    if importlib.util.find_spec("torchao") is None:
        pytest.skip("torchao (the fp8 extra) not installed")
    cfg, _, eight = fp8_pair("flux-2k")
    eng = eight.engine()
    plan = eng.plan(1, 32, 64, 8, TORCH_ROUTES)
    plan.set("gemm", None, "race")
    x = torch.randn(1, 3, 32, 64)
    tab = eng.tables(32, 64, 8)
    heads, y = eng.model.prologue(torch.randn(1, cfg.latent_channels, 1, 2), torch.randn(1, 8, cfg.text_dim), 32, 64,
                                  True)
    eng.model.forward(x, 1.0, heads, y, torch.zeros(1), tab, plan, racing=True)
    assert set(plan.race_ms["gemm"]) == {"scaled_mm", "torchao"}
    assert plan["gemm"] in ("scaled_mm", "torchao") and plan.choices["gemm"][1] == "race"


def test_fp8_weights_halve_the_resident_weight_bytes():
    # the model: flux-2k, bf16 weights
    native, eight = weight_bytes("flux-2k", 2), weight_bytes("flux-2k", 2, "fp8")
    assert 0.5 < eight / native < 0.62
    assert estimate_memory("flux-2k", 1, 2048, 2048) - estimate_memory("flux-2k", 1, 2048, 2048, precision="fp8") \
        == native - eight
    # against a real fp8 model: every tensor the fast path holds on the device, counted
    cfg, _, dec = fp8_pair("flux-2k")
    model = dec.engine().model
    unread = set(model.unread_parameters)
    held = {id(p): p.numel() * p.element_size() for n, p in dec.net.named_parameters() if n not in unread}
    layers = model.layers()
    own = [t for lin in layers for t in lin.owned_tensors()] + [t for pair in model.qk_norms for t in pair]
    for t in own:
        held[id(t)] = t.numel() * t.element_size()
    assert sum(held.values()) == weight_bytes(cfg, 4, "fp8")
    eight = [lin for lin in layers if isinstance(lin, Fp8Linear)]
    assert eight and all(lin.weight.data.dtype == torch.float8_e4m3fn for lin in eight)
    # every fp8 layer's codes and scales are counted, one byte per weight, four per row
    assert all(id(lin.weight.data) in held and id(lin.weight.scale) in held for lin in eight)
    with pytest.raises(ValueError, match="precision='int4'"):
        weight_bytes(cfg, 2, "int4")


def test_cli_info_plan_shows_fp8(capsys):
    from pidkern.cli import main
    assert main(["info", "--plan", "flux-2k", "1024x1024", "--device", "cpu", "--precision", "fp8"]) == 0
    out = capsys.readouterr().out
    assert "precision        fp8" in out and "gemm             scaled_mm" in out


def test_accuracy_tool_reports_every_block_and_group(tmp_path, capsys, monkeypatch):
    """`python -m bench.fp8_accuracy` at its smallest: a row per block with each of its
    groups, an image row per group, and the chosen set within the bar. Run as a user runs
    it on a CPU, without the Triton interpreter (whose bfloat16 decodes are off on the CPU
    with or without fp8, a separate matter)."""
    import json
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    from bench import fp8_accuracy
    from pidkern.fast import FP8_GROUPS
    out = tmp_path / "acc.json"
    assert fp8_accuracy.main(["--preset", "tiny:flux-2k", "--size", "32x32", "--steps", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    cfg = tiny("flux-2k")
    assert [r["block"] for r in res["blocks"]] == [f"patch.{i}" for i in range(cfg.patch_blocks)] + \
        [f"pixel.{i}" for i in range(cfg.pixel_blocks)]
    for r in res["blocks"]:
        kind = r["block"].split(".")[0]
        assert set(r) == {"block", "all", *(g for g in FP8_GROUPS if g.startswith(kind))}
        assert all(0 < r[g]["out"] <= r[g]["update"] < 0.2 for g in r if g != "block")
    rows = {r["layers"]: r for r in res["images"]}
    assert set(rows) == {"none (bf16 fast)", *FP8_GROUPS, "FP8_LAYERS (precision='fp8')", "all"}
    assert rows["FP8_LAYERS (precision='fp8')"]["rel_l2_vs_fp32_ref"] <= 3e-2
    assert all(r["psnr_vs_bf16_fast"] > 20 for r in res["images"])
    assert "largest per block" in capsys.readouterr().out


def test_fp8_plan_races_the_accurate_8bit_attention_routes():
    """On CUDA an fp8 model's attention entries race the native candidates plus the 8-bit
    routes measured within the accuracy bar (int8 QK^T); the e4m3 modes only by override.
    resolve() is pure bookkeeping, so a CUDA plan can be built here; the race itself is
    then run on the CPU with that plan, through FastPiD's dispatch."""
    from pidkern import plan as P
    cfg, native, eight = fp8_pair("flux-2k")
    cuda = torch.device("cuda")
    p8 = P.resolve(cfg, 1, 32, 64, 8, cuda, 4, True, precision="fp8")
    pn = P.resolve(cfg, 1, 32, 64, 8, cuda, 4, True, precision="native")
    for name in ("attention.patch", "attention.pixel"):
        raced = p8.raced(name)
        assert raced[:len(P.CHOICES[name][2])] == P.CHOICES[name][2]
        assert {"int8qk-triton", "prep+int8qk-triton"} <= set(raced)
        assert not {"fp8-triton", "int8-triton", "fp8qk-triton", "prep+cudnn-fp8", "prep+flash3-fp8"} & set(raced)
        assert pn.raced(name) == P.CHOICES[name][2]
    assert P.check_overrides({"attention": "fp8-triton"})["attention.patch"] == "fp8-triton"   # still allowed
    assert "candidates: prep+sdpa, triton, qkv_rope+sdpa" in str(p8) and "int8qk-triton" in str(p8)

    eng = eight.engine()
    plan = eng.plan(1, 32, 64, 8, TORCH_ROUTES)
    plan.set("attention.pixel", None, "race")
    plan.candidates["attention.pixel"] = ("torch", "int8qk-triton")
    x = torch.randn(1, 3, 32, 64)
    heads, y = eng.model.prologue(torch.randn(1, cfg.latent_channels, 1, 2), torch.randn(1, 8, cfg.text_dim), 32, 64,
                                  True)
    eng.model.forward(x, 1.0, heads, y, torch.zeros(1), eng.tables(32, 64, 8), plan, racing=True)
    assert set(plan.race_ms["attention.pixel"]) == {"torch", "int8qk-triton"}
    assert all(isinstance(ms, float) for ms in plan.race_ms["attention.pixel"].values())


def test_attention_image_tool(tmp_path, capsys):
    """bench.fp8_attention_image at its smallest: the fp8 model with int8 QK^T attention stays
    within the bar and near the same model on PyTorch attention."""
    from bench import fp8_attention_image
    out = tmp_path / "a.json"
    assert fp8_attention_image.main(["--preset", "tiny:flux-2k", "--size", "32x32", "--modes", "torch,int8qk-triton",
                                     "--json", str(out)]) == 0
    rows = {r["attention"]: r["rel_l2_vs_fp32_ref"] for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"torch", "int8qk-triton"} and all(0 < e <= 3e-2 for e in rows.values())
    assert abs(rows["int8qk-triton"] - rows["torch"]) < 5e-3
    assert "int8qk-triton" in capsys.readouterr().out
