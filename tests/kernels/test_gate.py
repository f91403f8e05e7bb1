"""Sigma-aware latent gate (v1: per channel GEMM, v1.5: one scalar per token) vs float64."""
import pytest
import torch

from pidkern import ops
from tests.tolerance import assert_within_rule

# On a GPU box the CPU-sized tests run on CUDA too (CPU tensors reach the kernels only
# under the interpreter).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SIGMAS = [0.0, 0.35, 0.9]


def ref64(x, lq, w, b, log_alpha, sigma):
    z = torch.cat([x.double(), lq.double()], -1) @ w.double().T + b.double()
    z = z - log_alpha.double().exp() * sigma.double().view(-1, 1, 1)
    return x.double() + torch.sigmoid(z) * lq.double()


def make(B, N, D, out_dim, x_dtype, dtype, device=DEVICE, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(B, N, D, generator=g).to(device, x_dtype)
    lq = torch.randn(B, N, D, generator=g).to(device, dtype)
    w = (torch.randn(out_dim, 2 * D, generator=g) / (2 * D) ** 0.5).to(device, dtype)
    b = torch.randn(out_dim, generator=g).to(device, dtype)
    log_alpha = torch.tensor(0.4, device=device)
    sigma = torch.tensor((SIGMAS * B)[:B], device=device, dtype=torch.float32)
    return x, lq, w, b, log_alpha, sigma


CASES = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float32, torch.float16)]


@pytest.mark.parametrize("x_dtype,dtype", CASES)
@pytest.mark.parametrize("version", ["v1", "v1.5"])
def test_matches_reference(x_dtype, dtype, version):
    B, N, D = 3, 37, 70
    args = make(B, N, D, D if version == "v1" else 1, x_dtype, dtype, seed=len(version) * 10 + dtype.itemsize + x_dtype.itemsize)
    out = ops.lq_gate(*args, route="triton")
    torch_out = ops.lq_gate(*args, route="torch")
    assert out.dtype == x_dtype
    assert_within_rule(out, torch_out, ref64(*args), f"gate {version} x={x_dtype} w={dtype}")


@pytest.mark.parametrize("version", ["v1", "v1.5"])
def test_sigma_is_per_sample(version):
    # Swapping two samples' sigma must change exactly those samples' outputs.
    x, lq, w, b, la, sigma = make(3, 9, 32, 32 if version == "v1" else 1, torch.float32, torch.float32, seed=5)
    out = ops.lq_gate(x, lq, w, b, la, sigma, route="triton")
    out2 = ops.lq_gate(x, lq, w, b, la, sigma[[1, 0, 2]], route="triton")
    assert not torch.allclose(out[0], out2[0]) and not torch.allclose(out[1], out2[1])
    torch.testing.assert_close(out[2], out2[2], rtol=0, atol=0)
    assert_within_rule(out2, out2, ref64(x, lq, w, b, la, sigma[[1, 0, 2]]), "gate swapped sigma")


def test_strided_tokens():
    # x and lq as token-slices of bigger buffers: only the channel dim is contiguous.
    x, lq, w, b, la, sigma = make(3, 80, 48, 48, torch.float32, torch.float32, seed=11)
    x, lq = x[:, 5:42], lq[:, ::2][:, :37]
    out = ops.lq_gate(x, lq, w, b, la, sigma, route="triton")
    torch_out = ops.lq_gate(x, lq, w, b, la, sigma, route="torch")
    assert_within_rule(out, torch_out, ref64(x, lq, w, b, la, sigma), "gate strided")


def test_bad_arguments():
    from pidkern.kernels.gate import lq_gate as k
    x, lq, w, b, la, sigma = make(2, 5, 16, 16, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="weight: expected"):
        k(x, lq, w[:, :16].contiguous(), b, la, sigma)
    with pytest.raises(ValueError, match="bias: expected shape"):
        k(x, lq, w, b[:1], la, sigma)
    with pytest.raises(ValueError, match="log_alpha: expected a 0-d"):
        k(x, lq, w, b, la.view(1), sigma)
    with pytest.raises(ValueError, match="sigma: expected shape"):
        k(x, lq, w, b, la, sigma[:1])
    with pytest.raises(ValueError, match="lq: expected shape"):
        k(x, lq[:, :4], w, b, la, sigma)
    with pytest.raises(ValueError, match="x: channel dim must be contiguous"):
        k(x.transpose(1, 2).contiguous().transpose(1, 2), lq, w, b, la, sigma)
    with pytest.raises(ValueError, match="x: expected a 3-D"):
        k(x[0], lq[0], w, b, la, sigma)


@pytest.mark.parametrize("out_dim", [16, 1])
def test_opcheck(out_dim):
    from pidkern.kernels import gate  # noqa: F401  (registers the op)
    args = make(2, 5, 16, out_dim, torch.float32, torch.float16, seed=2)
    torch.library.opcheck(torch.ops.pidkern.gate, args)


@pytest.mark.cuda
@pytest.mark.parametrize("version", ["v1", "v1.5"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_bf16_real_shape(version, x_dtype):
    args = make(2, 2500, 1536, 1536 if version == "v1" else 1, x_dtype, torch.bfloat16, device="cuda", seed=9)
    out = ops.lq_gate(*args, route="triton")
    torch_out = ops.lq_gate(*args, route="torch")
    assert out.dtype == x_dtype
    assert_within_rule(out, torch_out, ref64(*args), f"gate {version} bf16 x={x_dtype}")
