"""Joint attention at 2048^2 shapes, bf16, batch 1: patch blocks (24 heads x 64,
L = 16384 image + T = 300 text tokens) and pixel blocks (16 heads x 72, L = 16384).

(a) fully fused Triton kernel vs the unfused chain (RMSNorm + RoPE + cat + SDPA, cuDNN
    preferred); (b) prep kernel + SDPA, and prep + Triton core, vs the same chain;
(c) the attention core alone on prepared q, k, v: the Triton kernel vs SDPA with cuDNN
    (default SDPA where cuDNN is unavailable);
(d) patch blocks only: the QKV GEMM with QK-norm + RoPE in its epilogue, then SDPA, vs
    cuBLAS QKV + prep kernel + SDPA (both from the normalised block input: GEMMs timed too).
flops = 4 * B * H * N_q * N_k * hd over the joint sequence (pidkern.flops' attention count).
"""
from __future__ import annotations

import torch

from bench.kernels import Case
from pidkern import ops


DTYPE = torch.bfloat16
SHAPES = (("patch-hd64", 24, 64, 16384, 300), ("pixel-hd72", 16, 72, 16384, 0))  # tag, heads, hd, L, T


def _tables(n: int, hd: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    g = 10000.0 ** (-2 * torch.arange(hd // 2, dtype=torch.float64) / hd)
    a = torch.arange(n, dtype=torch.float64)[:, None] * g
    return a.cos().float().to(device), a.sin().float().to(device)


def _cudnn_sdpa(q, k, v):
    """SDPA forced onto cuDNN, or None when this build/card cannot run it."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)
    try:
        run()
        torch.cuda.synchronize()
        return run
    except RuntimeError:
        return None


def cases(device: str) -> list[Case]:
    out = []
    g = torch.Generator(device=device).manual_seed(0)
    for tag, heads, hd, L, T in SHAPES:
        B, N = 1, L + T
        rnd = lambda *s: torch.randn(*s, generator=g, device=device, dtype=torch.float32).to(DTYPE)  # noqa: E731
        qkv_img = rnd(B, L, 3 * heads * hd)
        qkv_txt = rnd(B, T, 3 * heads * hd) if T else None
        w = [torch.rand(hd, generator=g, device=device) + 0.5 for _ in range(4)]
        rope_img = _tables(L, hd, device)
        rope_txt = _tables(T, hd, device) if T else None
        args = (qkv_img, qkv_txt, w[0], w[1], w[2] if T else None, w[3] if T else None, rope_img, rope_txt, heads)
        flops = 4 * B * heads * N * N * hd
        shape = f"B=1 {heads}x{hd} L={L} T={T} bf16"
        chain = lambda a=args: ops.attention(*a, backend="torch")  # noqa: E731
        for backend in ("triton", "prep+sdpa", "prep+triton"):
            out.append(Case(f"attention/{tag}-{backend}-vs-chain", lambda a=args, b=backend: ops.attention(*a, backend=b),
                            chain, flops=flops, note=f"{shape}; baseline: unfused chain with cuDNN SDPA"))

        # (c) the core alone on already prepared q, k, v [B, N, H, hd]
        from pidkern.kernels.attention import attention_core
        q, k, v = (rnd(B, N, heads, hd) for _ in range(3))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        base = _cudnn_sdpa(qt, kt, vt)
        note = f"{shape}; q,k,v prepared; baseline: SDPA " + ("cuDNN" if base else "default (cuDNN unavailable)")
        if base is None:
            base = lambda t=(qt, kt, vt): torch.nn.functional.scaled_dot_product_attention(*t)  # noqa: E731
        out.append(Case(f"attention/{tag}-core-vs-sdpa", lambda t=(q, k, v): attention_core(*t), base, flops=flops,
                        note=note))

        if T:  # (d)
            import torch.nn.functional as F
            D = 1536
            h_img, h_txt = rnd(B, L, D), rnd(B, T, D)
            w_img, w_txt = rnd(3 * heads * hd, D) / D ** 0.5, rnd(3 * heads * hd, D) / D ** 0.5
            n_img, n_txt = torch.stack(w[:2]), torch.stack(w[2:])

            def gemm_route():
                q, k, v = ops.qkv_rope(h_img, w_img, n_img, rope_img, h_txt, w_txt, n_txt, rope_txt, heads=heads)
                return ops.attend(q, k, v, T, True)

            def prep_route():
                return ops.attention(F.linear(h_img, w_img), F.linear(h_txt, w_txt), *w, rope_img, rope_txt, heads,
                                     backend="prep+sdpa")
            gemm_flops = 2 * B * N * D * 3 * heads * hd
            out.append(Case(f"attention/{tag}-qkv_rope+sdpa-vs-prep+sdpa", gemm_route, prep_route,
                            flops=flops + gemm_flops, note=f"{shape}; D={D}; QKV GEMMs included on both sides"))
    return out
