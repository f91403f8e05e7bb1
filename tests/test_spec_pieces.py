"""The reference network against small independent computations of SPEC §2-6.

Every expected value here is derived from the SPEC text with loops, explicit index
arithmetic and float64; nothing calls the function under test a second way. The last
tests rebuild the whole forward pass functionally in float64 from the net's parameters.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pidkern import reference as ref
from pidkern.config import PRESETS, get_preset, tiny
from pidkern.reference import PiDNet


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def randomize(net: PiDNet, seed=0):
    """Default init leaves norms at 1, embeddings and log_alpha at 0: move every parameter
    off such special values so a wrong index or a dropped term shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("log_alpha"):
                p.copy_(0.5 * noise)
            elif p.dim() <= 1 and ("norm" in name or "block.0" in name or "block.3" in name):
                p.add_(0.2 * noise)    # RMSNorm / GroupNorm weights and biases
            elif name == "y_pos_embedding":
                p.copy_(0.3 * noise)
            else:
                p.add_(0.05 * noise)
    return net


def linspace_pos(n):
    return [16.0 * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


# ---------------------------------------------------------------------------------------
# SPEC §3: rotary angles

def rope2d_loop(hs, ws, hd, ref_grid):
    a = hd / 2
    theta_x = 10000.0 * (ws / ref_grid) ** (a / (a - 2))
    theta_y = 10000.0 * (hs / ref_grid) ** (a / (a - 2))
    px, py = linspace_pos(ws), linspace_pos(hs)
    out = np.zeros((hs * ws, hd // 2))
    for r in range(hs):
        for q in range(ws):
            n = r * ws + q
            for k in range(hd // 4):
                out[n, 2 * k] = px[q] * theta_x ** (-4 * k / hd)
                out[n, 2 * k + 1] = py[r] * theta_y ** (-4 * k / hd)
    return out


@pytest.mark.parametrize("hd", [64, 72])
@pytest.mark.parametrize("hs,ws,ref_grid", [(3, 5, 64), (7, 2, 128), (1, 4, 64), (9, 6, 128)])
def test_rope_2d_angles(hd, hs, ws, ref_grid):
    got = ref.rope_angles_2d(hs, ws, hd, ref_grid).numpy()
    want = rope2d_loop(hs, ws, hd, ref_grid)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("hd", [64, 72])
@pytest.mark.parametrize("ref_grid", [64, 128])
def test_rope_2d_reference_grid_is_plain_rope(hd, ref_grid):
    """At the reference grid theta is exactly 10000; a non-square grid gets theta_x != theta_y."""
    got = ref.rope_angles_2d(ref_grid, ref_grid, hd, ref_grid).numpy()
    pos = linspace_pos(ref_grid)
    for n in (0, 1, ref_grid + 3, ref_grid * ref_grid - 1):
        r, q = divmod(n, ref_grid)
        for k in range(hd // 4):
            assert got[n, 2 * k] == pytest.approx(pos[q] * 10000.0 ** (-4 * k / hd), rel=1e-12, abs=1e-12)
            assert got[n, 2 * k + 1] == pytest.approx(pos[r] * 10000.0 ** (-4 * k / hd), rel=1e-12, abs=1e-12)
    # half the reference grid along columns only: column frequencies change, row ones do not
    half = ref.rope_angles_2d(ref_grid, ref_grid // 2, hd, ref_grid).numpy()
    want = rope2d_loop(ref_grid, ref_grid // 2, hd, ref_grid)
    np.testing.assert_allclose(half, want, rtol=1e-12, atol=1e-12)
    a = hd / 2
    assert ref.ntk_theta(ref_grid // 2, ref_grid, hd) == pytest.approx(10000.0 * 0.5 ** (a / (a - 2)), rel=1e-14)
    assert ref.ntk_theta(ref_grid, ref_grid, hd) == 10000.0


def test_rope_ref_grid_per_version():
    assert get_preset("flux-2k").rope_ref_grid == 64
    assert get_preset("flux-2kto4k-v1.5").rope_ref_grid == 128


@pytest.mark.parametrize("n,hd", [(1, 64), (11, 64), (5, 12)])
def test_rope_1d_text_angles(n, hd):
    got = ref.rope_angles_1d(n, hd).numpy()
    want = np.array([[p * 10000.0 ** (-2 * k / hd) for k in range(hd // 2)] for p in range(n)])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_apply_rope_rotates_pairs(dtype):
    b, h, n, hd = 2, 3, 5, 8
    x = rand(b, h, n, hd, seed=1, dtype=dtype)
    ang = rand(n, hd // 2, seed=2, dtype=torch.float64) * 3
    cos, sin = ref.rope_tables(ang)
    got = ref.apply_rope(x, cos, sin)
    assert got.dtype == dtype
    xd = x.double()
    want = torch.empty_like(xd)
    for i in range(b):
        for j in range(h):
            for t in range(n):
                for m in range(hd // 2):
                    c, s = math.cos(ang[t, m]), math.sin(ang[t, m])
                    a_, b_ = xd[i, j, t, 2 * m].item(), xd[i, j, t, 2 * m + 1].item()
                    want[i, j, t, 2 * m] = a_ * c - b_ * s
                    want[i, j, t, 2 * m + 1] = a_ * s + b_ * c
    # float32 math, one rounding to dtype at the end
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * 4)


# ---------------------------------------------------------------------------------------
# SPEC §2: embeddings and the pixel layout

def sincos_loop(h, w, dim=16):
    quarter = dim // 4
    table = np.zeros((h, w, dim))
    for r in range(h):
        for q in range(w):
            for half, p in ((0, q), (1, r)):       # column half first, then row half
                for k in range(quarter):
                    wk = 10000.0 ** (-k / quarter)
                    table[r, q, half * 2 * quarter + k] = math.sin(p * wk)
                    table[r, q, half * 2 * quarter + quarter + k] = math.cos(p * wk)
    return table


@pytest.mark.parametrize("h,w", [(16, 48), (40, 8), (5, 3)])
def test_pixel_sincos_table(h, w):
    got = ref.pixel_sincos(h, w, 16)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), sincos_loop(h, w), rtol=1e-13, atol=1e-13)


def test_timestep_embedding_cos_first_max_period_10():
    t1000 = torch.tensor([0.0, 999.0, 342.0, 1000.0])
    dim = 256
    got = ref.timestep_embedding(t1000, dim).double()
    want = torch.zeros(4, dim, dtype=torch.float64)
    for b in range(4):
        for k in range(128):
            f = math.exp(-math.log(10.0) * k / 128)
            want[b, k] = math.cos(t1000[b].item() * f)
            want[b, 128 + k] = math.sin(t1000[b].item() * f)
    # float32 arguments of size ~1000 carry ~1e-4 absolute error in the angle
    torch.testing.assert_close(got, want, rtol=0, atol=3e-4)


def test_net_time_input_is_t_times_1000():
    cfg = tiny("flux-2k")
    torch.manual_seed(0)
    net = randomize(PiDNet(cfg))
    seen = []
    net.t_embedder.register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    x = rand(2, 3, 32, 64, seed=3)
    net(x, torch.tensor([0.25, 0.866]), rand(2, 5, cfg.text_dim, seed=4), rand(2, 16, 1, 2, seed=5),
        torch.tensor([0.1, 0.4]))
    torch.testing.assert_close(seen[0], torch.tensor([250.0, 866.0]))


def test_patch_unfold_order():
    """s_embedder sees per patch the vector ordered c*P*P + i*P + j, patches row-major."""
    cfg = tiny("flux-2k")
    torch.manual_seed(0)
    net = PiDNet(cfg)
    seen = []
    net.s_embedder.proj.register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    b, h, w, p = 2, 24, 40, cfg.patch
    x = rand(b, 3, h, w, seed=6)
    net(x, torch.tensor([0.5, 0.5]), rand(b, 3, cfg.text_dim, seed=7), rand(b, 16, 1, 1, seed=8),
        torch.tensor([0.0, 0.0]), lq_tokens=rand(b, (h // p) * (w // p), cfg.adapter_width, seed=9))
    hs, ws = h // p, w // p
    want = torch.empty(b, hs * ws, 3 * p * p)
    for bi in range(b):
        for r in range(hs):
            for q in range(ws):
                for c in range(3):
                    for i in range(p):
                        for j in range(p):
                            want[bi, r * ws + q, c * p * p + i * p + j] = x[bi, c, p * r + i, p * q + j]
    assert torch.equal(seen[0], want)


def test_to_patch_pixels_and_fold():
    b, h, w, c, p = 2, 12, 8, 5, 4
    hs, ws = h // p, w // p
    t = rand(b, h, w, c, seed=10)
    got = ref.to_patch_pixels(t, p)
    want = torch.empty(b * hs * ws, p * p, c)
    for bi in range(b):
        for r in range(hs):
            for q in range(ws):
                for i in range(p):
                    for j in range(p):
                        want[bi * hs * ws + r * ws + q, i * p + j] = t[bi, p * r + i, p * q + j]
    assert torch.equal(got, want)

    val = rand(b * hs * ws, p * p, 3, seed=11)
    got = ref.fold_patch_pixels(val, b, h, w, p)
    want = torch.empty(b, 3, h, w)
    for bi in range(b):
        for ch in range(3):
            for r in range(hs):
                for q in range(ws):
                    for i in range(p):
                        for j in range(p):
                            want[bi, ch, p * r + i, p * q + j] = val[bi * hs * ws + r * ws + q, p * i + j, ch]
    assert torch.equal(got, want)


def test_embed_pixels_adds_table_then_regroups():
    cfg = tiny("flux-2k")
    torch.manual_seed(0)
    net = randomize(PiDNet(cfg))
    b, h, w, p = 2, 16, 24, cfg.patch
    x = rand(b, 3, h, w, seed=12)
    got = net.embed_pixels(x).double()
    wt = net.pixel_embedder.proj.weight.double()
    bias = net.pixel_embedder.proj.bias.double()
    table = sincos_loop(h, w)
    hs, ws = h // p, w // p
    want = torch.empty(b * hs * ws, p * p, 16, dtype=torch.float64)
    for bi in range(b):
        for y in range(h):
            for xx in range(w):
                row = bi * hs * ws + (y // p) * ws + xx // p
                want[row, (y % p) * p + xx % p] = wt @ x[bi, :, y, xx].double() + bias + torch.from_numpy(table[y, xx])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# SPEC §5: latent alignment

def align_loop(lat, cfg, hs, ws):
    lat = lat.double()
    b, c, h, w = lat.shape
    u = cfg.unpack
    if u > 1:
        out = torch.empty(b, c // (u * u), h * u, w * u, dtype=torch.float64)
        for ch in range(c // (u * u)):
            for a in range(u):
                for bb in range(u):
                    for r in range(h):
                        for q in range(w):
                            out[:, ch, u * r + a, u * q + bb] = lat[:, ch * u * u + a * u + bb, r, q]
        lat, c, h, w = out, c // (u * u), h * u, w * u
    num, den = cfg.sr_scale * cfg.latent_stride, cfg.patch * cfg.unpack   # r = num / den
    if num == den:
        return lat
    if num > den:
        f = num // den
        out = torch.empty(b, c, hs, ws, dtype=torch.float64)
        for i in range(hs):
            for j in range(ws):
                out[:, :, i, j] = lat[:, :, i // f, j // f]
        return out
    # Space-to-depth: SPEC names no channel order; the test pins the one that inverts the
    # unpack rule (channel c*f*f + a*f + b' holds row f*r + a, column f*q + b').
    f = den // num
    out = torch.empty(b, c * f * f, hs, ws, dtype=torch.float64)
    for ch in range(c):
        for a in range(f):
            for bb in range(f):
                out[:, ch * f * f + a * f + bb] = lat[:, ch, a::f, bb::f]
    return out


ALIGN_CASES = [(name, {}) for name in sorted(PRESETS)] + [
    ("flux-2k", dict(sr_scale=2)),                     # r = 1: identity
    ("flux-2k", dict(sr_scale=1)),                     # r = 1/2: space-to-depth by 2
    ("sdxl-2kto4k", dict(sr_scale=1, latent_stride=4)),  # r = 1/4
]


@pytest.mark.parametrize("name,over", ALIGN_CASES)
def test_align_latent(name, over):
    from dataclasses import replace
    cfg = replace(get_preset(name), **over)
    lh, lw = 4, 8
    oh, ow = cfg.output_size(lh, lw)
    hs, ws = oh // cfg.patch, ow // cfg.patch
    lat = rand(2, cfg.latent_channels, lh, lw, seed=13)
    got = ref.align_latent(lat, cfg, hs, ws)
    want = align_loop(lat, cfg, hs, ws)
    assert got.shape == (2, cfg.adapter_in_channels, hs, ws)
    assert torch.equal(got.double(), want)


def test_flux2_v15_adapter_ratio():
    cfg = get_preset("flux2-2kto4k-v1.5")
    assert cfg.grid_ratio == (2, 1)             # 4 * (16 / 2) / 16
    assert cfg.adapter_in_channels == 32
    assert get_preset("siglip-2k").grid_ratio == (8, 1)
    assert get_preset("flux-2k").grid_ratio == (2, 1)


# ---------------------------------------------------------------------------------------
# SPEC §5 gate, §6 norms

@pytest.mark.parametrize("base", ["flux-2k", "flux-2kto4k-v1.5"])
def test_sigma_gate_by_hand(base):
    cfg = tiny(base)
    torch.manual_seed(1)
    net = randomize(PiDNet(cfg), seed=3)
    gate = net.lq_proj.gate_modules[0]
    b, n, d = 2, 3, cfg.hidden
    x, lq = rand(b, n, d, seed=14), rand(b, n, d, seed=15)
    sigma = torch.tensor([0.15, 0.9])
    got = gate(x, lq, sigma).double()
    W = gate.content_proj.weight.double()
    bias = gate.content_proj.bias.double()
    alpha = math.exp(gate.log_alpha.item())
    per_token = cfg.is_v15
    assert W.shape == ((1 if per_token else d), 2 * d)
    want = torch.empty(b, n, d, dtype=torch.float64)
    for bi in range(b):
        for t in range(n):
            z = torch.cat([x[bi, t], lq[bi, t]]).double()
            for ch in range(d):
                row = 0 if per_token else ch
                logit = (W[row] * z).sum().item() + bias[row].item() - alpha * sigma[bi].item()
                want[bi, t, ch] = x[bi, t, ch].item() + lq[bi, t, ch].item() / (1 + math.exp(-logit))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_statistics_in_float32(dtype):
    # 900^2 overflows float16: statistics taken in the input dtype would give inf -> 0
    x = (rand(3, 32, seed=16) * 300 + 600).to(dtype)
    w = (1 + 0.3 * rand(32, seed=17)).to(dtype)
    got = ref.rms_norm(x, w, 1e-6)
    assert got.dtype == dtype
    xd = x.double()
    normed = (xd / torch.sqrt((xd ** 2).mean(-1, keepdim=True) + 1e-6)).to(dtype)   # cast back...
    want = (normed.double() * w.double()).to(dtype)                                  # ...then times weight
    assert torch.isfinite(got).all()
    ulp = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
    assert (got.double() - want.double()).abs().max().item() <= 2 * ulp * 2   # values are below 2


# ---------------------------------------------------------------------------------------
# SPEC §4 / §6: which adaLN chunk is shift, scale and gate

def patch_block_setup(seed=0):
    cfg = tiny("flux-2k")
    torch.manual_seed(seed)
    net = randomize(PiDNet(cfg), seed=seed)
    hs, ws, t_len = 2, 3, 4
    rope_img, rope_txt, _ = net.rope(hs, ws, t_len, "cpu")
    return cfg, net, net.patch_blocks[0], hs * ws, t_len, rope_img, rope_txt


def craft(module_linear, chunks):
    with torch.no_grad():
        module_linear.weight.zero_()
        module_linear.bias.copy_(torch.cat(chunks))


@pytest.mark.parametrize("stream", ["img", "txt"])
def test_patch_block_adaln_chunk_order(stream):
    cfg, net, blk, n, t_len, rope_img, rope_txt = patch_block_setup()
    d = cfg.hidden
    lin = (blk.adaLN_modulation_img if stream == "img" else blk.adaLN_modulation_txt)[0]
    c = rand(2, 1, d, seed=20)
    x, y = rand(2, n, d, seed=21), rand(2, t_len, d, seed=22)
    x2, y2 = rand(2, n, d, seed=23), rand(2, t_len, d, seed=24)
    pick = (lambda xo, yo: xo) if stream == "img" else (lambda xo, yo: yo)
    own_in = (lambda a, b: a) if stream == "img" else (lambda a, b: b)
    r = [rand(d, seed=30 + k) for k in range(6)]
    zero, one = torch.zeros(d), torch.ones(d)

    # gates are chunks 2 and 5: zero them and the stream passes through unchanged
    craft(lin, [r[0], r[1], zero, r[3], r[4], zero])
    out = blk(x, y, c, rope_img, rope_txt)
    assert torch.equal(pick(*out), own_in(x, y))

    # chunk 1 is scale, chunk 0 shift: scale -1 makes the attention input the shift alone,
    # so the update does not depend on the stream's own value
    craft(lin, [r[0], -one, one, r[3], r[4], zero])
    d1 = pick(*blk(x, y, c, rope_img, rope_txt)) - own_in(x, y)
    xo, yo = (x2, y) if stream == "img" else (x, y2)
    d2 = pick(*blk(xo, yo, c, rope_img, rope_txt)) - own_in(xo, yo)
    torch.testing.assert_close(d1, d2, rtol=1e-5, atol=1e-5)
    assert d1.abs().max() > 1e-3

    # chunks 3, 4, 5 = shift2, scale2, gate2: with scale2 = -1 the MLP sees shift2 exactly
    g2 = rand(d, seed=40)
    craft(lin, [r[0], r[1], zero, r[3], -one, g2])
    mlp = blk.mlp_x if stream == "img" else blk.mlp_y
    s = r[3].double()
    hid = F.silu(s @ mlp.w1.weight.double().T) * (s @ mlp.w3.weight.double().T)
    want = own_in(x, y).double() + g2.double() * (hid @ mlp.w2.weight.double().T)
    got = pick(*blk(x, y, c, rope_img, rope_txt)).double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_pixel_block_adaln_is_per_pixel_256x96():
    cfg = tiny("flux-2k")
    torch.manual_seed(2)
    net = randomize(PiDNet(cfg), seed=2)
    blk = net.pixel_blocks[0]
    p2, dp = cfg.pixels_per_patch, cfg.pixel_dim
    b, hs, ws = 2, 2, 3
    rows = b * hs * ws
    _, _, rope_pix = net.rope(hs, ws, 1, "cpu")
    p = rand(rows, p2, dp, seed=50)
    s = rand(rows, cfg.hidden, seed=51)
    lin = blk.adaLN_modulation[0]
    # bias index = pixel * 6*dp + chunk * dp + channel
    bias = rand(p2, 6, dp, seed=52)
    bias[:, 2] = 0
    bias[:, 5] = 0
    target, shift2 = 5, rand(dp, seed=53)
    g2 = rand(dp, seed=54)
    bias[target, 3] = shift2
    bias[target, 4] = -1
    bias[target, 5] = g2
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.copy_(bias.reshape(-1))
    got = blk(p, s, rope_pix, b)
    others = [k for k in range(p2) if k != target]
    assert torch.equal(got[:, others], p[:, others])
    u = shift2.double()
    hid = F.gelu(u @ blk.mlp.fc1.weight.double().T + blk.mlp.fc1.bias.double())
    mlp = hid @ blk.mlp.fc2.weight.double().T + blk.mlp.fc2.bias.double()
    want = p[:, target].double() + g2.double() * mlp
    torch.testing.assert_close(got[:, target].double(), want.expand_as(want), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# SPEC §2-6: the whole forward, rebuilt functionally in float64

def f64_forward(net, x, t, text, latent, sigma):
    cfg = net.cfg
    P = {k: v.detach().double() for k, v in net.state_dict().items()}
    x, text, latent = x.double(), text.double(), latent.double()
    sigma = sigma.double()
    B, _, H, W = x.shape
    p_ = cfg.patch
    Hs, Ws = H // p_, W // p_
    L, D, eps = Hs * Ws, cfg.hidden, cfg.rms_eps

    def lin(u, name, bias=True):
        out = u @ P[name + ".weight"].T
        return out + P[name + ".bias"] if bias else out

    def rms(u, name):
        return u / torch.sqrt((u * u).mean(-1, keepdim=True) + eps) * P[name + ".weight"]

    def rot(u, ang):   # u [B, N, heads, hd], ang [N, hd/2]
        a, b = u[..., 0::2], u[..., 1::2]
        c, s = torch.cos(ang)[None, :, None], torch.sin(ang)[None, :, None]
        out = torch.empty_like(u)
        out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
        return out

    def attend(q, k, v):   # [B, N, heads, hd]
        w = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(q.shape[-1])
        w = torch.softmax(w, dim=-1)
        return torch.einsum("bhnm,bmhd->bnhd", w, v).flatten(2)

    def split3(u, heads):  # SPEC: split 3 x [heads, hd]
        return u.unflatten(-1, (3, heads, -1)).unbind(2)

    def gate(prefix, u, lq):
        logit = lin(torch.cat([u, lq], -1), prefix + ".content_proj")
        return u + torch.sigmoid(logit - math.exp(P[prefix + ".log_alpha"].item()) * sigma[:, None, None]) * lq

    def conv3(u, name, mode):
        up = F.pad(u, (1, 1, 1, 1), mode="replicate" if mode == "replicate" else "constant")
        w = P[name + ".weight"]
        h, wd = u.shape[-2:]
        taps = torch.stack([up[:, :, di:di + h, dj:dj + wd] for di in range(3) for dj in range(3)], -1)
        out = torch.einsum("bchwk,ock->bohw", taps, w.flatten(2))   # tap k = 3*di + dj
        return out + P[name + ".bias"][None, :, None, None]

    def gn(u, name, groups=cfg.adapter_groups):
        g = u.unflatten(1, (groups, -1))
        mu = g.mean((2, 3, 4), keepdim=True)
        var = ((g - mu) ** 2).mean((2, 3, 4), keepdim=True)
        g = ((g - mu) / torch.sqrt(var + cfg.gn_eps)).flatten(1, 2)
        return g * P[name + ".weight"][None, :, None, None] + P[name + ".bias"][None, :, None, None]

    # time (§2): sinusoid of t*1000, cos first, max period 10
    half = cfg.time_freq_dim // 2
    freqs = torch.tensor([math.exp(-math.log(10.0) * k / half) for k in range(half)], dtype=torch.float64)
    arg = (t.double() * 1000)[:, None] * freqs
    temb = lin(F.silu(lin(torch.cat([torch.cos(arg), torch.sin(arg)], -1), "t_embedder.mlp.0")),
               "t_embedder.mlp.2")[:, None]
    c = F.silu(temb)

    # text
    text = text[:, :cfg.max_text]
    Ly = text.shape[1]
    y = rms(lin(text, "y_embedder.proj"), "y_embedder.norm") + P["y_pos_embedding"][:, :Ly]

    # patch tokens: index c*P*P + i*P + j, patches row-major
    s0 = x.reshape(B, 3, Hs, p_, Ws, p_).permute(0, 2, 4, 1, 3, 5).reshape(B, L, 3 * p_ * p_)
    xs = lin(s0, "s_embedder.proj")

    # pixel tokens [B, L, P*P, Dp]
    pix = lin(x.permute(0, 2, 3, 1), "pixel_embedder.proj") + torch.from_numpy(sincos_loop(H, W, cfg.pixel_dim))
    pix = pix.reshape(B, Hs, p_, Ws, p_, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, L, p_ * p_, -1)

    # adapter (§5)
    mode = cfg.adapter_padding
    z = align_loop(latent, cfg, Hs, Ws)
    z = conv3(F.silu(conv3(z, "lq_proj.latent_proj.0", mode)), "lq_proj.latent_proj.2", mode)
    for r in range(cfg.adapter_res_blocks):
        pre = f"lq_proj.latent_proj.{3 + r}.block"
        h1 = conv3(F.silu(gn(z, pre + ".0")), pre + ".2", mode)
        z = z + conv3(F.silu(gn(h1, pre + ".3")), pre + ".5", mode)
    tokens = z.flatten(2).transpose(1, 2)

    # patch blocks (§4)
    hd = cfg.head_dim
    ang_img = torch.from_numpy(rope2d_loop(Hs, Ws, hd, cfg.rope_ref_grid))
    ang_txt = torch.tensor([[n * 10000.0 ** (-2 * k / hd) for k in range(hd // 2)] for n in range(Ly)],
                           dtype=torch.float64)
    for i in range(cfg.patch_blocks):
        if i % 2 == 0:
            j = i // 2
            xs = gate(f"lq_proj.gate_modules.{j}", xs, lin(tokens, f"lq_proj.output_heads.{j}"))
        pre = f"patch_blocks.{i}"
        mi = lin(c, pre + ".adaLN_modulation_img.0").chunk(6, -1)
        mt = lin(c, pre + ".adaLN_modulation_txt.0").chunk(6, -1)
        xn = rms(xs, pre + ".norm_x1") * (1 + mi[1]) + mi[0]
        yn = rms(y, pre + ".norm_y1") * (1 + mt[1]) + mt[0]
        qx, kx, vx = split3(lin(xn, pre + ".attn.qkv_x", bias=False), cfg.heads)
        qy, ky, vy = split3(lin(yn, pre + ".attn.qkv_y", bias=False), cfg.heads)
        qx, kx = rot(rms(qx, pre + ".attn.q_norm_x"), ang_img), rot(rms(kx, pre + ".attn.k_norm_x"), ang_img)
        qy, ky = rot(rms(qy, pre + ".attn.q_norm_y"), ang_txt), rot(rms(ky, pre + ".attn.k_norm_y"), ang_txt)
        o = attend(torch.cat([qy, qx], 1), torch.cat([ky, kx], 1), torch.cat([vy, vx], 1))
        xs = xs + mi[2] * lin(o[:, Ly:], pre + ".attn.proj_x")
        y = y + mt[2] * lin(o[:, :Ly], pre + ".attn.proj_y")

        def mlp(u, nm):
            return lin(F.silu(lin(u, nm + ".w1", False)) * lin(u, nm + ".w3", False), nm + ".w2", False)
        xs = xs + mi[5] * mlp(rms(xs, pre + ".norm_x2") * (1 + mi[4]) + mi[3], pre + ".mlp_x")
        y = y + mt[5] * mlp(rms(y, pre + ".norm_y2") * (1 + mt[4]) + mt[3], pre + ".mlp_y")

    # pixel blocks (§6)
    s = F.silu(temb + xs)
    if cfg.is_v15:
        s = gate("pit_lq_gate", s, lin(tokens, "lq_proj.pit_head"))
    phd = cfg.pixel_head_dim
    ang_pix = torch.from_numpy(rope2d_loop(Hs, Ws, phd, cfg.rope_ref_grid))
    dp = cfg.pixel_dim
    for i in range(cfg.pixel_blocks):
        pre = f"pixel_blocks.{i}"
        m = lin(s, pre + ".adaLN_modulation.0").reshape(B, L, p_ * p_, 6 * dp)
        sh1, sc1, g1, sh2, sc2, g2 = m.chunk(6, -1)
        u = rms(pix, pre + ".norm1") * (1 + sc1) + sh1
        a = lin(u.reshape(B, L, -1), pre + ".compress_to_attn")
        q, k, v = split3(lin(a, pre + ".attn.qkv", bias=False), cfg.pixel_heads)
        q, k = rot(rms(q, pre + ".attn.q_norm"), ang_pix), rot(rms(k, pre + ".attn.k_norm"), ang_pix)
        a = lin(attend(q, k, v), pre + ".attn.proj")
        pix = pix + g1 * lin(a, pre + ".expand_from_attn").reshape(B, L, p_ * p_, dp)
        u = rms(pix, pre + ".norm2") * (1 + sc2) + sh2
        u = lin(0.5 * (h := lin(u, pre + ".mlp.fc1")) * (1 + torch.erf(h / math.sqrt(2))), pre + ".mlp.fc2")
        pix = pix + g2 * u
    val = lin(rms(pix, "final_layer.norm"), "final_layer.linear")           # [B, L, P*P, 3]
    out = torch.empty(B, 3, H, W, dtype=torch.float64)
    for hs_ in range(Hs):
        for ws_ in range(Ws):
            blockv = val[:, hs_ * Ws + ws_].reshape(B, p_, p_, 3)             # pixel 16*i + j
            out[:, :, p_ * hs_:p_ * (hs_ + 1), p_ * ws_:p_ * (ws_ + 1)] = blockv.permute(0, 3, 1, 2)
    return out


@pytest.mark.parametrize("base,latent_hw", [("flux-2k", (1, 2)), ("flux2-2kto4k-v1.5", (1, 2)),
                                            ("qwenimage-2kto4k-v1.5", (2, 1))])
def test_forward_matches_float64_rebuild(base, latent_hw):
    cfg = tiny(base)
    torch.manual_seed(5)
    net = randomize(PiDNet(cfg), seed=5).eval()
    b = 2
    H, W = cfg.output_size(*latent_hw)
    assert H != W
    x = rand(b, 3, H, W, seed=60)
    t = torch.tensor([0.866, 0.342])
    text = rand(b, 7, cfg.text_dim, seed=61)
    latent = rand(b, cfg.latent_channels, *latent_hw, seed=62)
    sigma = torch.tensor([0.05, 0.6])
    with torch.no_grad():
        got = net(x, t, text, latent, sigma)
    want = f64_forward(net, x, t, text, latent, sigma)
    assert got.shape == (b, 3, H, W) and got.dtype == torch.float32
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item()
    assert scale > 1e-2
    assert err <= 2e-5 * scale, f"{base}: max error {err:.3e} vs scale {scale:.3e}"
    # the two samples differ in t and sigma: each must have used its own
    with torch.no_grad():
        swapped = net(x, t.flip(0), text, latent, sigma.flip(0))
    assert (swapped - got).abs().max() > 1e-4


def test_last_block_text_update_is_unused(monkeypatch):
    cfg = tiny("flux-2kto4k-v1.5", patch_blocks=3)
    torch.manual_seed(6)
    net = randomize(PiDNet(cfg), seed=6).eval()
    lh, lw = 1, 2
    H, W = cfg.output_size(lh, lw)
    args = (rand(2, 3, H, W, seed=70), torch.tensor([0.5, 0.9]), rand(2, 5, cfg.text_dim, seed=71),
            rand(2, cfg.latent_channels, lh, lw, seed=72), torch.tensor([0.3, 0.0]))
    calls = []
    orig = ref.PatchBlock.forward

    def always_update(self, *a, update_text=True, **k):
        calls.append(update_text)
        return orig(self, *a, update_text=True, **k)

    with torch.no_grad():
        plain = net(*args)
        monkeypatch.setattr(ref.PatchBlock, "forward", always_update)
        full = net(*args)
    assert calls == [True, True, False]     # the skip is taken, and only on the last block
    assert torch.equal(plain, full)
