"""The int8 GEMM kernel (int8 x int8 -> int32, scales and bias in the epilogue) against
float64 math over the same quantized operands, under the tolerance rule: at most twice
PyTorch's own error (torch._int_mm and a float32 epilogue) plus the output's rounding."""
import pytest
import torch

from pidkern.int8 import int_mm
from pidkern.kernels.int8_gemm import int8_gemm
from tests.tolerance import assert_within_rule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def operands(m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    sa = torch.rand(m, 1, generator=g) * 1e-2 + 1e-4
    sw = torch.rand(n, 1, generator=g) * 1e-2 + 1e-4
    bias = torch.randn(n, generator=g)
    return [t.to(DEVICE) for t in (a, w, sa, sw, bias)]


def ref64(a, w, sa, sw, bias):
    y = (a.double() @ w.double().T) * sa.double() * sw.double().view(1, -1)
    return y + bias.double() if bias is not None else y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k,with_bias", [(37, 24, 40, True), (5, 19, 77, False), (64, 48, 96, True),
                                             (1, 3, 1, True)])
def test_matches_reference(dtype, m, n, k, with_bias):
    a, w, sa, sw, bias = operands(m, n, k, seed=m * n + k)
    bias = bias if with_bias else None
    out = int8_gemm(a, sa, w, sw, bias, dtype)          # its output starts as NaN (conftest)
    assert out.dtype == dtype and out.shape == (m, n)
    acc = int_mm(a, w)
    assert torch.equal(acc.long(), a.long() @ w.long().T)     # the int32 sums are exact
    torch_out = (acc.float() * (sa * sw.view(1, -1)) + (bias.float() if bias is not None else 0)).to(dtype)
    assert_within_rule(out, torch_out, ref64(a, w, sa, sw, bias), f"int8 gemm {m}x{k}->{n} {dtype}")


def test_strided_input_rows_and_given_out():
    a, w, sa, sw, bias = operands(20, 16, 64, seed=1)
    wide = torch.zeros(20, 80, dtype=torch.int8, device=DEVICE)
    wide[:, 8:72] = a
    out = torch.full((20, 16), float("nan"), device=DEVICE)
    got = int8_gemm(wide[:, 8:72], sa, w, sw, bias, torch.float32, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.allclose(got.double(), ref64(a, w, sa, sw, bias), rtol=1e-5, atol=1e-5)


def test_argument_errors():
    a, w, sa, sw, _ = operands(4, 8, 16, seed=2)
    with pytest.raises(ValueError, match="expected int8 codes"):
        int8_gemm(a.float(), sa, w, sw, None, torch.float32)
    with pytest.raises(ValueError, match=r"expected \[M, K\] and \[N, K\]"):
        int8_gemm(a, sa, w[:, :8], sw, None, torch.float32)
    with pytest.raises(ValueError, match="scales: expected 4 and 8"):
        int8_gemm(a, sa[:3], w, sw, None, torch.float32)
