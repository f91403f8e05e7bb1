"""Patch and pixel embeddings from one pass over the image.

Patch tokens: unfold(x, P, stride P) @ W^T + b as a GEMM whose A loads gather straight
from the image (k = c*P*P + i*P + j of patch m -> x[b, c, hs*P + i, ws*P + j]), so the
unfolded [B, L, 3*P*P] tensor never exists. Pixel tokens: per pixel Linear(3 -> Dp) plus
the fixed 2-D sin-cos table, already regrouped per patch ([B*L, P*P, Dp]). The pixel work
is spread over the GEMM's column blocks: program (m, n) writes patch rows i = n, n + #n,
... of its BLOCK_M patches, re-reading pixels its own GEMM loads just pulled into L2.
Everything accumulates in float32; outputs take the weights' dtype.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from pidkern.kernels._common import (FLOAT_DTYPES, INTERPRET_FAMILY, SM90, ArchAutotune, dot_precision, grouped_tile,
                                     on_device)


def _cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "PIX_M": 32},
                         num_warps=warps, num_stages=stages)


def _configs(family: str):
    if family == INTERPRET_FAMILY:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "PIX_M": 16},
                              num_warps=4, num_stages=1)]
    if family == SM90:
        return [_cfg(128, 128, 64, 8, 3), _cfg(128, 128, 64, 8, 4), _cfg(128, 256, 64, 8, 3), _cfg(64, 128, 64, 4, 4)]
    # SM80 (<= 99 KB per block, mma.sync), from bench.compile_matrix for sm_89/sm_120: the
    # Hopper set fits (96 KB at most) without spilling, but two of its tiles leave 3 KB to
    # spare; these keep the 128 x 128 tile at 2-3 stages (32-64 KB) and a 4-warp one.
    return [_cfg(128, 128, 64, 8, 3), _cfg(128, 128, 64, 8, 2), _cfg(128, 128, 32, 8, 3), _cfg(64, 128, 64, 4, 3)]


@triton.jit
def _embed_kernel(x_ptr, w_ptr, b_ptr, pw_ptr, pb_ptr, col_ptr, row_ptr, tok_ptr, pix_ptr,
                  M, D, L, Ws, s_xb, s_xc, s_xh, s_xw, s_wn, s_wk, s_col, s_row,
                  P: tl.constexpr, BLOCK_P: tl.constexpr, DP: tl.constexpr, BLOCK_DP: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr, PIX_M: tl.constexpr, DOT_PREC: tl.constexpr):
    K: tl.constexpr = 3 * P * P
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(D, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, M, D, BLOCK_M, BLOCK_N, GROUP_M)

    # ---- patch tokens: GEMM with the im2col in the A loads ----
    rm = ((pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
    pb = rm // L
    pp = rm % L
    a_rows = pb * s_xb + (pp // Ws) * (P * s_xh) + (pp % Ws) * (P * s_xw)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % D
    rk = tl.arange(0, BLOCK_K)
    b_ptrs = w_ptr + rn.to(tl.int64)[None, :] * s_wn + rk[:, None] * s_wk
    wdt = w_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a_cols = (kk // (P * P)) * s_xc + ((kk // P) % P) * s_xh + (kk % P) * s_xw
        a_ptrs = x_ptr + a_rows[:, None] + a_cols[None, :]
        if K % BLOCK_K == 0:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            kmask = kk < K
            a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[:, None], other=0.0)
        acc = tl.dot(a.to(wdt), b, acc, input_precision=DOT_PREC)
        b_ptrs += BLOCK_K * s_wk
    om = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    on = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc += tl.load(b_ptr + on, mask=on < D, other=0.0).to(tl.float32)[None, :]
    tl.store(tok_ptr + om[:, None] * D + on[None, :], acc.to(tok_ptr.dtype.element_ty),
             mask=(om[:, None] < M) & (on[None, :] < D))

    # ---- pixel tokens of this program's patches, patch rows i = pid_n (mod num_pid_n) ----
    HALF: tl.constexpr = DP // 2
    pj = tl.arange(0, BLOCK_P)
    pd = tl.arange(0, BLOCK_DP)
    dmask = pd < DP
    pw0 = tl.load(pw_ptr + pd * 3 + 0, mask=dmask, other=0.0).to(tl.float32)
    pw1 = tl.load(pw_ptr + pd * 3 + 1, mask=dmask, other=0.0).to(tl.float32)
    pw2 = tl.load(pw_ptr + pd * 3 + 2, mask=dmask, other=0.0).to(tl.float32)
    pbias = tl.load(pb_ptr + pd, mask=dmask, other=0.0).to(tl.float32)
    is_col = pd < HALF
    is_row = (pd >= HALF) & dmask
    for sub in tl.static_range(0, BLOCK_M, PIX_M):
        pm = (pid_m * BLOCK_M + sub + tl.arange(0, PIX_M)).to(tl.int64)
        mmask = pm < M
        qb = pm // L
        qp = pm % L
        hs = qp // Ws
        ws = qp % Ws
        col = ws[:, None] * P + pj[None, :]                       # [PIX_M, BLOCK_P]
        lmask = mmask[:, None] & (pj < P)[None, :]
        smask = lmask[:, :, None] & dmask[None, None, :]
        # The column half of the sin-cos table does not depend on the patch row.
        emb_c = tl.load(col_ptr + col[:, :, None] * s_col + pd[None, None, :],
                        mask=lmask[:, :, None] & is_col[None, None, :], other=0.0)
        for i in range(pid_n, P, num_pid_n):
            row = hs * P + i                                       # [PIX_M]
            px = x_ptr + (qb * s_xb + row * s_xh)[:, None] + col * s_xw
            r = tl.load(px, mask=lmask, other=0.0).to(tl.float32)
            g = tl.load(px + s_xc, mask=lmask, other=0.0).to(tl.float32)
            bl = tl.load(px + 2 * s_xc, mask=lmask, other=0.0).to(tl.float32)
            emb_r = tl.load(row_ptr + row[:, None, None] * s_row + (pd - HALF)[None, None, :],
                            mask=mmask[:, None, None] & is_row[None, None, :], other=0.0)
            val = (r[:, :, None] * pw0[None, None, :] + g[:, :, None] * pw1[None, None, :]
                   + bl[:, :, None] * pw2[None, None, :] + pbias[None, None, :] + emb_c + emb_r)
            dst = pix_ptr + pm[:, None, None] * (P * P * DP) + ((i * P + pj) * DP)[None, :, None] + pd[None, None, :]
            tl.store(dst, val.to(pix_ptr.dtype.element_ty), mask=smask)


_embed_tuned = ArchAutotune(_embed_kernel, _configs, key=["M", "D", "L", "Ws"])


def _check(x, patch_w, patch_b, pix_w, pix_b, sincos_col, sincos_row, patch):
    if not isinstance(patch, int) or patch <= 0:
        raise ValueError(f"patch: expected a positive int, got {patch!r}")
    for name, t in (("x", x), ("patch_w", patch_w), ("patch_b", patch_b), ("pix_w", pix_w), ("pix_b", pix_b),
                    ("sincos_col", sincos_col), ("sincos_row", sincos_row)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, expected x's device {x.device}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"x: expected an RGB image [B, 3, H, W], got shape {tuple(x.shape)}")
    B, _, H, W = x.shape
    if H % patch or W % patch:
        raise ValueError(f"x: H and W must be multiples of patch={patch}, got {H}x{W}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x: dtype {x.dtype} not supported; expected one of {FLOAT_DTYPES}")
    K = 3 * patch * patch
    if patch_w.dim() != 2 or patch_w.shape[1] != K:
        raise ValueError(f"patch_w: expected [D, {K}] (3*patch*patch columns), got {tuple(patch_w.shape)}")
    if patch_w.dtype not in FLOAT_DTYPES:
        raise ValueError(f"patch_w: dtype {patch_w.dtype} not supported; expected one of {FLOAT_DTYPES}")
    if patch_w.stride(1) != 1:
        raise ValueError(f"patch_w: last dim must be contiguous (stride 1), got strides {patch_w.stride()}")
    D = patch_w.shape[0]
    if patch_b.shape != (D,):
        raise ValueError(f"patch_b: expected shape ({D},), got {tuple(patch_b.shape)}")
    if pix_w.dim() != 2 or pix_w.shape[1] != 3:
        raise ValueError(f"pix_w: expected [Dp, 3], got {tuple(pix_w.shape)}")
    Dp = pix_w.shape[0]
    if Dp % 4:
        raise ValueError(f"pix_w: Dp={Dp} must be a multiple of 4 (sin and cos halves per axis)")
    if pix_w.dtype != patch_w.dtype:
        raise ValueError(f"pix_w: dtype {pix_w.dtype} must match patch_w's {patch_w.dtype}")
    if pix_b.shape != (Dp,):
        raise ValueError(f"pix_b: expected shape ({Dp},), got {tuple(pix_b.shape)}")
    for name, t, n in (("sincos_col", sincos_col, W), ("sincos_row", sincos_row, H)):
        if t.shape != (n, Dp // 2):
            raise ValueError(f"{name}: expected shape ({n}, {Dp // 2}), got {tuple(t.shape)}")
        if t.dtype != torch.float32:
            raise ValueError(f"{name}: expected float32 (built in float64, stored fp32), got {t.dtype}")
        if t.stride(1) != 1:
            raise ValueError(f"{name}: last dim must be contiguous (stride 1), got strides {t.stride()}")
    return B, H, W, D, Dp


def patch_pixel_embed(x: torch.Tensor, patch_w: torch.Tensor, patch_b: torch.Tensor, pix_w: torch.Tensor,
                      pix_b: torch.Tensor, sincos_col: torch.Tensor, sincos_row: torch.Tensor,
                      patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(patch tokens [B, L, D], pixel tokens [B*L, P*P, Dp]) in patch_w's dtype."""
    B, H, W, D, Dp = _check(x, patch_w, patch_b, pix_w, pix_b, sincos_col, sincos_row, patch)
    Hs, Ws = H // patch, W // patch
    L = Hs * Ws
    M = B * L
    tok = torch.empty((B, L, D), device=x.device, dtype=patch_w.dtype)
    pix = torch.empty((M, patch * patch, Dp), device=x.device, dtype=patch_w.dtype)
    if M == 0 or D == 0:
        return tok, pix
    pix_w = pix_w.contiguous()
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(D, meta["BLOCK_N"]),)
    with on_device(x):
        _embed_tuned.at(x.device)[grid](x, patch_w, patch_b, pix_w, pix_b, sincos_col, sincos_row, tok, pix,
                           M, D, L, Ws, x.stride(0), x.stride(1), x.stride(2), x.stride(3),
                           patch_w.stride(0), patch_w.stride(1), sincos_col.stride(0), sincos_row.stride(0),
                           P=patch, BLOCK_P=triton.next_power_of_2(patch), DP=Dp,
                           BLOCK_DP=triton.next_power_of_2(Dp), DOT_PREC=dot_precision(patch_w.dtype))
    return tok, pix

