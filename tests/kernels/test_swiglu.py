"""SwiGLU gate-up kernel vs float64 math: h = SiLU(u w1^T) * (u w3^T)."""
import pytest
import torch

from pidkern import ops
from tests.tolerance import assert_within_rule

# On a GPU box the CPU-sized tests run on CUDA too (CPU tensors reach the kernels only
# under the interpreter).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def ref64(u, w13):
    w1, w3 = w13.double().chunk(2, 0)
    a = u.double() @ w1.T
    return a * torch.sigmoid(a) * (u.double() @ w3.T)


def make(M, D, Hm, dtype, device=DEVICE, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    u = torch.randn(M, D, generator=g).to(device, dtype)
    w13 = (torch.randn(2 * Hm, D, generator=g) / D ** 0.5).to(device, dtype)
    return u, w13


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,D,Hm", [(111, 70, 45), (37, 64, 33)])
def test_matches_reference(dtype, M, D, Hm):
    u, w13 = make(M, D, Hm, dtype, seed=M + D)
    out = ops.swiglu_gate_up(u, w13, route="triton")
    torch_out = ops.swiglu_gate_up(u, w13, route="torch")
    assert out.dtype == dtype
    assert_within_rule(out, torch_out, ref64(u, w13), f"swiglu {dtype} {M}x{D}->{Hm}")


def test_strided_rows():
    # u as a row slice of a wider buffer (stride(0) != D), as when it is a view.
    base, w13 = make(50, 96, 40, torch.float32, seed=3)
    u = base[:, 10:80]
    w13 = w13[:, :70].contiguous()
    out = ops.swiglu_gate_up(u, w13, route="triton")
    torch_out = ops.swiglu_gate_up(u, w13, route="torch")
    assert_within_rule(out, torch_out, ref64(u, w13), "swiglu strided")


def test_bad_arguments():
    from pidkern.kernels.swiglu import swiglu_gate_up as k
    u, w13 = make(8, 32, 16, torch.float32)
    with pytest.raises(ValueError, match="w13: dtype"):
        k(u, w13.half())
    with pytest.raises(ValueError, match="w13: expected 32 columns"):
        k(u, w13[:, :16].contiguous())
    with pytest.raises(ValueError, match="w13: expected an even"):
        k(u, w13[:31])
    with pytest.raises(ValueError, match="u: expected a 2-D"):
        k(u[None], w13)
    with pytest.raises(ValueError, match="u: last dim must be contiguous"):
        k(u.t().contiguous().t(), w13)
    with pytest.raises(ValueError, match="u: dtype"):
        k(u.double(), w13.double())


def test_opcheck():
    from pidkern.kernels import swiglu  # noqa: F401  (registers the op)
    u, w13 = make(20, 32, 16, torch.float32)
    torch.library.opcheck(torch.ops.pidkern.swiglu, (u, w13))


@pytest.mark.cuda
def test_bf16_real_shape():
    u, w13 = make(4096 + 300, 1536, 4096, torch.bfloat16, device="cuda", seed=7)
    out = ops.swiglu_gate_up(u, w13, route="triton")
    torch_out = ops.swiglu_gate_up(u, w13, route="torch")
    assert_within_rule(out, torch_out, ref64(u, w13), "swiglu bf16 real")
    split = ops.swiglu_gate_up(u, w13, split=True, route="triton")
    assert_within_rule(split, torch_out, ref64(u, w13), "swiglu split bf16 real")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,D,Hm", [(111, 70, 45), (5, 32, 600)])
def test_split_gemm_then_silu_mul(dtype, M, D, Hm):
    # cuBLAS (here: torch) GEMM against w13, then one silu_mul pass; Hm 600 spans two column blocks
    u, w13 = make(M, D, Hm, dtype, seed=M)
    out = ops.swiglu_gate_up(u, w13, split=True, route="triton")
    torch_out = ops.swiglu_gate_up(u, w13, split=True, route="torch")
    assert out.dtype == dtype and out.shape == (M, Hm)
    assert_within_rule(out, torch_out, ref64(u, w13), f"swiglu split {dtype} {M}x{D}->{Hm}")


def test_silu_mul_strided_rows_and_checks():
    from pidkern.kernels.swiglu import silu_mul
    g = torch.Generator().manual_seed(9)
    base = torch.randn(13, 2 * 40 + 6, generator=g).to(DEVICE)
    ab = base[:, 3:3 + 80]                            # rows 86 apart
    a, b = ab[:, :40].double(), ab[:, 40:].double()
    torch_out = (torch.nn.functional.silu(ab[:, :40]) * ab[:, 40:])
    assert_within_rule(silu_mul(ab), torch_out, a * torch.sigmoid(a) * b, "silu_mul strided")
    for bad, match in ((ab[:, :79], "ab: expected a 2-D"), (ab.int(), "ab: dtype"),
                       (ab.t().contiguous().t(), "ab: last dim")):
        with pytest.raises(ValueError, match=match):
            silu_mul(bad)
    torch.library.opcheck(torch.ops.pidkern.silu_mul.default, (ab.contiguous(),))
