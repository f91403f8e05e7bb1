"""The plan's routes really decide what runs: under the interpreter every fused op of a
fast decode launches its Triton kernel exactly as often as the network's structure says,
and a "torch" route launches none (the PyTorch math computes the same numbers, so image
parity alone could not tell)."""
import warnings

import pytest
import torch

import pidkern
from pidkern import ops
from pidkern.config import tiny

from launches import count_launches

warnings.filterwarnings("ignore", message="pidkern.load: no checkpoint")
pytestmark = pytest.mark.skipif(not ops.HAS_TRITON, reason="needs triton (the kernels run under its interpreter)")


def expected(cfg, steps, gates_torch=False):
    """Launches per op of one decode, written from the network's structure."""
    n, pix = cfg.patch_blocks, cfg.pixel_blocks
    gates = -(-n // cfg.lq_every) + cfg.is_v15          # one gate every lq_every blocks, and v1.5's pit gate
    per_step = {
        "embed": 1,
        "gate": 0 if gates_torch else gates,
        # per patch block: x and y before attention, x after it, y after it except the last block's;
        # per pixel block: one pass per modulation band (one band at this size)
        "rms_modulate": 4 * n - 1 + pix,
        "pixel_modulate": pix,
        "swiglu": 2 * n - 1,                                  # the last block's text MLP never runs
        "attention": n + pix,                                 # "triton": the fused kernel per attention
    }
    return {op: k * steps for op, k in per_step.items() if k}


@pytest.mark.parametrize("base", ["flux-2k", "flux2-2kto4k-v1.5"])
def test_each_fused_op_launches_its_kernel(base):
    cfg = tiny(base)
    dec = pidkern.load(preset=cfg, device="cpu")
    latent = torch.randn(1, cfg.latent_channels, 1, 1, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 5, cfg.text_dim, generator=torch.Generator().manual_seed(1))
    dec.plan(latent.shape, 5)         # built outside the count
    with count_launches() as n:
        dec.decode(latent, 0.3, text, steps=2, seed=1, backend="fast")
    assert dict(n) == expected(cfg, 2)
    # a torch route runs no kernel of its op, and the others are untouched
    with count_launches() as n:
        dec.decode(latent, 0.3, text, steps=2, seed=1, backend="fast", plan={"gate": "torch"})
    assert dict(n) == expected(cfg, 2, gates_torch=True)


def test_routes_of_the_attention_and_swiglu_entries_take_their_kernels():
    cfg = tiny("flux-2k")
    dec = pidkern.load(preset=cfg, device="cpu")
    latent = torch.randn(1, cfg.latent_channels, 1, 1, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 5, cfg.text_dim, generator=torch.Generator().manual_seed(1))
    n, pix = cfg.patch_blocks, cfg.pixel_blocks
    plans = {
        # the prep kernel per attention, SDPA after it
        "prep": ({"attention": "prep+sdpa"}, {"attention": n + pix}),
        # the QKV GEMM's epilogue per patch attention; the pixel blocks' prep
        "qkv_rope": ({"attention": "qkv_rope+sdpa"}, {"qkv_rope": 2 * n, "attention": pix}),   # image, text
        "torch": ({"attention": "torch", "swiglu": "torch"}, {"attention": 0, "swiglu": 0}),
        # "split": one GEMM, then the silu_mul kernel
        "split": ({"swiglu": "split"}, {"swiglu": 2 * n - 1}),
    }
    for name, (plan, want) in plans.items():
        with count_launches() as got:
            dec.decode(latent, 0.3, text, steps=1, seed=1, backend="fast", plan=plan)
        assert {op: got[op] for op in want} == want, name


def test_the_dispatcher_runs_the_math_on_the_cpu_and_the_kernel_on_cuda():
    """route=None leaves the choice to torch's dispatcher: on the CPU the op's registered
    implementation is the PyTorch math (no launch; the same bits as route="torch"), on
    CUDA the Triton kernel; route="triton" names the kernel on any device it runs on."""
    from pidkern import custom_ops
    g = torch.Generator().manual_seed(0)
    x, lq = torch.randn(2, 5, 32, generator=g), torch.randn(2, 5, 32, generator=g)
    w, b = torch.randn(32, 64, generator=g) / 8, torch.randn(32, generator=g)
    la, sigma = torch.tensor(0.3), torch.rand(2, generator=g)
    u, w13 = torch.randn(7, 32, generator=g), torch.randn(48, 32, generator=g) / 6
    cases = {"gate": (lambda r: ops.lq_gate(x, lq, w, b, la, sigma, route=r)),
             "swiglu": (lambda r: ops.swiglu_gate_up(u, w13, route=r))}
    for op, call in cases.items():
        with count_launches() as n:
            dispatched = call(None)
            math = call("torch")
        assert not n, op
        assert torch.equal(dispatched, math), op
        with count_launches() as n:
            fused = call("triton")
        assert dict(n) == {op: 1}, op
        torch.testing.assert_close(fused, math, rtol=1e-5, atol=1e-5)
    for name in custom_ops.OPS:
        qualified = f"pidkern::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CUDA") == custom_ops.HAS_TRITON, name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "Meta"), name
    # the fake (Meta) implementation is the math too: shapes and dtypes without values
    meta = torch.ops.pidkern.gate(*(t.to("meta") for t in (x, lq, w, b, la, sigma)))
    assert meta.device.type == "meta" and meta.shape == x.shape and meta.dtype == x.dtype
