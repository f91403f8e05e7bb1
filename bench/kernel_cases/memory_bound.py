"""The memory-bound fusions at 2048^2 shapes: rms_modulate on patch rows and on one band of
4096 patches' pixel rows (the pixel block's first half), pixel_post on the same band; bf16
branches, float32 residual streams.

Bytes are the fewest a call must move (each input read once, each output written once);
GB/s against the H200's measured 4.21 TB/s copy ceiling is the figure of merit. Each timed
callable runs the op REPEAT times back to back; bench/kernels.py captures it in a CUDA
graph, so what is timed is device time, and with --eager the repeats still let the host
dispatch of one call overlap the previous kernel.
"""
from __future__ import annotations

import torch

from bench.kernels import Case
from pidkern import ops

REPEAT = 20


def _repeat(fn, *ops_off):
    """fn(route) REPEAT times: the kernel's route, or with ops_off the PyTorch math ("torch")."""
    route = "torch" if ops_off else None

    def run():
        for _ in range(REPEAT):
            fn(route)
    return run


def cases(device: str) -> list[Case]:
    bf16, f32 = torch.bfloat16, torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s, dtype=bf16: torch.randn(*s, generator=g, device=device, dtype=f32).to(dtype)  # noqa: E731
    out = []

    # Patch block: [1, 16384, 1536] float32 residual, bf16 branch output, per-sample chunk6.
    B, N, C = 1, 16384, 1536
    x, y = rnd(B, N, C, dtype=f32), rnd(B, N, C)
    w = 1 + 0.1 * rnd(C)
    mod = rnd(B, 1, 6 * C)
    sh, sc, gt = mod[..., :C], mod[..., C:2 * C], mod[..., 2 * C:3 * C]
    full = lambda r: ops.add_rms_modulate(x, w, sh, sc, y, gt, out_dtype=bf16, route=r)  # noqa: E731
    out.append(Case("rms_modulate/patch-add-16384x1536", _repeat(full), _repeat(full, "rms_modulate"),
                    bytes=REPEAT * B * N * C * (4 + 2 + 4 + 2),
                    note=f"x fp32 + gate*y bf16 -> x_new fp32, h bf16; x{REPEAT} per timing"))
    norm = lambda r: ops.add_rms_modulate(x, w, sh, sc, out_dtype=bf16, route=r)  # noqa: E731
    out.append(Case("rms_modulate/patch-norm-16384x1536", _repeat(norm), _repeat(norm, "rms_modulate"),
                    bytes=REPEAT * B * N * C * (4 + 2), note=f"x fp32 -> h bf16; x{REPEAT} per timing"))

    # Pixel block, one band of 4096 patches x 256 pixels x 16 channels.
    R, P2 = 4096, 256
    p = rnd(R, P2, 16, dtype=f32)
    e = rnd(R, P2 * 16)
    m = 0.5 * rnd(R, P2 * 96)
    nw = 1 + 0.1 * rnd(16)
    wts = dict(norm2_w=nw, fc1_w=rnd(64, 16) / 4, fc1_b=rnd(64), fc2_w=rnd(16, 64) / 8, fc2_b=rnd(16))
    pix = R * P2
    m3 = m.view(R, P2, 96)
    pre = lambda r: ops.add_rms_modulate(p, nw, m3[..., :16], m3[..., 16:32], out_dtype=bf16, route=r)  # noqa: E731
    out.append(Case("rms_modulate/pixel-pre-4096x256", _repeat(pre), _repeat(pre, "rms_modulate"),
                    bytes=REPEAT * pix * (16 * 4 + 32 * 2 + 16 * 2),
                    note=f"p fp32, shift1/scale1 bf16 (strided views of m) -> u bf16; x{REPEAT} per timing"))
    post = lambda r: ops.pixel_post(p, e, m, **wts, route=r)  # noqa: E731
    out.append(Case("pixel_modulate/post-4096x256", _repeat(post), _repeat(post, "pixel_modulate"),
                    bytes=REPEAT * pix * (16 * 4 + 16 * 2 + 64 * 2 + 16 * 4),
                    flops=0.0, note=f"p fp32, e bf16, gate1..gate2 bf16 -> p_new fp32, MLP 16-64-16 on chip; x{REPEAT}"))
    return out
