"""add_rms_modulate (op "rms_modulate") against float64 math written out here."""
import pytest
import torch

from pidkern import ops
from tests.tolerance import assert_within_rule

F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16
# The kernels run on CUDA tensors, or on CPU tensors only under TRITON_INTERPRET=1 (no GPU).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def ref64(x, weight, shift, scale, y=None, gate=None, eps=1e-6):
    x = x.double()
    if y is not None:
        x = x + gate.double() * y.double()
    rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x, x * rms * weight.double() * (1 + scale.double()) + shift.double()


def make(R, N, C, x_dtype, dtype, per_row, device=DEVICE, seed=0):
    """x (residual), y, weight and shift/scale/gate as slices of one chunk6-style tensor
    (strided views, like the engine's adaLN output)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = (rnd(R, N, C) * 3).to(device, x_dtype)
    y = rnd(R, N, C).to(device, dtype)
    weight = (1 + 0.5 * rnd(C)).to(device, dtype)
    mod = (0.5 * rnd(R, N if per_row else 1, 6 * C)).to(device, dtype)
    shift, scale, gate = mod[..., 0:C], mod[..., C:2 * C], mod[..., 2 * C:3 * C]
    return x, y, weight, shift, scale, gate


def check(x, y, weight, shift, scale, gate, out_dtype=None, what=""):
    x_new, h = ops.add_rms_modulate(x, weight, shift, scale, y, gate, out_dtype=out_dtype, route="triton")
    x_t, h_t = ops.add_rms_modulate(x, weight, shift, scale, y, gate, out_dtype=out_dtype, route="torch")
    x64, h64 = ref64(x, weight, shift, scale, y, gate)
    assert x_new.dtype == x.dtype and h.dtype == h_t.dtype
    if y is None:
        assert x_new is x
    else:
        assert_within_rule(x_new, x_t, x64, what + " x_new")
    assert_within_rule(h, h_t, h64, what + " h")
    return x_new, h


@pytest.mark.parametrize("C", [1536, 80])
@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("residual", [True, False])
def test_per_sample(C, dtype, residual):
    x, y, w, sh, sc, g = make(3, 37, C, dtype, dtype, per_row=False, seed=C)
    if residual:
        check(x, y, w, sh, sc, g, what=f"C={C} {dtype}")
    else:
        check(x, None, w, sh, sc, None, what=f"C={C} {dtype}")


@pytest.mark.parametrize("C", [1536, 80])
def test_float32_residual_half_branch(C):
    # The release's residual stream is float32 while the branch output and h are half.
    x, y, w, sh, sc, g = make(3, 37, C, F32, F16, per_row=False, seed=1)
    x_new, h = check(x, y, w, sh, sc, g, what="mixed")
    assert x_new.dtype == F32 and h.dtype == F16


@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("residual", [True, False])
def test_pixel_rows_strided(dtype, residual):
    # Pixel blocks: 37 patches x 64 pixels x 16 channels, modulation per pixel sliced out
    # of [R, P2*96] viewed [R, P2, 96] (pixel stride 96, patch stride P2*96).
    R, P2 = 37, 64
    x, y, w, _, _, _ = make(R, P2, 16, F32, dtype, per_row=True, seed=2)
    m = (0.5 * torch.randn(R, P2 * 96)).to(DEVICE, dtype).view(R, P2, 96)
    sh, sc, g = m[..., 0:16], m[..., 16:32], m[..., 32:48]
    assert not sh.is_contiguous()
    check(x, y if residual else None, w, sh, sc, g if residual else None, what="pixel")


def test_strided_x_and_broadcast_batch():
    # x itself a strided view; modulation shared by the whole batch ([1, 1, C]).
    base = torch.randn(3, 37, 2 * 80, device=DEVICE)
    x = base[..., :80]
    y = torch.randn(3, 37, 80, device=DEVICE)
    w = torch.randn(80, device=DEVICE)
    sh, sc, g = (torch.randn(1, 1, 80, device=DEVICE) for _ in range(3))
    check(x, y, w, sh, sc, g, what="strided x")


def test_out_dtype():
    x, y, w, sh, sc, g = make(3, 5, 80, F32, F32, per_row=False)
    _, h = ops.add_rms_modulate(x, w, sh, sc, y, g, out_dtype=F16, route="triton")
    assert h.dtype == F16
    _, h = ops.add_rms_modulate(x, w, sh, sc, route="triton")
    assert h.dtype == F32


def test_bad_arguments():
    x, y, w, sh, sc, g = make(2, 4, 32, F32, F32, per_row=False)
    cases = [
        (dict(x=x[0]), "x"),
        (dict(weight=w[:16]), "weight"),
        (dict(shift=torch.randn(2, 3, 32, device=DEVICE)), "shift"),
        (dict(scale=torch.randn(2, 1, 16, device=DEVICE)), "scale"),
        (dict(gate=None), "gate"),
        (dict(y=torch.randn(2, 4, 32, device=DEVICE).to(torch.int32)), "y"),
        (dict(shift=torch.randn(2, 1, 64, device=DEVICE)[..., ::2]), "shift"),
        (dict(out_dtype=torch.int8), "out_dtype"),
    ]
    for change, name in cases:
        args = dict(x=x, weight=w, shift=sh, scale=sc, y=y, gate=g)
        args.update(change)
        with pytest.raises(ValueError, match=name):
            ops.add_rms_modulate(**args, route="triton")


def test_opcheck():
    x, y, w, sh, sc, g = make(2, 3, 32, F32, F32, per_row=True)
    torch.library.opcheck(torch.ops.pidkern.add_rms_modulate.default, (x, w, sh, sc, y, g, 1e-6, F32))
    torch.library.opcheck(torch.ops.pidkern.rms_modulate.default, (x, w, sh, sc, 1e-6, F16))


@pytest.mark.cuda
@pytest.mark.parametrize("shape,per_row", [((2, 1037, 1536), False), ((2048, 256, 16), True)])
def test_cuda_bf16(shape, per_row):
    R, N, C = shape
    x, y, w, sh, sc, g = make(R, N, C, F32, BF16, per_row=per_row, device="cuda", seed=3)
    x_new, h = check(x, y, w, sh, sc, g, out_dtype=BF16, what="cuda bf16")
    assert h.dtype == BF16
    x_new, h = check(x.to(BF16), y, w, sh, sc, g, what="cuda bf16 residual")
    check(x, None, w, sh, sc, None, out_dtype=BF16, what="cuda no residual")
