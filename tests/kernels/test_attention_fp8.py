"""8-bit attention routes against float64, under the fp8 form of the tolerance rule.

"PyTorch's own error in the same precision" is, for an fp8 route, float32 attention on the
same e4m3-quantized values (q, k; v and the softmax probabilities P too where the route
quantizes them), written here from the documented scaling scheme (docs/attention_fp8.md):
the kernel's error against the float64 attention of the unquantized q, k, v may be at most
twice that emulation's. Library routes run against stand-in modules that check what they
receive (layout, dtype, padding, scales) and compute the attention in torch, so the glue
around each library is what is tested.
"""
from __future__ import annotations

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from pidkern import ops
from tests.kernels.test_attention import DEV, call, make, prep64, ref64
from tests.tolerance import assert_within_rule

E4M3_MAX = 448.0
TRITON_8BIT = ("fp8-triton", "prep+fp8-triton", "fp8qk-triton", "prep+fp8qk-triton", "int8-triton", "prep+int8-triton",
               "int8qk-triton", "prep+int8qk-triton")


def mode_of(backend: str) -> tuple[bool, bool]:
    """(QK^T in int8 rather than e4m3, PV in e4m3) of a Triton 8-bit route."""
    mode = backend.removeprefix("prep+").removesuffix("-triton")
    return mode.startswith("int8"), not mode.endswith("qk")


# ------------------------------------------------------------------------ the fp8 emulation

def e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round to float8_e4m3fn (nearest even), back in x's dtype."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(x.dtype)


def quant(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """x quantized with the scale that maps amax onto 448 (amax broadcast against x)."""
    return e4m3(x * (E4M3_MAX / amax)) * (amax / E4M3_MAX)


def tile_amax(q: torch.Tensor, starts, block: int) -> torch.Tensor:
    """|q|'s max per (batch, query tile, head) broadcast back to q's shape [B, N, H, hd]; the
    tiles are `block` rows from each start in `starts` (a source's first row) to the next."""
    out = torch.empty_like(q)
    bounds = list(starts) + [q.shape[1]]
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        for r in range(s0, s1, block):
            r1 = min(r + block, s1)
            out[:, r:r1] = q[:, r:r1].abs().amax((1, 3), keepdim=True)
    return out


def quant_i8(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """x rounded to int8 steps of amax / 127."""
    return torch.round(x * (127 / amax)).clamp(-127, 127) * (amax / 127)


def emulate(q, k, v, q_amax, k_amax, pv: bool, int8: bool = False) -> torch.Tensor:
    """float32 attention on quantized q, k (int8 or e4m3; P and v in e4m3 when pv): [B, N, H*hd]."""
    hd = q.shape[-1]
    qz = quant_i8 if int8 else quant
    q8, k8 = qz(q, q_amax).float(), qz(k, k_amax).float()
    if not pv:
        o = F.scaled_dot_product_attention(q8.transpose(1, 2), k8.transpose(1, 2), v.float().transpose(1, 2))
        return o.transpose(1, 2).flatten(2)
    v8 = quant(v, v.abs().amax(1, keepdim=True)).float()         # per (batch, head, channel)
    s = torch.einsum("bnhd,bmhd->bhnm", q8, k8) / math.sqrt(hd)
    p = torch.exp(s - s.amax(-1, keepdim=True))
    p8 = e4m3(p * E4M3_MAX) / E4M3_MAX
    o = torch.einsum("bhnm,bmhd->bnhd", p8, v8) / p.sum(-1).transpose(1, 2)[..., None]
    return o.flatten(2)


def block_m() -> int:
    from pidkern.kernels._common import INTERPRET_FAMILY
    from pidkern.kernels.attention import _configs
    return _configs(INTERPRET_FAMILY)[0].kwargs["BLOCK_M"]   # the tests run in the interpreter


def fp8_reference(qkv_img, qkv_txt, w, tabs, heads, backend):
    """(float64 attention, the fp8 emulation of `backend`), both [B, T+L, H*hd], text first."""
    q, k, v, T = prep64(qkv_img, qkv_txt, w, tabs, heads)
    hd = q.shape[-1]
    B, N, H, _ = q.shape
    r = torch.cat(ref64(qkv_img, qkv_txt, w, tabs, heads)[::-1], 1)
    int8, pv = mode_of(backend)
    if int8:   # q per row, k per token
        return r, emulate(q, k, v, q.abs().amax(-1, keepdim=True), k.abs().amax(-1, keepdim=True), pv, int8=True)
    if backend.startswith("prep+"):
        # the core: q tiles over [text; image], k's scale its amax per (batch, head)
        q_amax = tile_amax(q, [0], block_m())
        k_amax = k.abs().amax((1, 3), keepdim=True)
    else:
        # the fused kernel: q tiles per source; k's scale per source, sqrt(hd) * max|k-norm weight|
        q_amax = tile_amax(q, [0, T] if T else [0], block_m())
        k_amax = torch.empty(B, N, H, 1, dtype=torch.float64, device=q.device)
        k_amax[:, T:] = math.sqrt(hd) * w[1].abs().max().double()
        if T:
            k_amax[:, :T] = math.sqrt(hd) * w[3].abs().max().double()
    return r, emulate(q, k, v, q_amax, k_amax, pv)


def check_fp8(B, hs, ws, T, heads, hd, dtype, backend, seed):
    qkv_img, qkv_txt, w, tabs = make(B, hs, ws, T, heads, hd, dtype, seed=seed)
    r, emu = fp8_reference(qkv_img, qkv_txt, w, tabs, heads, backend)
    o_img, o_txt = call(qkv_img, qkv_txt, w, tabs, heads, backend)
    assert o_img.dtype == dtype and o_img.shape == (B, hs * ws, heads * hd)
    assert (o_txt is None) == (T == 0)
    o = torch.cat([o_txt, o_img], 1) if T else o_img
    assert_within_rule(o, emu, r, f"{backend} hd{hd} {dtype}")
    return ((o.double() - r).norm() / r.norm()).item()


# ---------------------------------------------------------------------------- Triton fp8

@pytest.mark.parametrize("backend", TRITON_8BIT)
@pytest.mark.parametrize("hd,T,dtype", [(64, 5, torch.float32), (72, 0, torch.float16)])
def test_8bit_triton_within_rule(backend, hd, T, dtype):
    # the patch (hd 64, text) and pixel (hd 72, none) cases: 37 image tokens in a 1 x 37 grid
    # (not a tile multiple), 5 text tokens, batch 2, 2 heads
    rel = check_fp8(2, 1, 37, T, 2, hd, dtype, backend, seed=11 + hd + T)
    # e4m3's 3 mantissa bits on q and k cost a few percent of the output here (random heads
    # attend broadly, so the output is a small average); int8 with per-row scales about 1%:
    # docs/attention_fp8.md
    assert rel < (0.02 if mode_of(backend) == (True, False) else 0.08), f"{backend}: relative error {rel:.3e}"
    print(f"{backend} hd{hd} T{T} {dtype}: rel L2 vs float64 {rel:.3e}")


def test_8bit_kernel_quantizes():
    # each 8-bit mode must differ from the 16/32-bit kernel and from the others: a mode flag
    # that changed nothing would pass the rule above too
    qkv_img, qkv_txt, w, tabs = make(1, 2, 9, 3, 1, 64, torch.float32, seed=5)
    outs = [call(qkv_img, qkv_txt, w, tabs, 1, b)[0] for b in ("triton", "fp8qk-triton", "fp8-triton", "int8qk-triton",
                                                               "int8-triton")]
    for i in range(len(outs)):
        for j in range(i):
            assert (outs[i] - outs[j]).abs().max() > 1e-4, (i, j)


def test_8bit_core_rejects_bad_mode():
    from pidkern.kernels.attention import attention_core
    q = torch.randn(1, 5, 1, 64, device=DEV)
    with pytest.raises(ValueError, match="mode"):
        attention_core(q, q, q, mode="fp4")


def test_fp8_opcheck():
    from pidkern.kernels import attention as K  # noqa: F401
    qkv_img, qkv_txt, w, tabs = make(1, 2, 3, 2, 1, 64, torch.float32)
    args = (qkv_img, qkv_txt, w[0], w[1], w[2], w[3], *tabs[0], *tabs[1], 1, 1e-6)
    torch.library.opcheck(torch.ops.pidkern.attention_8bit.default, (*args, "fp8"))
    q, k, v = torch.ops.pidkern.attention_prep(*args)
    torch.library.opcheck(torch.ops.pidkern.attention_core_8bit.default, (q, k, v, "int8qk"))


# ------------------------------------------------------------------ library routes, stand-ins

def sdpa32(q, k, v, scale):
    """float32 attention on [B, N, H, d] tensors (the stand-ins' own math)."""
    o = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)), scale=scale)
    return o.transpose(1, 2)


def assert_padded(t, hd, width):
    assert t.shape[-1] == width, f"head dim {t.shape[-1]}, expected {width}"
    assert t.stride(-1) == 1
    if width > hd:
        assert (t[..., hd:].float() == 0).all(), "padding columns must be zero"


def fake_flash(hd, seen):
    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kw):
        assert q.dtype in (torch.float16, torch.bfloat16) and q.shape == k.shape == v.shape
        assert not causal and dropout_p == 0.0 and softmax_scale == pytest.approx(1 / math.sqrt(hd))
        assert_padded(q, hd, hd)
        seen.append(tuple(q.shape))
        return sdpa32(q, k, v, softmax_scale).to(q.dtype)
    return types.SimpleNamespace(flash_attn_func=flash_attn_func)


def fake_sage(hd, seen):
    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, **kw):
        assert tensor_layout == "NHD" and not is_causal
        assert sm_scale == pytest.approx(1 / math.sqrt(hd))
        assert_padded(q, hd, 64 if hd <= 64 else 96)   # SageAttention 1.0.6 takes 64, 96, 128
        assert_padded(k, hd, q.shape[-1])
        assert_padded(v, hd, q.shape[-1])
        seen.append(tuple(q.shape))
        return sdpa32(q, k, v, sm_scale).to(q.dtype)
    return types.SimpleNamespace(sageattn=sageattn)


def fake_flash3(hd, seen):
    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                        v_descale=None, **kw):
        B, N, H, d = q.shape
        assert q.dtype == k.dtype == v.dtype == torch.float8_e4m3fn
        assert d % 16 == 0 and not causal and softmax_scale == pytest.approx(1 / math.sqrt(hd))
        for t in (q, k, v):
            assert_padded(t, hd, -(-hd // 16) * 16)
        for ds in (q_descale, k_descale, v_descale):
            assert ds.shape == (B, H) and ds.dtype == torch.float32
        deq = [t.float() * ds[:, None, :, None] for t, ds in ((q, q_descale), (k, k_descale), (v, v_descale))]
        seen.append(tuple(q.shape))
        return sdpa32(*deq, softmax_scale).to(torch.bfloat16), None   # FA3 returns (out, lse) in some releases
    return types.SimpleNamespace(flash_attn_func=flash_attn_func)


class FakeCudnn:
    """The slice of the cuDNN frontend's graph API that the fp8 SDPA route uses. Tensors are
    described by dims and strides; execute reads the variant pack through them (so a wrong
    [B, N, H, d] -> [B, H, N, d] stride claim gives a wrong answer)."""

    class data_type:
        FP8_E4M3, FLOAT, BFLOAT16 = "fp8_e4m3", "float", "bf16"

    class heur_mode:
        A, FALLBACK = "a", "fallback"

    def __init__(self, hd, bf16_out_ok, seen):
        self.hd, self.bf16_out_ok, self.seen = hd, bf16_out_ok, seen
        outer = self

        class Tensor:
            def __init__(self, name=None, dim=None, stride=None, data_type=None):
                self.name, self.dim, self.stride, self.data_type, self.output = name, dim, stride, data_type, False

            def set_output(self, flag):
                self.output = flag
                return self

            def set_dim(self, dim):
                self.dim = list(dim)
                return self

            def set_stride(self, stride):
                self.stride = list(stride)
                return self

            def set_data_type(self, dt):
                self.data_type = dt
                return self

        class pygraph:
            def __init__(self, io_data_type=None, intermediate_data_type=None, compute_data_type=None, handle=None):
                assert io_data_type == FakeCudnn.data_type.FP8_E4M3
                assert compute_data_type == FakeCudnn.data_type.FLOAT
                self.built = False

            def tensor(self, **kw):
                return Tensor(**kw)

            def sdpa_fp8(self, q, k, v, descale_q, descale_k, descale_v, descale_s, scale_s, scale_o,
                         generate_stats=True, attn_scale=None, use_causal_mask=False, **kw):
                assert not generate_stats and not use_causal_mask
                assert attn_scale == pytest.approx(1 / math.sqrt(outer.hd))
                self.io = dict(q=q, k=k, v=v, descale_q=descale_q, descale_k=descale_k, descale_v=descale_v,
                               descale_s=descale_s, scale_s=scale_s, scale_o=scale_o)
                self.o, self.amax_s, self.amax_o = Tensor(), Tensor(), Tensor()
                self.scale = attn_scale
                return self.o, None, self.amax_s, self.amax_o

            def validate(self):
                pass

            def build_operation_graph(self):
                pass

            def create_execution_plans(self, modes):
                pass

            def check_support(self):
                if self.o.data_type == FakeCudnn.data_type.BFLOAT16 and not outer.bf16_out_ok:
                    raise RuntimeError("no bf16 output for fp8 SDPA on this card (as on Hopper)")

            def build_plans(self):
                self.built = True

            def get_workspace_size(self):
                return 16

            def execute(self, pack, workspace, handle=None):
                assert self.built
                io = self.io

                def view(t):   # the pack's tensor seen through the graph tensor's dims and strides
                    x = pack[t]
                    assert x.dtype == torch.float8_e4m3fn and x.is_contiguous()
                    return torch.as_strided(x.float(), t.dim, t.stride)     # [B, H, N, d]
                for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
                    assert pack[io[name]].shape == (1, 1, 1, 1) and pack[io[name]].dtype == torch.float32
                assert pack[io["scale_s"]].item() * pack[io["descale_s"]].item() == pytest.approx(1.0)
                q, k, v = (view(io[n]) * pack[io["descale_" + n]] for n in ("q", "k", "v"))
                assert q.shape[-1] % 16 == 0
                outer.seen.append(tuple(q.shape))
                p = (torch.softmax(q @ k.transpose(-1, -2) * self.scale, -1) * pack[io["scale_s"]]).to(
                    torch.float8_e4m3fn).float() * pack[io["descale_s"]]
                o = p @ v                                                   # [B, H, N, d]
                out = pack[self.o]
                o_bnhd = torch.as_strided(out, self.o.dim, self.o.stride)
                if self.o.data_type == FakeCudnn.data_type.FP8_E4M3:
                    assert out.dtype == torch.float8_e4m3fn
                    o = (o * pack[io["scale_o"]]).clamp(-448, 448)
                o_bnhd.copy_(o.to(out.dtype))

        self.pygraph = pygraph

    def create_handle(self):
        return object()

    def set_stream(self, handle=None, stream=None):
        pass


@pytest.fixture
def routes_fresh():
    from pidkern import attention_routes
    attention_routes._CUDNN_GRAPHS.clear()
    attention_routes._CUDNN_FP8_OUT.clear()
    yield attention_routes
    attention_routes._CUDNN_GRAPHS.clear()
    attention_routes._CUDNN_FP8_OUT.clear()


STANDINS = {
    "prep+flash": ("flash_attn", lambda hd, seen: fake_flash(hd, seen), "native"),
    "prep+sage": ("sageattention", lambda hd, seen: fake_sage(hd, seen), "native"),
    "prep+flash3-fp8": ("flash_attn_interface", lambda hd, seen: fake_flash3(hd, seen), "per-head"),
    "prep+cudnn-fp8": ("cudnn", lambda hd, seen: FakeCudnn(hd, False, seen), "per-tensor"),
}


@pytest.mark.parametrize("backend", sorted(STANDINS))
@pytest.mark.parametrize("hd,T", [(64, 5), (72, 0)])
def test_library_route_glue(monkeypatch, routes_fresh, backend, hd, T):
    module, fake, scales = STANDINS[backend]
    seen = []
    monkeypatch.setitem(sys.modules, module, fake(hd, seen))
    B, heads, dtype = 2, 2, torch.float16
    qkv_img, qkv_txt, w, tabs = make(B, 1, 37, T, heads, hd, dtype, seed=3 + hd)
    o_img, o_txt = call(qkv_img, qkv_txt, w, tabs, heads, backend)
    assert seen and seen[0][0] == B, "the library was not called"
    assert o_img.dtype == dtype and o_img.shape == (B, 37, heads * hd) and (o_txt is None) == (T == 0)
    o = torch.cat([o_txt, o_img], 1) if T else o_img
    r = torch.cat(ref64(qkv_img, qkv_txt, w, tabs, heads)[::-1], 1)
    if scales == "native":   # a 16-bit library: the plain rule against the PyTorch chain
        t = torch.cat([x for x in call(qkv_img, qkv_txt, w, tabs, heads, "torch")[::-1] if x is not None], 1)
        assert_within_rule(o, t, r, backend)
        return
    q, k, v, _ = prep64(qkv_img, qkv_txt, w, tabs, heads)
    if backend == "prep+cudnn-fp8":
        emu = emulate_cudnn(q, k, v)
    else:   # FA3: q, k, v in e4m3 with one scale per (batch, head)
        q8, k8, v8 = (quant(t, t.abs().amax((1, 3), keepdim=True)) for t in (q, k, v))
        emu = sdpa32(q8, k8, v8, 1 / math.sqrt(hd)).flatten(2)
    assert_within_rule(o, emu, r, backend)


def emulate_cudnn(q, k, v):
    """cuDNN's fp8 SDPA as the route drives it: per-tensor e4m3 q, k, v; P * 256 in e4m3; the
    output in e4m3 scaled by 224 / amax(v)."""
    amax = [t.abs().amax() for t in (q, k, v)]
    q8, k8, v8 = (quant(t, a).float() for t, a in zip((q, k, v), amax))
    s = torch.einsum("bnhd,bmhd->bhnm", q8, k8) / math.sqrt(q.shape[-1])
    p = e4m3(torch.softmax(s, -1) * 256) / 256
    o = torch.einsum("bhnm,bmhd->bnhd", p, v8)
    so = 224 / amax[2].float()
    return (e4m3(o * so) / so).flatten(2)


def test_cudnn_bf16_output_where_allowed(monkeypatch, routes_fresh):
    seen = []
    monkeypatch.setitem(sys.modules, "cudnn", FakeCudnn(64, True, seen))
    qkv_img, qkv_txt, w, tabs = make(1, 1, 21, 3, 1, 64, torch.float16, seed=9)
    o_img, _ = call(qkv_img, qkv_txt, w, tabs, 1, "prep+cudnn-fp8")
    assert routes_fresh._CUDNN_FP8_OUT and not any(routes_fresh._CUDNN_FP8_OUT.values())
    r = ref64(qkv_img, qkv_txt, w, tabs, 1)[0]
    assert ((o_img.double() - r).norm() / r.norm()) < 0.1


@pytest.mark.parametrize("backend", sorted(STANDINS))
def test_missing_library_names_the_package(monkeypatch, backend):
    from pidkern.attention_routes import LIBRARIES
    module = STANDINS[backend][0]
    monkeypatch.setitem(sys.modules, module, None)     # import of `module` raises ImportError
    qkv_img, qkv_txt, w, tabs = make(1, 1, 5, 2, 1, 64, torch.float16)
    with pytest.raises(ImportError, match=LIBRARIES[backend][1].split()[0]):
        call(qkv_img, qkv_txt, w, tabs, 1, backend)


def test_available_routes(monkeypatch):
    from pidkern.attention_routes import available_attention_routes
    assert available_attention_routes("cpu") == ()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # no capability to ask
    for module in ("flash_attn", "flash_attn_interface", "sageattention", "cudnn"):
        monkeypatch.setitem(sys.modules, module, None)
    assert available_attention_routes("cuda") == ("fp8-triton", "prep+fp8-triton", "int8-triton", "prep+int8-triton",
                                                  "fp8qk-triton", "prep+fp8qk-triton", "int8qk-triton",
                                                  "prep+int8qk-triton")
    assert available_attention_routes("cuda", "native") == ()
    monkeypatch.setitem(sys.modules, "sageattention", types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace())
    assert "prep+sage" in available_attention_routes("cuda")
    assert available_attention_routes("cuda:0", "native") == ("prep+flash",)
    with pytest.raises(ValueError, match="precision"):
        available_attention_routes("cuda", "int4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))   # an A100: no e4m3
    assert available_attention_routes("cuda") == ("int8qk-triton", "prep+int8qk-triton", "prep+sage")


# ----------------------------------------------------------------------------------- the plan

def test_plan_accepts_the_new_routes(monkeypatch):
    import importlib.machinery

    from pidkern import plan
    for route in plan.ATTENTION_8BIT:
        assert plan.check_overrides({"attention": route}) == {"attention.patch": route, "attention.pixel": route}
        assert route in ops.ATTENTION_BACKENDS
    assert plan.fp8_attention_candidates("cpu") == ()
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    assert plan.flash_race() == ()
    fake = types.ModuleType("flash_attn")
    fake.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    assert plan.flash_race() == ("prep+flash",)


# ------------------------------------------- the H200 illegal memory access shape (issue 13)



def check_crash_structure(B, hs, ws, T, heads, hd, dtype, core_n, device=DEV):
    """Every Triton route on one batch-2, 3-head joint shape, then the core at hd 72 with 3
    heads (216-element rows): partial last query and key tiles in both sources, the masked
    hd-72 tail chunk, the B*H grid."""
    from tests.kernels.test_attention import check
    check(B, hs, ws, T, heads, hd, dtype, ("triton", "prep+sdpa", "prep+triton"), device=device)
    for backend in TRITON_8BIT:
        qkv_img, qkv_txt, w, tabs = make(B, hs, ws, T, heads, hd, dtype, device=device, seed=21)
        r, emu = fp8_reference(qkv_img, qkv_txt, w, tabs, heads, backend)
        o_img, o_txt = call(qkv_img, qkv_txt, w, tabs, heads, backend)
        assert_within_rule(torch.cat([o_txt, o_img], 1).cpu(), emu.cpu(), r.cpu(), backend)
    from pidkern.kernels.attention import attention_core
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(B, core_n, heads, 72, generator=g).to(device, dtype) for _ in range(3))
    r = F.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (q, k, v))).transpose(1, 2).flatten(2)
    t = ops.sdpa(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2).flatten(2)
    assert_within_rule(attention_core(q, k, v), t, r.to(q.device), "core")
    q64, k64, v64 = (x.cpu().double() for x in (q, k, v))
    for mode in ("fp8", "fp8qk"):
        emu = emulate(q64, k64, v64, tile_amax(q64, [0], block_m()), k64.abs().amax((1, 3), keepdim=True),
                      pv=mode == "fp8")
        assert_within_rule(attention_core(q, k, v, mode).cpu(), emu, r.cpu(), f"core {mode}")
    for mode in ("int8", "int8qk"):
        emu = emulate(q64, k64, v64, q64.abs().amax(-1, keepdim=True), k64.abs().amax(-1, keepdim=True),
                      pv=mode == "int8", int8=True)
        assert_within_rule(attention_core(q, k, v, mode).cpu(), emu, r.cpu(), f"core {mode}")


def test_crash_shape_structure():
    # the interpreter's tiles are 32 x 16: 38 image tokens and 7 text tokens leave partial
    # last tiles in both sources, as 600 and 300 do for the GPU's 128 x 64; the core's 50
    # tokens likewise (1000 on the GPU)
    assert block_m() == 32 or DEV == "cuda"
    check_crash_structure(2, 2, 19, 7, 3, 64, torch.float16, 50)


@pytest.mark.cuda
def test_cuda_crash_shape():
    # the exact shape that hit the H200 illegal memory access (B=2, a 20x30 grid, T=300; then
    # the core at N=1000, H=3, hd 72), every Triton route, fp8 ones included
    check_crash_structure(2, 20, 30, 300, 3, 64, torch.bfloat16, 1000, device="cuda")


# ------------------------------------------------------------- bench/attention_fp8_check.py

def test_fp8_check_script_shapes_and_refusal(monkeypatch):
    from bench import attention_fp8_check as chk
    assert chk.shapes() == (("patch", 24, 64, 16384, 300), ("pixel", 16, 72, 16384, 0))   # PERF.md's shapes
    assert set(chk.ROUTES) <= set(ops.ATTENTION_BACKENDS)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA"):
        chk.main([])
    text = chk.table({"results": [{"shape": "pixel", "sdpa_cudnn_core_ms": 3.0, "sdpa_cudnn_core_tflops": 400.0,
                                   "routes": {"fp8-triton": {"ms": 2.0, "tflops": 600.0, "rel_l2_vs_fp32": 0.03,
                                                             "speedup_vs_prep+sdpa": 1.5},
                                              "prep+sage": {"error": "ImportError: sageattention"}}}]})
    assert "fp8-triton" in text and "1.50" in text and "failed: ImportError" in text


def test_fp8_check_script_runs_on_a_small_case(tmp_path, monkeypatch):
    # the GPU run is scarce: its logic (routes, errors, JSON) runs here on a tiny case
    import json

    from bench import attention_fp8_check as chk
    monkeypatch.setitem(sys.modules, "sageattention", None)
    payload = chk.run(["prep+sdpa", "int8qk-triton", "prep+sage"], str(tmp_path), 60.0, device="cpu",
                      cases=[("patch", 1, 64, 20, 3)])
    routes = payload["results"][0]["routes"]
    assert routes["prep+sdpa"]["speedup_vs_prep+sdpa"] == 1.0
    assert 0 < routes["int8qk-triton"]["rel_l2_vs_fp32"] < 0.02
    assert "sageattention" in routes["prep+sage"]["error"]
    assert json.loads(open(payload["path"]).read())["results"][0]["routes"].keys() == routes.keys()
