"""precision="int8"'s GEMM math (pidkern.int8) against comfy-kitchen and float64: the
per-token activation codes, the ConvRot rotation, the int32 product of the same
quantized operands, and a file's stored weights run as stored."""
import pytest
import torch

from pidkern import int8
from pidkern.int8 import Int8Weight, hadamard, rotate_groups

ck = pytest.importorskip("comfy_kitchen", reason="comfy-kitchen (the comfy extra) is the reference")
from comfy_kitchen.backends.eager import quantization as ck_eager  # noqa: E402
from comfy_kitchen.tensor import QuantizedTensor  # noqa: E402
from comfy_kitchen.tensor.int8_utils import _build_hadamard, _rotate_activation  # noqa: E402


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def rows_of_every_scale(m, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 2, m)[:, None]
    x[0] = 0                                   # an all-zero token
    x[1, 3] = 50.0                             # an outlier
    return x


def test_activation_codes_are_comfy_kitchens():
    x = rows_of_every_scale(29, 48, 0)
    codes, scale = int8.quantize_rows(x)
    want_codes, want_scale = ck_eager.quantize_int8_rowwise(x)
    assert torch.equal(codes, want_codes) and torch.equal(scale, want_scale)
    assert codes.dtype == torch.int8 and scale.shape == (29, 1) and (codes[0] == 0).all()


@pytest.mark.parametrize("group", [4, 16, 64])
def test_convrot_rotation_is_comfy_kitchens(group):
    x = rows_of_every_scale(9, 128, 1)
    assert torch.equal(hadamard(group), _build_hadamard(group))
    assert torch.allclose(rotate_groups(x, group), _rotate_activation(x, _build_hadamard(group), group),
                          rtol=0, atol=1e-6 * x.abs().max().item())
    h = hadamard(group, dtype=torch.float64)
    assert torch.allclose(h @ h, torch.eye(group, dtype=torch.float64))      # its own inverse
    with pytest.raises(ValueError, match="power"):
        hadamard(32)
    with pytest.raises(ValueError, match="not a multiple of the ConvRot group"):
        rotate_groups(torch.zeros(2, 40), 16)


@pytest.mark.parametrize("convrot", [None, 16])
def test_weights_are_comfy_kitchens_and_dequantize_like_it(convrot):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 64, generator=g) / 8
    q = Int8Weight.quantize(w, convrot)
    kw = {"per_channel": True, **({"convrot": True, "convrot_groupsize": convrot} if convrot else {})}
    with ck.registry.use_backend("eager"):
        qt = QuantizedTensor.from_float(w, "TensorWiseINT8Layout", **kw)
    assert torch.equal(q.data, qt._qdata) and torch.equal(q.scale, qt._params.scale)
    assert rel_l2(q.dequantize(torch.float32), qt.dequantize()) < 1e-6


@pytest.mark.parametrize("route", int8.INT8_ROUTES)
@pytest.mark.parametrize("convrot", [None, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_is_the_product_of_its_quantized_operands(route, convrot, dtype):
    g = torch.Generator().manual_seed(3)
    x = rows_of_every_scale(37, 64, 4).to(dtype)
    w = (torch.randn(24, 64, generator=g) / 8).to(dtype)
    b = torch.randn(24, generator=g).to(dtype)
    q = Int8Weight.quantize(w, convrot)
    y = int8.linear(x, q, b, route=route)
    assert y.dtype == dtype and y.shape == (37, 24)
    # float64 over the same codes and scales (the rotation of x written here in float64)
    xr = x.double() if not convrot else (x.double().view(37, -1, convrot) @ hadamard(convrot, dtype=torch.float64)
                                          ).view(37, 64)
    cx, sx = int8.quantize_rows(xr.float() if convrot else x)
    exact = (cx.double() * sx.double()) @ (q.data.double() * q.scale.double()).T + b.double()
    scale = exact.abs().max().item()
    out_eps = 2e-6 if dtype == torch.float32 else 2e-3
    assert (y.double() - exact).abs().max().item() <= out_eps * scale
    # and the unquantized product within int8's rounding (half a step per operand and row)
    err = rel_l2(y, x.double() @ w.double().T + b.double())
    assert 1e-4 < err < 2e-2, err


def test_linear_matches_comfy_kitchens_int8_linear_on_a_stored_weight():
    """A ConvRot file's stored codes and per-row scales run as stored (no requantisation)
    give comfy-kitchen's own int8_linear."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(32, 64, generator=g) / 8
    x = torch.randn(2, 11, 64, generator=g)
    with ck.registry.use_backend("eager"):
        qt = QuantizedTensor.from_float(w, "TensorWiseINT8Layout", per_channel=True, convrot=True,
                                        convrot_groupsize=16)
        want = ck_eager.int8_linear(x, qt._qdata, qt._params.scale, None, torch.float32, convrot=True,
                                    convrot_groupsize=16)
    stored = Int8Weight.from_stored(qt._qdata, qt._params.scale, torch.float32, convrot=16)
    for route in int8.INT8_ROUTES:
        assert rel_l2(int8.linear(x, stored, route=route), want) < 1e-6
    per_tensor = Int8Weight.from_stored(qt._qdata, torch.tensor(0.01), torch.float32)
    assert per_tensor.scale.shape == (32, 1) and (per_tensor.scale == 0.01).all()
    with pytest.raises(ValueError, match="scale: 5 values for a weight of 32 rows"):
        Int8Weight.from_stored(qt._qdata, torch.ones(5), torch.float32)


def test_int_mm_is_exact_and_errors_name_arguments():
    g = torch.Generator().manual_seed(6)
    a = torch.randint(-128, 128, (5, 7), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (3, 7), generator=g, dtype=torch.int8)
    assert torch.equal(int8.int_mm(a, w).long(), a.long() @ w.long().T)
    q = Int8Weight.quantize(torch.randn(8, 16))
    with pytest.raises(ValueError, match="last dim 12 does not match the int8 weight's K=16"):
        int8.linear(torch.randn(2, 12), q)
    with pytest.raises(ValueError, match="route='fp8'"):
        int8.linear(torch.randn(2, 16), q, route="fp8")
    assert int8.int8_supported("cpu") is None
