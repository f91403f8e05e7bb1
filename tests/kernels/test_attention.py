"""Joint text-image attention (QK-norm + RoPE + softmax(qk^T/sqrt(hd)) v) against float64."""
from __future__ import annotations

import math

import pytest
import torch

from pidkern import ops
from tests.tolerance import assert_within_rule

BACKENDS = ("triton", "prep+sdpa", "prep+triton")
# CPU tensors reach the kernels only under the interpreter; with a GPU the small tests run there
DEV = "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------- float64 reference (SPEC §3, §4)

def angles_2d(hs: int, ws: int, hd: int, ref: int) -> torch.Tensor:
    """[hs*ws, hd/2] float64: pair 2k from the column position, 2k+1 from the row, NTK-aware."""
    a = hd / 2
    k = torch.arange(hd // 4, dtype=torch.float64)
    gx = (10000 * (ws / ref) ** (a / (a - 2))) ** (-4 * k / hd)
    gy = (10000 * (hs / ref) ** (a / (a - 2))) ** (-4 * k / hd)
    px = torch.linspace(0, 16, ws, dtype=torch.float64).repeat(hs)
    py = torch.linspace(0, 16, hs, dtype=torch.float64).repeat_interleave(ws)
    return torch.stack((px[:, None] * gx, py[:, None] * gy), -1).flatten(1)


def angles_1d(n: int, hd: int) -> torch.Tensor:
    g = 10000.0 ** (-2 * torch.arange(hd // 2, dtype=torch.float64) / hd)
    return torch.arange(n, dtype=torch.float64)[:, None] * g


def prep64(qkv_img, qkv_txt, w, tabs, heads, eps=1e-6):
    """q, k, v [B, T+L, H, hd] float64 (QK-norm and RoPE applied, text first) and T."""
    def prep(qkv, wq, wk, cos, sin):
        B, N, C = qkv.shape
        q, k, v = qkv.double().view(B, N, 3, heads, C // (3 * heads)).unbind(2)

        def nr(x, wt):
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * wt.double()
            a, b = x[..., 0::2], x[..., 1::2]
            c, s = cos.double()[:, None], sin.double()[:, None]
            return torch.stack((a * c - b * s, a * s + b * c), -1).flatten(-2)
        return nr(q, wq), nr(k, wk), v

    q, k, v = prep(qkv_img, w[0], w[1], *tabs[0])
    T = 0
    if qkv_txt is not None:
        T = qkv_txt.shape[1]
        qt, kt, vt = prep(qkv_txt, w[2], w[3], *tabs[1])
        q, k, v = torch.cat((qt, q), 1), torch.cat((kt, k), 1), torch.cat((vt, v), 1)
    return q, k, v, T


def ref64(qkv_img, qkv_txt, w, tabs, heads, eps=1e-6):
    q, k, v, T = prep64(qkv_img, qkv_txt, w, tabs, heads, eps)
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(q.shape[-1])
    o = torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1), v).flatten(2)
    return o[:, T:], o[:, :T]


def make(B, hs, ws, T, heads, hd, dtype, device=DEV, ref_grid=64, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    L = hs * ws
    qkv_img = (torch.randn(B, L, 3 * heads * hd, generator=g) * 2).to(device, dtype)
    qkv_txt = (torch.randn(B, T, 3 * heads * hd, generator=g) * 2).to(device, dtype) if T else None
    w = [(torch.rand(hd, generator=g) + 0.5).to(device) for _ in range(4)]
    ai = angles_2d(hs, ws, hd, ref_grid)
    tabs = [(ai.cos().float().to(device), ai.sin().float().to(device))]
    if T:
        at = angles_1d(T, hd)
        tabs.append((at.cos().float().to(device), at.sin().float().to(device)))
    else:
        w[2] = w[3] = None
        tabs.append(None)
    return qkv_img, qkv_txt, w, tabs


def call(qkv_img, qkv_txt, w, tabs, heads, backend):
    return ops.attention(qkv_img, qkv_txt, w[0], w[1], w[2], w[3], tabs[0], tabs[1], heads, backend=backend)


def check(B, hs, ws, T, heads, hd, dtype, backends, device=DEV):
    qkv_img, qkv_txt, w, tabs = make(B, hs, ws, T, heads, hd, dtype, device)
    r_img, r_txt = ref64(qkv_img, qkv_txt, w, tabs, heads)
    t_img, t_txt = call(qkv_img, qkv_txt, w, tabs, heads, "torch")
    for backend in backends:
        o_img, o_txt = call(qkv_img, qkv_txt, w, tabs, heads, backend)
        assert o_img.dtype == dtype and o_img.shape == (B, hs * ws, heads * hd)
        assert_within_rule(o_img, t_img, r_img, f"{backend} image hd{hd} {dtype}")
        if T:
            assert o_txt.dtype == dtype and o_txt.shape == (B, T, heads * hd)
            assert_within_rule(o_txt, t_txt, r_txt, f"{backend} text hd{hd} {dtype}")
        else:
            assert o_txt is None


# -------------------------------------------------------------------------------- CPU tests

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_patch_joint_hd64(dtype):
    # 3 x 13 grid (39 image tokens, not a tile multiple) + 11 text tokens, batch 3
    check(3, 3, 13, 11, 2, 64, dtype, BACKENDS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pixel_hd72_no_text(dtype):
    check(2, 5, 7, 0, 2, 72, dtype, BACKENDS)


@pytest.mark.parametrize("heads,hd", [(3, 72), (1, 20)])
def test_rows_not_16_element_multiples(heads, hd):
    # 3 x 72 = 216-element rows: the kernels get their strides in 8-element units;
    # 20-wide rows (60 in qkv): in 4-element units; hd 20 also masks 12 of the 16-wide chunk
    from pidkern.kernels._common import row_align
    assert row_align(2, 3 * heads * hd, heads * hd, hd) == (8 if hd == 72 else 4)
    check(2, 3, 7, 5, heads, hd, torch.float16, BACKENDS)


def test_row_align():
    from pidkern.kernels._common import row_align
    assert row_align(2, 1536, 4608) == 8      # 16 bytes of bf16
    assert row_align(4, 1536) == 4            # 16 bytes of float32
    assert row_align(2, 216, 72) == 8
    assert row_align(2, 60, 20) == 4
    assert row_align(2, 18) == 2
    assert row_align(2, 7) == 1
    assert row_align(1, 48) == 16


def test_rows_aligned_rule():
    from pidkern.kernels.attention import rows_aligned
    base = torch.empty(2, 5, 3 * 3 * 72 + 8, dtype=torch.float16)
    assert rows_aligned(base[..., :3 * 3 * 72], 3)            # 648 + 8 = 656-element rows: aligned
    assert not rows_aligned(base[..., 1:3 * 3 * 72 + 1], 3)   # starts one element in
    assert not rows_aligned(torch.empty(2, 5, 3 * 18, dtype=torch.float16), 1)  # 54-element rows
    assert not rows_aligned(torch.empty(2, 5, 3 * 18, dtype=torch.float32)[..., :3 * 16], 1)  # 216-byte rows
    assert rows_aligned(torch.empty(2, 5, 3 * 16, dtype=torch.float32), 1)


def test_text_changes_image_output():
    # every image query must attend the text keys: perturbing only text v changes o_img
    qkv_img, qkv_txt, w, tabs = make(1, 3, 5, 7, 1, 64, torch.float32)
    a = call(qkv_img, qkv_txt, w, tabs, 1, "triton")[0]
    qkv_txt2 = qkv_txt.clone()
    qkv_txt2[..., 2 * 64:] += 3.0
    b = call(qkv_img, qkv_txt2, w, tabs, 1, "triton")[0]
    assert (a - b).abs().min() > 1e-4


def test_torch_route_runs_no_kernel(monkeypatch):
    from pidkern.kernels import attention as K
    qkv_img, qkv_txt, w, tabs = make(1, 2, 3, 2, 1, 64, torch.float32)
    want = call(qkv_img, qkv_txt, w, tabs, 1, "prep+sdpa")     # the kernels' prep, then SDPA
    monkeypatch.setattr(K, "attention_fused", lambda *a, **k: pytest.fail("kernel ran on the torch route"))
    monkeypatch.setattr(K, "attention_prep", lambda *a, **k: pytest.fail("kernel ran on the torch route"))
    got = call(qkv_img, qkv_txt, w, tabs, 1, "torch")
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


def _bad(**over):
    qkv_img, qkv_txt, w, tabs = make(1, 2, 3, 2, 2, 64, torch.float32)
    args = dict(qkv_img=qkv_img, qkv_txt=qkv_txt, q_norm_img=w[0], k_norm_img=w[1], q_norm_txt=w[2],
                k_norm_txt=w[3], rope_img=tabs[0], rope_txt=tabs[1], heads=2)
    args.update(over)
    return args


@pytest.mark.parametrize("backend", ["triton", "prep+sdpa"])
@pytest.mark.parametrize("over,match", [
    (lambda a: dict(qkv_img=a["qkv_img"][..., :-2]), "qkv_img"),
    (lambda a: dict(qkv_img=a["qkv_img"][0]), "qkv_img"),
    (lambda a: dict(qkv_img=a["qkv_img"].half()), "qkv_txt"),
    (lambda a: dict(qkv_txt=a["qkv_txt"].repeat(2, 1, 1)), "qkv_txt"),
    (lambda a: dict(qkv_img=a["qkv_img"].transpose(1, 2).contiguous().transpose(1, 2)), "qkv_img"),
    (lambda a: dict(q_norm_img=a["q_norm_img"][:-1]), "q_norm_img"),
    (lambda a: dict(k_norm_txt=None), "k_norm_txt"),
    (lambda a: dict(rope_img=(a["rope_img"][0][:-1], a["rope_img"][1])), "rope_img cos"),
    (lambda a: dict(rope_txt=(a["rope_txt"][0], a["rope_txt"][1].double())), "rope_txt sin"),
    (lambda a: dict(qkv_txt=None), "q_norm_txt"),
    (lambda a: dict(heads=0), "heads"),
])
def test_bad_inputs_name_the_argument(backend, over, match):
    args = _bad()
    args.update(over(args))
    with pytest.raises(ValueError, match=match):
        ops.attention(**args, backend=backend)


def test_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        ops.attention(**_bad(), backend="flash")


def test_core_rejects_unpacked_layout():
    from pidkern.kernels.attention import attention_core
    q = torch.randn(1, 5, 2, 64, device=DEV)
    with pytest.raises(ValueError, match="k"):
        attention_core(q, q.transpose(1, 2).contiguous().transpose(1, 2), q)


def test_opcheck():
    from pidkern.kernels import attention as K  # noqa: F401
    qkv_img, qkv_txt, w, tabs = make(1, 2, 3, 2, 1, 64, torch.float32)
    args = (qkv_img, qkv_txt, w[0], w[1], w[2], w[3], *tabs[0], *tabs[1], 1, 1e-6)
    torch.library.opcheck(torch.ops.pidkern.attention.default, args)
    torch.library.opcheck(torch.ops.pidkern.attention_prep.default, args)
    q, k, v = torch.ops.pidkern.attention_prep(*args)
    torch.library.opcheck(torch.ops.pidkern.attention_core.default, (q, k, v))
    no_txt = (qkv_img, None, w[0], w[1], None, None, *tabs[0], None, None, 1, 1e-6)
    torch.library.opcheck(torch.ops.pidkern.attention.default, no_txt)


# ----------------------------------------------------------------------------- GPU, real shapes

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hs,ws,T,heads,hd", [(64, 64, 300, 24, 64), (64, 64, 0, 16, 72),
                                              (45, 37, 300, 4, 64), (37, 45, 0, 4, 72)])
def test_cuda_real_shapes(dtype, hs, ws, T, heads, hd):
    check(1, hs, ws, T, heads, hd, dtype, BACKENDS, device="cuda")


@pytest.mark.cuda
def test_cuda_unaligned_rows_fall_back():
    # hd 20 in fp16: 60-element qkv rows (120 bytes) are not 16-byte aligned, so every backend
    # runs the chain
    check(2, 3, 5, 4, 1, 20, torch.float16, BACKENDS, device="cuda")
    from pidkern.kernels.attention import attention_core
    q = torch.randn(1, 9, 1, 20, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="16-byte aligned"):
        attention_core(q, q, q)


@pytest.mark.cuda
def test_cuda_batch2_and_core():
    check(2, 20, 30, 300, 3, 64, torch.bfloat16, BACKENDS, device="cuda")
    from pidkern.kernels.attention import attention_core
    q, k, v = (torch.randn(2, 1000, 3, 72, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    o = attention_core(q, k, v)
    r = torch.nn.functional.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (q, k, v)))
    t = ops.sdpa(*(x.transpose(1, 2) for x in (q, k, v)))
    assert_within_rule(o, t.transpose(1, 2).flatten(2), r.transpose(1, 2).flatten(2), "core")
