"""GEMMs with fused prologues/epilogues at 2048^2 shapes (L = 16384 patch tokens), bf16
weights: the patch+pixel embedding, the latent gate (v1 GEMM, v1.5 row-dot) and the
SwiGLU gate-up, each against the PyTorch chain it replaces (ops.py's fallback).

FLOPs count the GEMM only (for reference: bf16 Linear 16384x1536->4608 runs
727 TFLOP/s on H200); the v1.5 gate is memory bound and reports bytes (copy ceiling
4.21 TB/s). Each timed callable runs the op REPEAT times back to back so Python dispatch
overlaps the previous kernel instead of being timed.
"""
from __future__ import annotations

import torch

from bench.kernels import Case
from pidkern import ops


def _repeat(fn, n, *ops_off):
    """fn(route) n times: the kernel's route, or with ops_off the PyTorch math ("torch")."""
    route = "torch" if ops_off else None

    def run():
        for _ in range(n):
            fn(route)
    return run


def _sincos(n: int, dp: int, device) -> torch.Tensor:
    q = dp // 4
    w = 10000.0 ** (-torch.arange(q, dtype=torch.float64) / q)
    a = torch.arange(n, dtype=torch.float64)[:, None] * w
    return torch.cat([a.sin(), a.cos()], 1).float().to(device)


def cases(device: str) -> list[Case]:
    bf16, f32 = torch.bfloat16, torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s, dtype=bf16, scale=1.0: (scale * torch.randn(*s, generator=g, device=device, dtype=f32)).to(dtype)  # noqa: E731
    out = []
    D, Hm, L, T = 1536, 4096, 16384, 300

    # Embedding: float32 image (the sampler state), bf16 weights, P=16, Dp=16.
    H = W = 2048
    P, Dp, K = 16, 16, 3 * 16 * 16
    x = rnd(1, 3, H, W, dtype=f32)
    emb_args = (x, rnd(D, K, scale=K ** -0.5), rnd(D), rnd(Dp, 3), rnd(Dp), _sincos(W, Dp, device), _sincos(H, Dp, device), P)
    n = 5
    fn = lambda r: ops.patch_pixel_embed(*emb_args, route=r)  # noqa: E731
    out.append(Case("embed/patch+pixel-2048sq", _repeat(fn, n), _repeat(fn, n, "embed"), flops=n * 2 * L * K * D,
                    note=f"x fp32 [1,3,2048,2048] -> tokens [1,16384,1536] + pixels [16384,256,16] bf16; "
                         f"flops = patch GEMM only (pixel writes ~134 MB dominate); x{n} per timing"))

    # Latent gate: float32 residual x, bf16 lq and weights, per-sample sigma.
    xg, lq = rnd(1, L, D, dtype=f32), rnd(1, L, D)
    la, sigma = torch.tensor(0.2, device=device), torch.tensor([0.35], device=device)
    v1 = (xg, lq, rnd(D, 2 * D, scale=(2 * D) ** -0.5), rnd(D), la, sigma)
    fn = lambda r: ops.lq_gate(*v1, route=r)  # noqa: E731
    out.append(Case("gate/v1-16384x1536", _repeat(fn, n), _repeat(fn, n, "gate"), flops=n * 2 * L * 2 * D * D,
                    note=f"x fp32, lq/W bf16: one GEMM over K=2D + sigmoid gate epilogue; x{n} per timing"))
    n15 = 20
    for x_dtype, tag in ((f32, "x-fp32"), (bf16, "x-bf16")):
        v15 = (xg.to(x_dtype), lq, rnd(1, 2 * D, scale=(2 * D) ** -0.5), rnd(1), la, sigma)
        fn = lambda r, v15=v15: ops.lq_gate(*v15, route=r)  # noqa: E731
        xb = torch.finfo(x_dtype).bits // 8
        out.append(Case(f"gate/v1.5-{tag}-16384x1536", _repeat(fn, n15), _repeat(fn, n15, "gate"),
                        bytes=n15 * L * D * (xb + 2 + xb),
                        note=f"row-dot gate, memory bound: x + lq read, out written; x{n15} per timing"))

    # SwiGLU gate-up over image + text tokens.
    M = L + T
    u, w13 = rnd(M, D), rnd(2 * Hm, D, scale=D ** -0.5)
    fn = lambda r: ops.swiglu_gate_up(u, w13, route=r)  # noqa: E731
    out.append(Case("swiglu/gate-up-16684x1536x4096", _repeat(fn, n), _repeat(fn, n, "swiglu"),
                    flops=n * 2 * M * D * 2 * Hm,
                    note=f"bf16; baseline = two cuBLAS linears + silu*mul; x{n} per timing"))
    split = lambda r: ops.swiglu_gate_up(u, w13, split=True, route=r)  # noqa: E731
    out.append(Case("swiglu/split-16684x1536x4096", _repeat(split, n), _repeat(fn, n, "swiglu"),
                    flops=n * 2 * M * D * 2 * Hm,
                    note=f"bf16; one cuBLAS GEMM vs w13 + silu_mul pass; baseline as above; x{n} per timing"))
    return out
