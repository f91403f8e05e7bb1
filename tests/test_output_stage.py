"""The fused output stage (pidkern._C: pixel head + fold + sampler update) against the
released PyTorch chain in float64, on CPU (always) and CUDA (marked)."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pidkern import _ext
from tests.tolerance import assert_within_rule, poison

needs_ext = pytest.mark.skipif(not _ext.HAS_EXT, reason="pidkern._C not built")
ops = torch.ops.pidkern

T_LIST = [0.999, 0.866, 0.634, 0.342, 0.0]
PAIRS = list(zip(T_LIST[:-1], T_LIST[1:])) + [(1.0, 0.0)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make(B, H, W, P, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    L = (H // P) * (W // P)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    d = dict(tokens=(r(B * L, P * P, 16) * 1.5 + 0.3).to(dtype), norm_w=(1 + 0.2 * r(16)).to(dtype),
             lin_w=(0.3 * r(3, 16)).to(dtype), lin_b=(0.1 * r(3)).to(dtype), x_t=r(B, 3, H, W), noise=r(B, 3, H, W))
    return {k: v.to(device) for k, v in d.items()}


def head64(d, P, eps=1e-6):
    """Pixel head and fold in float64, no intermediate rounding: [B, 3, H, W]."""
    x = d["tokens"].double()
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * d["norm_w"].double()
    v = h @ d["lin_w"].double().T + d["lin_b"].double()
    B, _, H, W = d["x_t"].shape
    out = torch.empty(B, 3, H, W, dtype=v.dtype, device=v.device)
    Ws = W // P
    for hs in range(H // P):           # SPEC: out[b, c, P*hs+i, P*ws+j] = v[b*L + hs*Ws + ws, P*i+j, c]
        for ws in range(Ws):
            rows = v.view(B, -1, P * P, 3)[:, hs * Ws + ws]          # [B, P*P, 3]
            out[:, :, P * hs:P * (hs + 1), P * ws:P * (ws + 1)] = rows.view(B, P, P, 3).permute(0, 3, 1, 2)
    return out


def update64(v64, x_t, t, tn, noise):
    x0 = x_t.double() - t * v64
    return x0.clamp(-1, 1) if tn == 0 else (1 - tn) * x0 + tn * noise.double()


def scalar(v, device, dtype=torch.float32):
    return torch.tensor(v, dtype=dtype, device=device)


def step(d, t, tn, P, device, noise=True, seed=None, stp=None, tdtype=torch.float32):
    return ops.pixel_output_step(d["tokens"], d["norm_w"], d["lin_w"], d["lin_b"], d["x_t"], scalar(t, device, tdtype),
                                 scalar(tn, device, tdtype), d["noise"] if noise else None, seed, stp, P, 1e-6)


# ------------------------------------------------------------------------ CPU
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_step_explicit_noise_every_schedule_pair(dtype):
    B, H, W, P = 2, 272, 400, 16
    d = make(B, H, W, P, dtype)
    v64 = head64(d, P)
    for t, tn in PAIRS:
        # the reference sees t as the float32 value the op is given
        t32, tn32 = float(scalar(t, "cpu")), float(scalar(tn, "cpu"))
        ref = update64(v64, d["x_t"], t32, tn32, d["noise"])
        chain = _ext.reference_output_step(d["tokens"], d["norm_w"], d["lin_w"], d["lin_b"], d["x_t"],
                                           scalar(t, "cpu"), scalar(tn, "cpu"), d["noise"], P)
        out = step(d, t, tn, P, "cpu")
        assert out.dtype == torch.float32 and out.shape == (B, 3, H, W)
        assert_within_rule(out, chain, ref, f"{dtype} t={t}->{tn}")
        if tn == 0:
            assert out.abs().max() <= 1


@needs_ext
def test_float64_t_reproduces_release_update_exactly():
    # float32 tokens, t as float64 (the release's Python floats): the update must be the
    # float64 chain rounded once, so it equals the chain's result bit for bit when v does.
    B, H, W, P = 1, 48, 80, 16
    d = make(B, H, W, P, torch.float32, seed=3)
    v = torch.zeros(B, 3, H, W)  # lin_w = lin_b = 0: v is exactly zero on both sides
    d["lin_w"].zero_()
    d["lin_b"].zero_()
    for t, tn in PAIRS:
        out = step(d, t, tn, P, "cpu", tdtype=torch.float64)
        x0 = d["x_t"].double() - t * v.double()
        want = (x0.clamp(-1, 1) if tn == 0 else (1 - tn) * x0 + tn * d["noise"].double()).float()
        assert torch.equal(out, want), f"t={t}->{tn}"


@needs_ext
def test_philox_stream_statistics_and_keying():
    shape = (2, 3, 272, 400)
    s, st = torch.tensor(20260517), torch.tensor(2)
    z = ops.philox_normal(s, st, list(shape))
    n = z.numel()
    assert z.shape == shape and z.dtype == torch.float32 and torch.isfinite(z).all()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.std().item() - 1) < 5 * math.sqrt(2 / n) + 1e-3
    for k, p in ((1, 0.3173), (2, 0.0455), (3, 0.0027)):  # two-sided normal tails
        frac = (z.abs() > k).double().mean().item()
        assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n), (k, frac, p)
    # lanes of a Philox group are independent: neighbours uncorrelated
    flat = z.flatten().double()
    assert abs((flat[1:] * flat[:-1]).mean().item()) < 5 / math.sqrt(n)
    assert torch.equal(z, ops.philox_normal(s, st, list(shape))), "not deterministic per (seed, step)"
    for other in (ops.philox_normal(s, st + 1, list(shape)), ops.philox_normal(s + 1, st, list(shape))):
        assert (other == z).double().mean().item() < 1e-4, "stream does not change with step/seed"
    # 64-bit keys: the high words count too
    hi = ops.philox_normal(s + (1 << 40), st, list(shape))
    assert (hi == z).double().mean().item() < 1e-4
    # not torch's stream (documented): a sanity check that we did not claim otherwise
    assert not torch.equal(z, torch.randn(shape, generator=torch.Generator().manual_seed(20260517)))


@needs_ext
def test_philox_fallback_is_bit_identical():
    for seed, stp in ((0, 0), (123456789012345, 3), (-7, 1 << 33)):
        s, st = torch.tensor(seed), torch.tensor(stp)
        a = ops.philox_normal(s, st, [3, 3, 37, 41])
        b = _ext.philox_normal_torch(s, st, (3, 3, 37, 41))
        assert torch.equal(a, b), (seed, stp, (a - b).abs().max())


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_step_philox_noise(dtype):
    B, H, W, P = 2, 272, 400, 16
    d = make(B, H, W, P, dtype, seed=1)
    s, st = torch.tensor(99), torch.tensor(1)
    v64 = head64(d, P)
    for t, tn in PAIRS:
        out = step(d, t, tn, P, "cpu", noise=False, seed=s, stp=st)
        eps = ops.philox_normal(s, st, list(d["x_t"].shape))
        same = step(dict(d, noise=eps), t, tn, P, "cpu")
        assert torch.equal(out, same), f"t={t}->{tn}: in-kernel noise is not the debug stream"
        t32, tn32 = float(scalar(t, "cpu")), float(scalar(tn, "cpu"))
        chain = _ext.reference_output_step(d["tokens"], d["norm_w"], d["lin_w"], d["lin_b"], d["x_t"],
                                           scalar(t, "cpu"), scalar(tn, "cpu"), eps, P)
        assert_within_rule(out, chain, update64(v64, d["x_t"], t32, tn32, eps), f"philox {dtype} t={t}->{tn}")
    # a new seed in the same tensor (what a graph replay sees) changes the re-noised result
    a = step(d, 0.866, 0.634, P, "cpu", noise=False, seed=s, stp=st)
    s.fill_(100)
    b = step(d, 0.866, 0.634, P, "cpu", noise=False, seed=s, stp=st)
    assert (a == b).double().mean().item() < 1e-3


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_final_uint8(dtype):
    B, H, W, P = 2, 272, 400, 16
    d = make(B, H, W, P, dtype, seed=2)
    out, img = ops.pixel_output_final(d["tokens"], d["norm_w"], d["lin_w"], d["lin_b"], d["x_t"],
                                      scalar(0.342, "cpu"), P, 1e-6)
    assert img.dtype == torch.uint8 and img.shape == (B, H, W, 3)
    same = step(d, 0.342, 0.0, P, "cpu")
    assert torch.equal(out, same)
    assert torch.equal(img, _ext.to_uint8(out).permute(0, 2, 3, 1))
    ref = update64(head64(d, P), d["x_t"], float(scalar(0.342, "cpu")), 0.0, None)
    assert (img.permute(0, 3, 1, 2).int() - ((ref + 1) * 127.5).round().int()).abs().max() <= 1


@needs_ext
def test_uint8_rounds_half_to_even():
    # v = 0 (zero linear layer), t = 1: the output is x_t itself, so x_t can place values
    # exactly on the .5 ties of (x + 1) * 127.5
    B, H, W, P = 1, 16, 272, 16
    d = make(B, H, W, P, torch.float32, seed=4)
    d["lin_w"].zero_()
    d["lin_b"].zero_()
    k = torch.arange(B * 3 * H * W) % 256
    d["x_t"] = ((k.float() + 0.5) / 127.5 - 1).clamp(-1, 1).reshape(B, 3, H, W)
    out, img = ops.pixel_output_final(d["tokens"], d["norm_w"], d["lin_w"], d["lin_b"], d["x_t"],
                                      scalar(1.0, "cpu"), P, 1e-6)
    y = (out + 1) * 127.5
    ties = y == y.floor() + 0.5
    assert ties.sum() > 100, "test does not exercise ties"
    want = _ext.to_uint8(out)
    assert torch.equal(img.permute(0, 3, 1, 2), want)
    assert (want[ties].int() % 2 == 0).all(), "ties not to even"


@needs_ext
@pytest.mark.parametrize("P,H,W", [(2, 6, 10), (8, 24, 40), (4, 12, 20)])
def test_other_patch_sizes(P, H, W):
    B = 3
    d = make(B, H, W, P, torch.float16, seed=5)
    v64 = head64(d, P)
    chain = _ext.reference_output_step(d["tokens"], d["norm_w"], d["lin_w"], d["lin_b"], d["x_t"],
                                       scalar(0.634, "cpu"), scalar(0.342, "cpu"), d["noise"], P)
    ref = update64(v64, d["x_t"], float(scalar(0.634, "cpu")), float(scalar(0.342, "cpu")), d["noise"])
    assert_within_rule(step(d, 0.634, 0.342, P, "cpu"), chain, ref, f"P={P}")


@needs_ext
def test_fallback_matches_extension():
    B, H, W, P = 1, 32, 48, 16
    d = make(B, H, W, P, torch.float32, seed=6)
    args = (d["tokens"], d["norm_w"], d["lin_w"], d["lin_b"], d["x_t"], scalar(0.866, "cpu"), scalar(0.634, "cpu"))
    s, st = torch.tensor(5), torch.tensor(1)
    a = _ext.pixel_output_step(*args, seed=s, step=st, patch=P, use_ext=True)
    b = _ext.pixel_output_step(*args, seed=s, step=st, patch=P, use_ext=False)
    ref = update64(head64(d, P), d["x_t"], 0.866, 0.634, ops.philox_normal(s, st, [B, 3, H, W]))
    assert_within_rule(a, b, ref.float().double(), "ext vs fallback")
    fa = _ext.pixel_output_final(*args[:6], patch=P, use_ext=True)
    fb = _ext.pixel_output_final(*args[:6], patch=P, use_ext=False)
    assert (fa[1].int() - fb[1].int()).abs().max() <= 1


@needs_ext
def test_argument_errors():
    B, H, W, P = 1, 32, 48, 16
    d = make(B, H, W, P, torch.float32)
    t, tn = scalar(0.5, "cpu"), scalar(0.3, "cpu")
    base = [d["tokens"], d["norm_w"], d["lin_w"], d["lin_b"], d["x_t"], t, tn]
    with pytest.raises(RuntimeError, match="tokens"):
        ops.pixel_output_step(d["tokens"][:, :100], *base[1:], d["noise"], None, None, P, 1e-6)
    with pytest.raises(RuntimeError, match="exactly one noise source"):
        ops.pixel_output_step(*base, d["noise"], torch.tensor(1), torch.tensor(1), P, 1e-6)
    with pytest.raises(RuntimeError, match="x_t"):
        ops.pixel_output_step(*base[:4], d["x_t"].double(), t, tn, d["noise"], None, None, P, 1e-6)
    with pytest.raises(RuntimeError, match="seed"):
        ops.pixel_output_step(*base, None, torch.tensor(1.0), torch.tensor(1), P, 1e-6)
    with pytest.raises(RuntimeError, match="multiples of patch"):
        ops.pixel_output_step(*base, d["noise"], None, None, 12, 1e-6)


@needs_ext
def test_opcheck():
    B, H, W, P = 1, 16, 48, 16
    d = make(B, H, W, P, torch.bfloat16, seed=7)
    t, tn = scalar(0.634, "cpu"), scalar(0.342, "cpu")
    w = (d["tokens"], d["norm_w"], d["lin_w"], d["lin_b"], d["x_t"])
    torch.library.opcheck(ops.pixel_output_step.default, (*w, t, tn, d["noise"], None, None, P, 1e-6))
    torch.library.opcheck(ops.pixel_output_step.default, (*w, t, tn, None, torch.tensor(3), torch.tensor(1), P, 1e-6))
    torch.library.opcheck(ops.pixel_output_final.default, (*w, t, P, 1e-6))
    torch.library.opcheck(ops.philox_normal.default, (torch.tensor(3), torch.tensor(1), [2, 3, 5]))


@needs_ext
def test_traces_under_torch_compile():
    B, H, W, P = 1, 16, 32, 16
    d = make(B, H, W, P, torch.float32, seed=8)
    t, tn, s, st = scalar(0.634, "cpu"), scalar(0.342, "cpu"), torch.tensor(3), torch.tensor(1)

    def f(tokens, x_t):
        return _ext.pixel_output_step(tokens, d["norm_w"], d["lin_w"], d["lin_b"], x_t, t, tn, seed=s, step=st,
                                      patch=P)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(d["tokens"], d["x_t"]), f(d["tokens"], d["x_t"]))


@needs_ext
@pytest.mark.parametrize("order", ["fragment-first", "extension-first"])
def test_torch_library_coexists_with_python_fragments(order):
    # Triton ops register pidkern::<name> through torch.library.custom_op (FRAGMENT
    # libraries); the extension's TORCH_LIBRARY(pidkern) must live beside them.
    probe = textwrap.dedent("""
        import torch
        def define():
            @torch.library.custom_op("pidkern::_coexist_probe", mutates_args=())
            def probe(x: torch.Tensor) -> torch.Tensor:
                return x + 1
        def load():
            import pidkern._C  # noqa: F401
        steps = [define, load] if ORDER == "fragment-first" else [load, define]
        for s in steps:
            s()
        assert torch.equal(torch.ops.pidkern._coexist_probe(torch.ones(2)), torch.full((2,), 2.0))
        z = torch.ops.pidkern.philox_normal(torch.tensor(1), torch.tensor(0), [8])
        assert z.shape == (8,)
        print("ok")
    """).replace("ORDER", repr(order))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=root, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


# ------------------------------------------------------------------------ CUDA
def to(d, device):
    return {k: v.to(device) for k, v in d.items()}


def nan_poisoned_allocator(*shapes_dtypes):
    """Leave NaN-filled blocks of the op's output sizes in the caching allocator, so an
    unwritten output element shows as NaN."""
    for shape, dtype in shapes_dtypes:
        x = torch.empty(shape, dtype=dtype, device="cuda")
        poison(x) if dtype.is_floating_point else x.fill_(0xAB)
        del x


@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_cpu_bitwise_and_reference(dtype):
    B, H, W, P = 2, 272, 400, 16
    d = make(B, H, W, P, dtype, seed=11)
    g = to(d, "cuda")
    v64 = head64(d, P)
    s, st = torch.tensor(77), torch.tensor(2)
    for t, tn in PAIRS:
        nan_poisoned_allocator(((B, 3, H, W), torch.float32))
        out = step(g, t, tn, P, "cuda")
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), "unwritten output elements"
        t32, tn32 = float(scalar(t, "cpu")), float(scalar(tn, "cpu"))
        chain = _ext.reference_output_step(g["tokens"], g["norm_w"], g["lin_w"], g["lin_b"], g["x_t"],
                                           scalar(t, "cuda"), scalar(tn, "cuda"), g["noise"], P)
        assert_within_rule(out.cpu(), chain.cpu(), update64(v64, d["x_t"], t32, tn32, d["noise"]), f"cuda {dtype} {t}")
        cpu = step(d, t, tn, P, "cpu")
        assert torch.equal(out.cpu(), cpu), f"{dtype} t={t}->{tn}: CUDA != CPU, max {(out.cpu() - cpu).abs().max()}"
        # in-kernel noise
        nan_poisoned_allocator(((B, 3, H, W), torch.float32))
        outp = step(g, t, tn, P, "cuda", noise=False, seed=s.cuda(), stp=st.cuda())
        cpup = step(d, t, tn, P, "cpu", noise=False, seed=s, stp=st)
        assert torch.equal(outp.cpu(), cpup), f"{dtype} t={t}->{tn}: CUDA Philox step != CPU"


@pytest.mark.cuda
@needs_ext
def test_cuda_philox_bitwise():
    for seed, stp in ((0, 0), (20260517, 3), (-1, 1 << 35)):
        for size in ([2, 3, 272, 400], [7]):
            a = ops.philox_normal(torch.tensor(seed, device="cuda"), torch.tensor(stp, device="cuda"), size)
            b = ops.philox_normal(torch.tensor(seed), torch.tensor(stp), size)
            assert torch.equal(a.cpu(), b), (seed, stp, size, (a.cpu() - b).abs().max())


@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_final_uint8(dtype):
    B, H, W, P = 2, 272, 400, 16
    d = make(B, H, W, P, dtype, seed=12)
    g = to(d, "cuda")
    nan_poisoned_allocator(((B, 3, H, W), torch.float32), ((B, H, W, 3), torch.uint8))
    out, img = ops.pixel_output_final(g["tokens"], g["norm_w"], g["lin_w"], g["lin_b"], g["x_t"],
                                      scalar(0.342, "cuda"), P, 1e-6)
    cout, cimg = ops.pixel_output_final(d["tokens"], d["norm_w"], d["lin_w"], d["lin_b"], d["x_t"],
                                        scalar(0.342, "cpu"), P, 1e-6)
    assert torch.equal(out.cpu(), cout) and torch.equal(img.cpu(), cimg)
    assert torch.equal(img, _ext.to_uint8(out).permute(0, 2, 3, 1))


@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("P,H,W", [(2, 6, 10), (8, 24, 40), (16, 48, 1040)])
def test_cuda_other_shapes_match_cpu(P, H, W):
    # P=2, W=10: the scalar (unvectorised) path; W=1040: a partial span of patches
    B = 3
    d = make(B, H, W, P, torch.bfloat16, seed=13)
    g = to(d, "cuda")
    s, st = torch.tensor(5), torch.tensor(1)
    for noise in (True, False):
        nan_poisoned_allocator(((B, 3, H, W), torch.float32))
        a = step(g, 0.866, 0.634, P, "cuda", noise=noise, seed=None if noise else s.cuda(), stp=None if noise else st.cuda())
        b = step(d, 0.866, 0.634, P, "cpu", noise=noise, seed=None if noise else s, stp=None if noise else st)
        assert torch.equal(a.cpu(), b), (P, H, W, noise)


@pytest.mark.cuda
@needs_ext
def test_cuda_graph_replay_reads_device_scalars():
    B, H, W, P = 1, 64, 96, 16
    g = to(make(B, H, W, P, torch.bfloat16, seed=14), "cuda")
    t, tn = scalar(0.999, "cuda"), scalar(0.866, "cuda")
    s, st = torch.tensor(1, device="cuda"), torch.tensor(1, device="cuda")
    args = lambda: (g["tokens"], g["norm_w"], g["lin_w"], g["lin_b"], g["x_t"], t, tn, None, s, st, P, 1e-6)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.pixel_output_step(*args())  # warm up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.pixel_output_step(*args())
    for tv, tnv, sv, stv in ((0.866, 0.634, 2, 2), (0.342, 0.0, 3, 4)):
        t.fill_(tv)
        tn.fill_(tnv)
        s.fill_(sv)
        st.fill_(stv)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, ops.pixel_output_step(*args())), (tv, tnv, sv, stv)
