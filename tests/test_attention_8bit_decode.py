"""An 8-bit attention plan entry through a whole decode (the routes themselves:
tests/kernels/test_attention_fp8.py). Outside tests/kernels: a decode is not a kernel
launch, and the NaN-poisoning of torch.empty there must not reach torch's own internals."""
from __future__ import annotations

import pytest
import torch

from pidkern import ops


@pytest.mark.skipif(not ops.HAS_TRITON, reason="needs triton (the kernels run under its interpreter)")
def test_plan_override_runs_the_8bit_kernel_in_a_decode(monkeypatch):
    # a decode with an 8-bit plan entry reaches the kernel in that mode for both block kinds,
    # and its image stays near the 16/32-bit fast image (int8 QK^T: ~1% per attention here)
    import pidkern
    from pidkern.config import tiny
    from pidkern.kernels import attention as K
    modes = []
    real = K.attention_fused
    monkeypatch.setattr(K, "attention_fused",
                        lambda *a: modes.append((a[1] is not None, a[12] if len(a) > 12 else None)) or real(*a))
    cfg = tiny("flux-2k")
    dec = pidkern.load(preset=cfg, device="cpu")
    latent = torch.randn(1, cfg.latent_channels, 1, 2, generator=torch.Generator().manual_seed(2))
    text = torch.randn(1, 8, cfg.text_dim, generator=torch.Generator().manual_seed(5))
    base = dec.decode(latent, 0.2, text, steps=1, seed=1, backend="fast", plan={"attention": "triton"})
    modes.clear()
    img = dec.decode(latent, 0.2, text, steps=1, seed=1, backend="fast", plan={"attention": "int8qk-triton"})
    assert set(modes) == {(True, "int8qk"), (False, "int8qk")}     # patch blocks (text) and pixel blocks
    rel = ((img.double() - base.double()).norm() / base.double().norm()).item()
    print(f"int8qk decode: rel L2 vs the 16/32-bit fast image {rel:.2e}")
    assert 0 < rel < 0.02, rel

