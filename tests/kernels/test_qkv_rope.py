"""QKV Linear + QK-norm + RoPE in one GEMM (op qkv_rope) against float64."""
from __future__ import annotations

import pytest
import torch

from pidkern import ops
from tests.tolerance import assert_within_rule

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def ref64(h, w, norms, rope, heads, eps=1e-6):
    """[B, N, H, hd] q, k, v in float64: Linear, then RMSNorm * weight and RoPE of pairs (2m, 2m+1)."""
    B, N, _ = h.shape
    q, k, v = (h.double() @ w.double().T).view(B, N, 3, heads, -1).unbind(2)
    c, s = (t.double()[:, None] for t in rope)

    def nr(x, wt):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * wt.double()
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * c - b * s, a * s + b * c), -1).flatten(-2)
    return nr(q, norms[0]), nr(k, norms[1]), v


def make(B, N, D, heads, hd, dtype, g, device=DEV):
    h = torch.randn(B, N, D, generator=g).to(device, dtype)
    w = (torch.randn(3 * heads * hd, D, generator=g) / D ** 0.5).to(device, dtype)
    norms = (torch.rand(2, hd, generator=g) + 0.5).to(device)
    ang = torch.rand(N, hd // 2, generator=g, dtype=torch.float64) * 20
    return h, w, norms, (ang.cos().float().to(device), ang.sin().float().to(device))


def check(B, L, T, D, heads, hd, dtype, device=DEV, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = make(B, L, D, heads, hd, dtype, g, device)
    txt = make(B, T, D, heads, hd, dtype, g, device) if T else (None,) * 4
    got = ops.qkv_rope(*img, *txt, heads=heads, route="triton")
    plain = ops.qkv_rope(*img, *txt, heads=heads, route="torch")
    want = ref64(*img, heads)
    if T:
        want = tuple(torch.cat(p, 1) for p in zip(ref64(*txt, heads), want))
    for name, o, p, r in zip("qkv", got, plain, want):
        assert o.dtype == dtype and o.shape == (B, T + L, heads, hd)
        assert_within_rule(o, p, r, f"{name} {dtype} T={T} D={D}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("L,T,D", [(37, 11, 48), (29, 0, 64)])
def test_matches_float64(dtype, L, T, D):
    # 37 / 29 image tokens (not tile multiples), batch 3, D=48 leaves a partial K tile
    check(3, L, T, D, 2, 32, dtype)


def test_head_dim_16_and_three_heads():
    check(2, 13, 5, 32, 3, 16, torch.float16)


def test_autotune_prune_keeps_whole_heads_per_tile():
    from pidkern.kernels._common import FAMILIES
    from pidkern.kernels.qkv_rope import _configs, _prune
    # every architecture family's set (the configs depend on the device since issue 22)
    for family in FAMILIES:
        for hd, hhd in ((64, 1536), (64, 64 * 3), (32, 96), (16, 48)):
            kept = _prune(_configs(family), {}, HD=hd, HHD=hhd)
            assert kept and all(c.kwargs["BLOCK_N"] % hd == 0 and hhd % c.kwargs["BLOCK_N"] == 0 for c in kept)
        assert len(_prune(_configs(family), {}, HD=64, HHD=1536)) == len(_configs(family))


def test_torch_route_runs_cublas_and_the_chain(monkeypatch):
    from pidkern.kernels import qkv_rope as K
    g = torch.Generator().manual_seed(1)
    img = make(1, 5, 32, 1, 16, torch.float32, g)
    monkeypatch.setattr(K, "_launch", lambda *a, **k: pytest.fail("kernel ran on the torch route"))
    q, k, v = ops.qkv_rope(*img, heads=1, route="torch")
    assert q.shape == (1, 5, 1, 16)


def test_non_power_of_two_head_dim_takes_the_chain(monkeypatch):
    from pidkern.kernels import qkv_rope as K
    g = torch.Generator().manual_seed(2)
    img = make(1, 6, 32, 2, 24, torch.float32, g)
    monkeypatch.setattr(K, "_launch", lambda *a, **k: pytest.fail("hd 24 reached the kernel"))
    q, _, _ = ops.qkv_rope(*img, heads=2, route="triton")
    assert_within_rule(q, q, ref64(*img, 2)[0], "hd24 chain")


@pytest.mark.parametrize("bad,match", [
    (lambda a: dict(w_img=a["w_img"][:, :-1]), "h_img weight"),
    (lambda a: dict(norms_img=a["norms_img"][0]), "h_img norms"),
    (lambda a: dict(norms_img=a["norms_img"].T.contiguous().T), "h_img norms"),
    (lambda a: dict(rope_img=(a["rope_img"][0][:-1], a["rope_img"][1])), "h_img rope cos"),
    (lambda a: dict(w_img=a["w_img"].half()), "h_img weight"),
    (lambda a: dict(heads=0), "heads"),
])
def test_bad_inputs_name_the_argument(bad, match):
    from pidkern.kernels.qkv_rope import qkv_rope as qkv_rope_launcher
    g = torch.Generator().manual_seed(3)
    h, w, n, rope = make(1, 4, 32, 1, 16, torch.float32, g)
    args = dict(h_img=h, w_img=w, norms_img=n, rope_img=rope, heads=1)
    args.update(bad(args))
    with pytest.raises(ValueError, match=match):
        qkv_rope_launcher(args["h_img"], args["w_img"], args["norms_img"], *args["rope_img"], None, None, None, None,
                    None, args["heads"], 1e-6)


def test_opcheck():
    import pidkern.kernels.qkv_rope  # noqa: F401
    g = torch.Generator().manual_seed(4)
    h, w, n, (c, s) = make(2, 5, 32, 1, 16, torch.float32, g)
    ht, wt, nt, (ct, st) = make(2, 3, 32, 1, 16, torch.float32, g)
    torch.library.opcheck(torch.ops.pidkern.qkv_rope.default, (h, w, n, c, s, ht, wt, nt, ct, st, 1, 1e-6))
    torch.library.opcheck(torch.ops.pidkern.qkv_rope.default, (h, w, n, c, s, None, None, None, None, None, 1, 1e-6))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_patch_shapes(dtype):
    # the 2048² patch attention's shapes on a 45 x 37 grid: D 1536, 24 heads of 64, 300 text tokens
    check(1, 45 * 37, 300, 1536, 24, 64, dtype, device="cuda")
    check(2, 100, 7, 1536, 24, 64, dtype, device="cuda", seed=1)
