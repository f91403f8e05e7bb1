"""Patch + pixel embedding kernel vs float64 unfold/linear and per-pixel linear + sin-cos."""
import pytest
import torch
import torch.nn.functional as F

from pidkern import ops
from tests.tolerance import assert_within_rule

# On a GPU box the CPU-sized tests run on CUDA too (CPU tensors reach the kernels only
# under the interpreter).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sincos_table(n, dp):
    """[n, dp/2] = [sin(pos w_k)]_k<dp/4 ++ [cos(pos w_k)]_k<dp/4, w_k = 10000^(-k/(dp/4)), built in float64."""
    q = dp // 4
    w = 10000.0 ** (-torch.arange(q, dtype=torch.float64) / q)
    a = torch.arange(n, dtype=torch.float64)[:, None] * w
    return torch.cat([a.sin(), a.cos()], 1).float()


def ref64(x, pw, pb, xw, xb, sc, sr, P):
    B, _, H, W = x.shape
    Hs, Ws, Dp = H // P, W // P, xw.shape[0]
    tok = F.unfold(x.double(), P, stride=P).transpose(1, 2) @ pw.double().T + pb.double()
    pix = x.double().permute(0, 2, 3, 1) @ xw.double().T + xb.double()
    pix = pix + torch.cat([sc.double()[None].expand(H, W, Dp // 2), sr.double()[:, None].expand(H, W, Dp // 2)], -1)
    pix = pix.view(B, Hs, P, Ws, P, Dp).permute(0, 1, 3, 2, 4, 5).reshape(B * Hs * Ws, P * P, Dp)
    return tok, pix


def make(B, P, Hs, Ws, D, Dp, x_dtype, dtype, device=DEVICE, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    H, W = Hs * P, Ws * P
    x = torch.randn(B, 3, H, W, generator=g).to(device, x_dtype)
    pw = (torch.randn(D, 3 * P * P, generator=g) / (3 * P * P) ** 0.5).to(device, dtype)
    pb = torch.randn(D, generator=g).to(device, dtype)
    xw = torch.randn(Dp, 3, generator=g).to(device, dtype)
    xb = torch.randn(Dp, generator=g).to(device, dtype)
    return x, pw, pb, xw, xb, sincos_table(W, Dp).to(device), sincos_table(H, Dp).to(device), P


def check(args, what):
    tok, pix = ops.patch_pixel_embed(*args, route="triton")
    ttok, tpix = ops.patch_pixel_embed(*args, route="torch")
    rtok, rpix = ref64(*args)
    assert tok.dtype == pix.dtype == args[1].dtype
    assert_within_rule(tok, ttok, rtok, what + " patch tokens")
    assert_within_rule(pix, tpix, rpix, what + " pixel tokens")


@pytest.mark.parametrize("x_dtype,dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                           (torch.float32, torch.float16)])
def test_matches_reference(x_dtype, dtype):
    # batch 3, a 3x5 patch grid, D not a multiple of the block
    check(make(3, 8, 3, 5, 70, 16, x_dtype, dtype, seed=int(dtype.itemsize + x_dtype.itemsize)), f"embed {x_dtype}/{dtype}")


def test_odd_patch_and_width():
    # P=6 (K=108 is ragged against BLOCK_K, P not a power of two), Dp=8, a 4x2 grid
    check(make(2, 6, 4, 2, 40, 8, torch.float32, torch.float32, seed=4), "embed P=6")


def test_p16_channels_last():
    # the real patch size, on an image stored channels-last (strided gather)
    args = list(make(1, 16, 2, 3, 48, 16, torch.float32, torch.float32, seed=5))
    args[0] = args[0].contiguous(memory_format=torch.channels_last)
    check(tuple(args), "embed P=16 channels-last")


def test_bad_arguments():
    from pidkern.kernels.embed import patch_pixel_embed as k
    x, pw, pb, xw, xb, sc, sr, P = make(1, 8, 2, 3, 32, 16, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="x: H and W must be multiples"):
        k(x[..., :20], pw, pb, xw, xb, sc[:20], sr, P)
    with pytest.raises(ValueError, match="x: expected an RGB image"):
        k(x[:, :2], pw, pb, xw, xb, sc, sr, P)
    with pytest.raises(ValueError, match=r"patch_w: expected \[D, 192\]"):
        k(x, pw[:, :100].contiguous(), pb, xw, xb, sc, sr, P)
    with pytest.raises(ValueError, match="pix_w: dtype"):
        k(x, pw, pb, xw.half(), xb, sc, sr, P)
    with pytest.raises(ValueError, match="sincos_col: expected shape"):
        k(x, pw, pb, xw, xb, sr, sr, P)
    with pytest.raises(ValueError, match="sincos_row: expected float32"):
        k(x, pw, pb, xw, xb, sc, sr.double(), P)
    with pytest.raises(ValueError, match="patch_b: expected shape"):
        k(x, pw, pb[:3], xw, xb, sc, sr, P)


def test_opcheck():
    from pidkern.kernels import embed  # noqa: F401  (registers the op)
    args = make(1, 4, 2, 3, 16, 8, torch.float32, torch.float32, seed=6)
    torch.library.opcheck(torch.ops.pidkern.embed, args)


@pytest.mark.cuda
def test_bf16_real_shape():
    # float32 image (the sampler state), bf16 weights, real P/D/Dp, a 512x768 image
    check(make(1, 16, 32, 48, 1536, 16, torch.float32, torch.bfloat16, device="cuda", seed=8), "embed bf16")
