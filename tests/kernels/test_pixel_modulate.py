"""pixel_post (op "pixel_modulate") against float64 math written out here."""
import math

import pytest
import torch

from pidkern import ops
from tests.tolerance import assert_within_rule

F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16
# The kernels run on CUDA tensors, or on CPU tensors only under TRITON_INTERPRET=1 (no GPU).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rms64(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def post64(p, e, m, nw, w1, b1, w2, b2, eps=1e-6):
    p, e, m, nw, w1, b1, w2, b2 = (t.double() for t in (p, e, m, nw, w1, b1, w2, b2))
    R, P2, _ = p.shape
    e, m = e.reshape(R, P2, 16), m.reshape(R, P2, 96)
    g1, sh2, sc2, g2 = (m[..., 16 * k:16 * (k + 1)] for k in (2, 3, 4, 5))
    p1 = p + g1 * e
    u = rms64(p1, nw, eps) * (1 + sc2) + sh2
    z = u @ w1.T + b1
    hid = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
    return p1 + g2 * (hid @ w2.T + b2)


def make(R, P2, p_dtype, dtype, wdtype=None, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    wdtype = wdtype or dtype
    p = (2 * rnd(R, P2, 16)).to(device, p_dtype)
    e = rnd(R, P2 * 16).to(device, dtype)
    m = (0.5 * rnd(R, P2 * 96)).to(device, dtype)
    w = dict(norm2_w=(1 + 0.3 * rnd(16)).to(device, wdtype),
             fc1_w=(rnd(64, 16) / 4).to(device, wdtype), fc1_b=(0.2 * rnd(64)).to(device, wdtype),
             fc2_w=(rnd(16, 64) / 8).to(device, wdtype), fc2_b=(0.2 * rnd(16)).to(device, wdtype))
    return p, e, m, w


def check_post(p, e, m, w, what=""):
    out = ops.pixel_post(p, e, m, **w, route="triton")
    out_t = ops.pixel_post(p, e, m, **w, route="torch")
    assert out.dtype == p.dtype and out.shape == p.shape
    assert_within_rule(out, out_t, post64(p, e, m, *w.values()), what)
    return out


@pytest.mark.parametrize("p_dtype,dtype", [(F32, F32), (F16, F16), (F32, F16)])
def test_pixel_post(p_dtype, dtype):
    p, e, m, w = make(37, 64, p_dtype, dtype, seed=1)
    check_post(p, e, m, w, f"post p={p_dtype} rest={dtype}")


def test_pixel_post_strided_inputs():
    # p as a strided view and e, m already viewed [R, P2, *]; a ragged last tile (R*P2 = 5*33).
    p, e, m, w = make(5, 33, F32, F32, seed=2)
    p_wide = torch.randn(5, 33, 32, device=DEVICE)
    p_wide[..., 8:24] = p
    check_post(p_wide[..., 8:24], e.view(5, 33, 16), m.view(5, 33, 96), w, "post strided")


@pytest.mark.parametrize("dtype", [F32, F16])
def test_pixel_post_takes_the_post_attention_half_of_m(dtype):
    # The engine computes only (gate1, shift2, scale2, gate2) after attention: a [R, P2*64] m.
    p, e, m, w = make(7, 64, F32, dtype, seed=4)
    m_post = m.view(7, 64, 96)[..., 32:].contiguous().view(7, 64 * 64)
    out = ops.pixel_post(p, e, m_post, **w, route="triton")
    out_t = ops.pixel_post(p, e, m_post, **w, route="torch")
    assert_within_rule(out, out_t, post64(p, e, m, *w.values()), "post with m[..., 32:]")
    with pytest.raises(ValueError, match="per pixel"):
        ops.pixel_post(p, e, m.view(7, 64, 96)[..., :80].contiguous(), **w, route="triton")


def test_bad_arguments():
    p, e, m, w = make(3, 8, F32, F32)
    bad = [
        (dict(p=p[..., :8]), "p"),
        (dict(e=e[:, :64]), "e"),
        (dict(m=m.view(3, 8, 96)[..., ::2]), "m"),
        (dict(fc1_w=w["fc1_w"].T), "fc1_w"),
        (dict(fc2_b=w["fc2_b"][:8]), "fc2_b"),
        (dict(norm2_w=w["norm2_w"].to(torch.int32)), "norm2_w"),
        (dict(fc2_w=w["fc2_w"].half()), "fc2_w"),
    ]
    for change, name in bad:
        args = dict(p=p, e=e, m=m, **w)
        args.update(change)
        with pytest.raises(ValueError, match=name):
            ops.pixel_post(**args, route="triton")


def test_opcheck():
    p, e, m, w = make(2, 16, F32, F32)
    torch.library.opcheck(torch.ops.pidkern.pixel_post.default, (p, e, m, *w.values(), 1e-6))


@pytest.mark.cuda
@pytest.mark.parametrize("p_dtype", [F32, BF16])
def test_cuda_bf16(p_dtype):
    p, e, m, w = make(515, 256, p_dtype, BF16, device="cuda", seed=4)
    check_post(p, e, m, w, f"cuda post p={p_dtype}")
    check_pre(p, m, w["norm2_w"], f"cuda pre p={p_dtype}")
    # float32 weights (the release's checkpoints before casting) take the exact-fp32 dot.
    w32 = {k: v.float() for k, v in w.items()}
    check_post(p, e, m, w32, "cuda post fp32 weights")
