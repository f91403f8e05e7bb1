"""Parking: a CUDA decoder moves the net's parameters the fast path never reads to host
memory during fast decodes and brings them back for any use of the reference network.

On the CPU a decoder parks nothing by default; these tests point `_park_to` at the CPU
(a real copy to fresh storage) to run the same mechanism under the Triton interpreter,
or at the meta device, where a parked weight has no values to read."""
import gc
import re
import warnings

import pytest
import torch

import pidkern
from pidkern import ops
from pidkern.config import tiny

warnings.filterwarnings("ignore", message="pidkern.load: no checkpoint")
needs_triton = pytest.mark.skipif(not ops.HAS_TRITON, reason="needs triton (the kernels run under its interpreter)")

# What FastPiD copies or precomputes from at build time, or never runs (the last block's
# text update), written from the network's structure (SPEC: 14 patch blocks here = tiny's).
LOAD_TIME_ONLY = [r"t_embedder\..*", r"patch_blocks\.\d+\.mlp_[xy]\.w[13]\.weight",
                  r"patch_blocks\.\d+\.attn\.[qk]_norm_[xy]\.weight", r"patch_blocks\.\d+\.adaLN_modulation_(img|txt)\..*",
                  r"pixel_blocks\.\d+\.adaLN_modulation\..*"]


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def expected_unread(net):
    last = len(net.patch_blocks) - 1
    text_update = [rf"patch_blocks\.{last}\.(attn\.proj_y|norm_y2|mlp_y\.w2)\..*"]
    pats = [re.compile(p) for p in LOAD_TIME_ONLY + text_update]
    return {n for n, _ in net.named_parameters() if any(p.fullmatch(n) for p in pats)}


def inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, cfg.latent_channels, 1, 2, generator=g), torch.tensor([0.3]),
            torch.randn(1, 8, cfg.text_dim, generator=g))


@needs_triton
def test_fast_decodes_park_exactly_the_declared_weights_and_net_brings_them_back():
    cfg = tiny("flux-2k")
    dec = pidkern.load(preset=cfg, device="cpu")
    dec._park_to = torch.device("cpu")                # as a CUDA decoder does, host to host
    latent, sigma, text = inputs(cfg)
    kw = dict(steps=1, seed=4)
    net = dec.net
    params = dict(net.named_parameters())
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in params.items()}
    attrs = {n: set(vars(m)) for n, m in net.named_modules()}
    ref = dec.decode(latent, sigma, text, backend="reference", **kw)

    fast = dec.decode(latent, sigma, text, backend="fast", **kw)
    parked = set(dec.parked_parameters())
    assert parked == set(dec.engine().model.unread_parameters) == expected_unread(net)
    for n, p in dec._net.named_parameters():         # the private handle: no restore
        assert p is params[n]                         # same Parameter objects, data moved
        assert (p.data_ptr() != before[n][0]) == (n in parked), n
    assert rel_l2(fast, ref) < 1e-5, rel_l2(fast, ref)

    # any use of the reference network: every weight back, bit for bit, usable outside
    # inference mode; no attribute added to any module at any point
    assert dec.net is net and not dec.parked_parameters()
    for n, p in net.named_parameters():
        assert p is params[n] and p.device == dec.device and torch.equal(p, before[n][1]), n
        assert not p.is_inference(), n
    assert {n: set(vars(m)) for n, m in net.named_modules()} == attrs
    assert not any("park" in k for m in net.modules() for k in vars(m))

    # alternating: the same images as before, parking again on each fast decode
    assert torch.equal(dec.decode(latent, sigma, text, backend="fast", **kw), fast)
    assert set(dec.parked_parameters()) == parked
    assert torch.equal(dec.decode(latent, sigma, text, backend="reference", **kw), ref)
    assert not dec.parked_parameters()
    assert not any(p.is_inference() for p in net.parameters())    # restored inside inference mode

    # inside using_net() nothing parks (another thread may be running the net)
    unread = dec.engine().model.unread_parameters
    with dec.using_net() as held:
        dec._park(unread)
        assert held is net and not dec.parked_parameters()
    dec._park(unread)
    assert set(dec.parked_parameters()) == parked
    dec.reference_weights_on_device()
    assert not dec.parked_parameters()
    assert all(torch.equal(p, before[n][1]) for n, p in dec._net.named_parameters())


@needs_triton
def test_the_fast_path_reads_no_parked_weight():
    """With the parked weights turned to NaN where they wait, the fast decode still gives
    the reference's images: it reads none of them."""
    cfg = tiny("flux2-2kto4k-v1.5")                   # the v1.5 gates and pit head too
    dec = pidkern.load(preset=cfg, device="cpu")
    latent, sigma, text = inputs(cfg, seed=3)
    latent = latent[..., :1]
    ref = dec.decode(latent, sigma, text, steps=1, seed=2, backend="reference")
    dec._park_to = torch.device("cpu")
    dec._park(dec.engine().model.unread_parameters)
    for n in dec.parked_parameters():
        dec._net.get_parameter(n).data.fill_(float("nan"))
    fast = dec.decode(latent, sigma, text, steps=1, seed=2, backend="fast")
    assert set(dec.parked_parameters()) == expected_unread(dec._net)
    assert rel_l2(fast, ref) < 1e-5, rel_l2(fast, ref)


def test_cpu_decoders_park_nothing_and_a_replaced_net_gets_a_new_engine():
    cfg = tiny("flux-2k")
    dec = pidkern.load(preset=cfg, device="cpu")
    assert dec._park_to is None
    eng = dec.engine()
    dec._park(eng.model.unread_parameters)
    assert not dec.parked_parameters()
    dec._park_to = torch.device("cpu")
    dec._park(eng.model.unread_parameters)
    assert dec.parked_parameters()
    other = pidkern.load(preset=cfg, device="cpu").net
    dec.net = other                                    # restores the old net first
    assert dec.net is other and not dec.parked_parameters() and dec.engine() is not eng
    assert dec.engine().model.net is other


def test_decoders_sharing_a_net_never_leave_it_parked_for_another():
    """A second Decoder on the same network brings back what the first parked, and while
    both live neither parks (each would not know to restore for the other)."""
    cfg = tiny("flux-2k")
    a = pidkern.load(preset=cfg, device="cpu")
    a._park_to = torch.device("cpu")
    unread = a.engine().model.unread_parameters
    a._park(unread)
    assert a.parked_parameters()
    b = pidkern.Decoder(a._net, a.device, a.dtype, "shared")
    assert not a.parked_parameters()
    a._park(unread)
    assert not a.parked_parameters()
    del b
    gc.collect()
    a._park(unread)
    assert a.parked_parameters()


@needs_triton
def test_parked_to_meta_a_read_raises_and_the_fast_path_reads_none():
    """Parked to the meta device a weight has no values at all: any read of it raises.
    The fast decode still runs and gives the reference's images, so it reads none of
    them; and the check itself fails when a parked weight is read."""
    cfg = tiny("flux2-2kto4k-v1.5")                   # the v1.5 gates and pit head too
    dec = pidkern.load(preset=cfg, device="cpu")
    latent, sigma, text = inputs(cfg, seed=3)
    latent = latent[..., :1]
    ref = dec.decode(latent, sigma, text, steps=1, seed=2, backend="reference")
    eng = dec.engine()
    dec._park_to = torch.device("meta")
    dec._park(eng.model.unread_parameters)
    parked = set(dec.parked_parameters())
    assert parked == expected_unread(dec._net)
    assert all(dec._net.get_parameter(n).device.type == "meta" for n in parked)
    fast = dec.decode(latent, sigma, text, steps=1, seed=2, backend="fast")
    assert rel_l2(fast, ref) < 1e-5, rel_l2(fast, ref)
    # the check can fail: any use of a parked weight raises, a GEMM against one included
    # (against a plain meta tensor F.linear returns a CPU tensor of no meaning)
    mlp = dec._net.patch_blocks[0].mlp_x
    with pytest.raises(RuntimeError, match="parked weight"):
        torch.cat([mlp.w1.weight, torch.zeros(1, mlp.w1.weight.shape[1])])
    with pytest.raises(RuntimeError, match=r"parked weight.*mlp_x\.w1\.weight"):
        torch.nn.functional.linear(torch.randn(2, mlp.w1.weight.shape[1]), mlp.w1.weight)
    # and they come back whole
    assert torch.equal(dec.decode(latent, sigma, text, steps=1, seed=2, backend="reference"), ref)
    assert not dec.parked_parameters() and mlp.w1.weight.device.type == "cpu"


@needs_triton
@pytest.mark.parametrize("read", ["patch_blocks.0.attn.proj_x.weight",      # a plain GEMM (F.linear)
                                  "pixel_blocks.0.mlp.fc1.weight"])          # read by the pixel_post kernel
def test_a_fast_decode_that_reads_a_parked_weight_fails(read):
    """The proof that the test above can fail: park one weight the fast path does read,
    beside the unread ones, and the fast decode raises instead of giving an image."""
    cfg = tiny("flux-2k")
    dec = pidkern.load(preset=cfg, device="cpu")
    latent, sigma, text = inputs(cfg)
    eng = dec.engine()
    dec._park_to = torch.device("meta")
    dec._park(list(eng.model.unread_parameters) + [read])
    assert read in dec.parked_parameters()
    with pytest.raises((RuntimeError, ValueError), match="parked weight|meta"):
        dec.decode(latent, sigma, text, steps=1, seed=2, backend="fast")
