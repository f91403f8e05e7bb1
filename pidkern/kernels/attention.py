"""Joint text-image attention with q/k RMSNorm and RoPE fused into the tile loads.

q, k and v are read straight from the QKV Linear output ([B, N, 3*H*hd], split as
(3, H, hd)); text and image keys are two separate sources walked one after the other,
so nothing is transposed or concatenated. Two kernels:

- `_attn_fwd`: flash-attention forward (online softmax in base 2). With NORM it
  normalises and ropes q once per program and every k tile as it is loaded; without
  it, it is the plain attention core over already prepared q, k, v.
- `_prep`: normalises + ropes q and k and copies v into [B, T+L, H, hd] (text first),
  for SDPA/cuDNN or for `_attn_fwd` without NORM.

Head dims that are not a power of two (72 in the pixel blocks) are split into a
power-of-two chunk (64) and a 16-wide chunk with the tail masked, rather than padded to
128: tl.dot needs K >= 16, and padding 72 to 128 would waste 44% of the tensor-core work.
The RMS is taken over the full head dim across both chunks.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pidkern.fp8 import amax
from pidkern.kernels._common import (FLOAT_DTYPES, INTERPRET, INTERPRET_FAMILY, SM90, ArchAutotune, aligned_rows,
                                     dot_precision, on_device)

LOG2E = 1.4426950408889634
E4M3_MAX = tl.constexpr(448.0)   # largest finite float8_e4m3fn
I8_MAX = tl.constexpr(127.0)


# --------------------------------------------------------------------------- kernels

@triton.jit
def _load_tile(base, rows, stride, cols, n_rows, n_cols, MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    ptrs = base + rows[:, None] * stride + cols[None, :]
    if MASK_R:
        if MASK_C:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
        else:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if MASK_C:
            x = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _load_head(base, rows, stride, n_rows, HD: tl.constexpr, HD_A: tl.constexpr, HD_B: tl.constexpr,
               MASK_R: tl.constexpr):
    """One head's vectors for `rows` as two chunks: [R, HD_A] and [R, HD_B] (columns past HD
    masked; hd 72 = 64 + 16 with 8 masked). With HD_B == 0 the second chunk is a stand-in."""
    x_a = _load_tile(base, rows, stride, tl.arange(0, HD_A), n_rows, HD, MASK_R, False)
    if HD_B > 0:
        x_b = _load_tile(base, rows, stride, HD_A + tl.arange(0, HD_B), n_rows, HD, MASK_R, HD_A + HD_B != HD)
    else:
        x_b = x_a
    return x_a, x_b


@triton.jit
def _rope(x, c, s):
    # x [R, W] holds pairs (2m, 2m+1) side by side; c, s [R, W/2]
    a, b = tl.split(tl.reshape(x, (x.shape[0], x.shape[1] // 2, 2)))
    y = tl.join(a * c - b * s, a * s + b * c)
    return tl.reshape(y, (x.shape[0], x.shape[1]))


@triton.jit
def _norm_rope(x_a, x_b, w_a, w_b, cos_ptr, sin_ptr, rows, n_rows, eps, MASK_R: tl.constexpr,
               HD: tl.constexpr, HD_A: tl.constexpr, HD_B: tl.constexpr):
    """RMSNorm over the full head dim (both chunks) times the weight, then RoPE; float32."""
    HALF: tl.constexpr = HD // 2
    x_a = x_a.to(tl.float32)
    ss = tl.sum(x_a * x_a, 1)
    if HD_B > 0:
        x_b = x_b.to(tl.float32)
        ss += tl.sum(x_b * x_b, 1)
    r = tl.rsqrt(ss / HD + eps)
    ca = tl.arange(0, HD_A // 2)
    x_a = _rope(x_a * r[:, None] * w_a[None, :],
                _load_tile(cos_ptr, rows, HALF, ca, n_rows, HALF, MASK_R, False),
                _load_tile(sin_ptr, rows, HALF, ca, n_rows, HALF, MASK_R, False))
    if HD_B > 0:
        cb = HD_A // 2 + tl.arange(0, HD_B // 2)
        MASK_C: tl.constexpr = HD_A + HD_B != HD
        x_b = _rope(x_b * r[:, None] * w_b[None, :],
                    _load_tile(cos_ptr, rows, HALF, cb, n_rows, HALF, MASK_R, MASK_C),
                    _load_tile(sin_ptr, rows, HALF, cb, n_rows, HALF, MASK_R, MASK_C))
    return x_a, x_b


@triton.jit
def _load_w(w_ptr, HD: tl.constexpr, HD_A: tl.constexpr, HD_B: tl.constexpr):
    w_a = tl.load(w_ptr + tl.arange(0, HD_A)).to(tl.float32)
    if HD_B > 0:
        cb = HD_A + tl.arange(0, HD_B)
        w_b = tl.load(w_ptr + cb, mask=cb < HD, other=0.0).to(tl.float32)
    else:
        w_b = tl.zeros([16], tl.float32)
    return w_a, w_b


@triton.jit
def _to_e4m3(x, inv_scale):
    """x * inv_scale as e4m3, clamped to its range (a rounding past 448 would give NaN:
    e4m3fn has no infinity)."""
    y = x.to(tl.float32) * inv_scale
    return tl.minimum(tl.maximum(y, -E4M3_MAX), E4M3_MAX).to(tl.float8e4nv)


@triton.jit
def _to_i8(x, inv_scale):
    """x * inv_scale rounded (half away from zero) to int8 in [-127, 127]."""
    y = tl.minimum(tl.maximum(x.to(tl.float32) * inv_scale, -127.0), 127.0)
    return tl.where(y >= 0, y + 0.5, y - 0.5).to(tl.int8)


@triton.jit
def _row_amax(x_a, x_b, HD_B: tl.constexpr):
    """max |x| of each row over both head-dim chunks, never 0 (it divides)."""
    m = tl.max(tl.abs(x_a), 1)
    if HD_B > 0:
        m = tl.maximum(m, tl.max(tl.abs(x_b), 1))
    return tl.maximum(m, 1e-30)


@triton.jit
def _weight_bound(w_a, w_b, HD: tl.constexpr):
    """sqrt(HD) * max|w|: no element of RMSNorm(x) * w, roped, exceeds it."""
    wmax = tl.maximum(tl.max(tl.abs(w_a), 0), tl.max(tl.abs(w_b), 0))
    return tl.maximum(tl.sqrt(tl.full([], HD, tl.float32)) * wmax, 1e-30)   # never 0: it divides


@triton.jit
def _key_source(wk_ptr, sk, HD: tl.constexpr, HD_A: tl.constexpr, HD_B: tl.constexpr, NORM: tl.constexpr,
                QK8: tl.constexpr):
    """A key source's k-norm weights (zeros without NORM) and its k scale: with e4m3 QK^T
    and NORM the source's bound (see _attn_fwd), else sk as given."""
    if NORM:
        wk_a, wk_b = _load_w(wk_ptr, HD, HD_A, HD_B)
    else:
        wk_a = tl.zeros([HD_A], tl.float32)
        wk_b = tl.zeros([16], tl.float32)
    if QK8 == 1 and NORM:
        sk = _weight_bound(wk_a, wk_b, HD) / E4M3_MAX
    return wk_a, wk_b, sk


@triton.jit
def _kv_tile(acc_a, acc_b, m_i, l_i, q_a, q_b, k_base, v_base, stride, cos_ptr, sin_ptr, wk_a, wk_b,
             start_n, n_k, eps, sq, sk, inv_sv_a, inv_sv_b,
             HD: tl.constexpr, HD_A: tl.constexpr, HD_B: tl.constexpr, NORM: tl.constexpr,
             MASK: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, QK8: tl.constexpr,
             PV8: tl.constexpr):
    """One key/value block. With QK8 (see _attn_fwd) q_a/q_b come quantized, sq their scale
    (per tile for e4m3, per row for int8); k is quantized here: e4m3 with the scale sk, int8
    with its own per-token scale. With PV8, P (scaled by 448) and v (per channel, inv_sv_*)
    are e4m3 too."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_a, k_b = _load_head(k_base, offs_n, stride, n_k, HD, HD_A, HD_B, MASK)
    if NORM:
        k_a, k_b = _norm_rope(k_a, k_b, wk_a, wk_b, cos_ptr, sin_ptr, offs_n, n_k, eps, MASK, HD, HD_A, HD_B)
    if QK8 == 1:
        k_a = _to_e4m3(k_a, 1.0 / sk)
        if HD_B > 0:
            k_b = _to_e4m3(k_b, 1.0 / sk)
        # fp32 accumulation over one head dim only; the scales of q's tile and k applied after
        qk = tl.dot(q_a, tl.trans(k_a))
        if HD_B > 0:
            qk += tl.dot(q_b, tl.trans(k_b))
        qk = qk * (sq * sk)
    elif QK8 == 2:
        sk_n = _row_amax(k_a, k_b, HD_B) / I8_MAX          # per token: free, k is in registers
        k_a = _to_i8(k_a, 1.0 / sk_n[:, None])
        if HD_B > 0:
            k_b = _to_i8(k_b, 1.0 / sk_n[:, None])
        qk = tl.dot(q_a, tl.trans(k_a), out_dtype=tl.int32)
        if HD_B > 0:
            qk += tl.dot(q_b, tl.trans(k_b), out_dtype=tl.int32)
        qk = qk.to(tl.float32) * sq[:, None] * sk_n[None, :]
    else:
        if NORM:
            k_a = k_a.to(q_a.dtype)
            if HD_B > 0:
                k_b = k_b.to(q_a.dtype)
        qk = tl.dot(q_a, tl.trans(k_a), input_precision=PREC)
        if HD_B > 0:
            qk = tl.dot(q_b, tl.trans(k_b), qk, input_precision=PREC)
    if MASK:
        qk = tl.where(offs_n[None, :] < n_k, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v_a, v_b = _load_head(v_base, offs_n, stride, n_k, HD, HD_A, HD_B, MASK)
    if PV8:
        # p <= 1: scaled by 448 it spans e4m3's range. A fresh dot per block, added in fp32:
        # sm_90's fp8 MMA accumulates with reduced precision, so no long chain runs inside it
        p8 = (p * E4M3_MAX).to(tl.float8e4nv)
        acc_a = acc_a * alpha[:, None] + tl.dot(p8, _to_e4m3(v_a, inv_sv_a[None, :]))
        if HD_B > 0:
            acc_b = acc_b * alpha[:, None] + tl.dot(p8, _to_e4m3(v_b, inv_sv_b[None, :]))
    else:
        p = p.to(v_a.dtype)
        acc_a = tl.dot(p, v_a, acc_a * alpha[:, None], input_precision=PREC)
        if HD_B > 0:
            acc_b = tl.dot(p, v_b, acc_b * alpha[:, None], input_precision=PREC)
    return acc_a, acc_b, m_new, l_i


@triton.jit
def _attn_fwd(Qi, Ki, Vi, Oi, Qt, Kt, Vt, Ot,
              CosI, SinI, CosT, SinT, WQi, WKi, WQt, WKt,
              s_ib, s_it, s_tb, s_tt, s_oib, s_oit, s_otb, s_ott,
              L, T, H, qk_scale, eps, KS, VS,
              HD: tl.constexpr, HD_A: tl.constexpr, HD_B: tl.constexpr,
              HAS_TXT: tl.constexpr, NORM: tl.constexpr, PREC: tl.constexpr, ALIGN: tl.constexpr,
              QK8: tl.constexpr, PV8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid: (query tiles of the image then of the text, B*H). Strides come in units of
    ALIGN elements (see _common.row_align); within a token the heads are packed (head stride HD).

    8-bit modes (docs/attention_fp8.md), all with fp32 accumulation and softmax:
    QK8 = 1: QK^T on e4m3. q scaled per (batch, head, query tile) by the tile's amax after
      norm + RoPE; k per key source by a bound known before the loop: with NORM
      sqrt(HD) * max|k-norm weight| (an RMS-normalised vector has no element above sqrt(HD),
      RoPE keeps pair norms), else KS[b*H + h], k's amax per (batch, head).
    QK8 = 2: QK^T on int8, q scaled per row and k per token by their amax (both in registers
      when quantized, so the scales cost one row reduction each).
    PV8: PV on e4m3 too, P scaled by 448, v per (batch, head, channel) by VS[(b*H + h)*HD + d],
      its amax."""
    s_ib = s_ib * ALIGN
    s_it = s_it * ALIGN
    s_tb = s_tb * ALIGN
    s_tt = s_tt * ALIGN
    s_oib = s_oib * ALIGN
    s_oit = s_oit * ALIGN
    s_otb = s_otb * ALIGN
    s_ott = s_ott * ALIGN
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    n_img_tiles = tl.cdiv(L, BLOCK_M)

    # this program's query source: an image tile, or a text tile past the image ones
    q_base = Qi + b * s_ib + h * HD
    o_base = Oi + b * s_oib + h * HD
    q_stride = s_it
    o_stride = s_oit
    n_q = L
    start_m = pid_m * BLOCK_M
    q_cos = CosI
    q_sin = SinI
    wq_ptr = WQi
    if HAS_TXT:
        if pid_m >= n_img_tiles:
            q_base = Qt + b * s_tb + h * HD
            o_base = Ot + b * s_otb + h * HD
            q_stride = s_tt
            o_stride = s_ott
            n_q = T
            start_m = (pid_m - n_img_tiles) * BLOCK_M
            q_cos = CosT
            q_sin = SinT
            wq_ptr = WQt

    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_a, q_b = _load_head(q_base, offs_m, q_stride, n_q, HD, HD_A, HD_B, True)
    # q is prepared once: normalised, roped, and pre-multiplied by scale*log2(e)
    if NORM:
        wq_a, wq_b = _load_w(wq_ptr, HD, HD_A, HD_B)
        qa32, qb32 = _norm_rope(q_a, q_b, wq_a, wq_b, q_cos, q_sin, offs_m, n_q, eps, True, HD, HD_A, HD_B)
    else:
        qa32 = q_a.to(tl.float32)
        qb32 = q_b.to(tl.float32)
    qa32 = qa32 * qk_scale
    if HD_B > 0:
        qb32 = qb32 * qk_scale
    sk = 1.0
    if QK8 == 1:
        sq = tl.max(_row_amax(qa32, qb32, HD_B), 0) / E4M3_MAX
        q_a = _to_e4m3(qa32, 1.0 / sq)
        if HD_B > 0:
            q_b = _to_e4m3(qb32, 1.0 / sq)
        if not NORM:
            sk = tl.load(KS + pid_bh) / E4M3_MAX           # with NORM: per key source, below
    elif QK8 == 2:
        sq = _row_amax(qa32, qb32, HD_B) / I8_MAX
        q_a = _to_i8(qa32, 1.0 / sq[:, None])
        if HD_B > 0:
            q_b = _to_i8(qb32, 1.0 / sq[:, None])
    else:
        sq = 1.0
        q_a = qa32.to(Qi.dtype.element_ty)
        if HD_B > 0:
            q_b = qb32.to(Qi.dtype.element_ty)
    if PV8:
        dva = tl.arange(0, HD_A)
        sv_a = tl.load(VS + pid_bh * HD + dva)
        if HD_B > 0:
            dvb = HD_A + tl.arange(0, HD_B)
            sv_b = tl.load(VS + pid_bh * HD + dvb, mask=dvb < HD, other=1.0)
        else:
            sv_b = tl.full([16], 1.0, tl.float32)
        inv_sv_a = E4M3_MAX / sv_a
        inv_sv_b = E4M3_MAX / sv_b
    else:
        inv_sv_a = tl.zeros([HD_A], tl.float32)
        inv_sv_b = tl.zeros([16 if HD_B == 0 else HD_B], tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_a = tl.zeros([BLOCK_M, HD_A], tl.float32)
    acc_b = tl.zeros([BLOCK_M, 16 if HD_B == 0 else HD_B], tl.float32)

    if HAS_TXT:
        wk_a, wk_b, sk = _key_source(WKt, sk, HD, HD_A, HD_B, NORM, QK8)
        kt_base = Kt + b * s_tb + h * HD
        vt_base = Vt + b * s_tb + h * HD
        for start_n in range(0, T, BLOCK_N):
            acc_a, acc_b, m_i, l_i = _kv_tile(acc_a, acc_b, m_i, l_i, q_a, q_b, kt_base, vt_base, s_tt,
                                              CosT, SinT, wk_a, wk_b, start_n, T, eps, sq, sk,
                                              inv_sv_a, inv_sv_b, HD, HD_A, HD_B, NORM, True, BLOCK_N, PREC, QK8, PV8)
    wk_a, wk_b, sk = _key_source(WKi, sk, HD, HD_A, HD_B, NORM, QK8)
    ki_base = Ki + b * s_ib + h * HD
    vi_base = Vi + b * s_ib + h * HD
    n_full = (L // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc_a, acc_b, m_i, l_i = _kv_tile(acc_a, acc_b, m_i, l_i, q_a, q_b, ki_base, vi_base, s_it,
                                          CosI, SinI, wk_a, wk_b, start_n, L, eps, sq, sk,
                                          inv_sv_a, inv_sv_b, HD, HD_A, HD_B, NORM, False, BLOCK_N, PREC, QK8, PV8)
    if n_full < L:
        acc_a, acc_b, m_i, l_i = _kv_tile(acc_a, acc_b, m_i, l_i, q_a, q_b, ki_base, vi_base, s_it,
                                          CosI, SinI, wk_a, wk_b, n_full, L, eps, sq, sk,
                                          inv_sv_a, inv_sv_b, HD, HD_A, HD_B, NORM, True, BLOCK_N, PREC, QK8, PV8)

    if PV8:   # undo v's per-channel scale and P's 448
        acc_a = acc_a * (sv_a / (E4M3_MAX * E4M3_MAX))[None, :]
        acc_b = acc_b * (sv_b / (E4M3_MAX * E4M3_MAX))[None, :]
    inv_l = 1.0 / l_i
    row_ok = offs_m[:, None] < n_q
    da = tl.arange(0, HD_A)
    tl.store(o_base + offs_m[:, None] * o_stride + da[None, :],
             (acc_a * inv_l[:, None]).to(Oi.dtype.element_ty), mask=row_ok)
    if HD_B > 0:
        db = HD_A + tl.arange(0, HD_B)
        tl.store(o_base + offs_m[:, None] * o_stride + db[None, :],
                 (acc_b * inv_l[:, None]).to(Oi.dtype.element_ty), mask=row_ok & (db[None, :] < HD))


@triton.jit
def _prep(QKV, Q, K, V, Cos, Sin, WQ, WK, s_b, s_t, s_ob, n, tok0, H, eps,
          HD: tl.constexpr, HD_A: tl.constexpr, HD_B: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    """One token block of one (batch, head): q, k normalised + roped, v copied, written
    to rows tok0.. of the [B, N, H, hd] outputs. Strides in units of ALIGN elements."""
    s_b = s_b * ALIGN
    s_t = s_t * ALIGN
    s_ob = s_ob * ALIGN
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    src = QKV + b * s_b + h * HD
    dst_off = b * s_ob + h * HD + tok0 * (H * HD)
    _prep_one(src, Q + dst_off, WQ, Cos, Sin, rows, s_t, n, eps, True, H, HD, HD_A, HD_B)
    _prep_one(src + H * HD, K + dst_off, WK, Cos, Sin, rows, s_t, n, eps, True, H, HD, HD_A, HD_B)
    _prep_one(src + 2 * H * HD, V + dst_off, WK, Cos, Sin, rows, s_t, n, eps, False, H, HD, HD_A, HD_B)


@triton.jit
def _prep_one(src, dst, w_ptr, cos_ptr, sin_ptr, rows, s_t, n, eps, NORM: tl.constexpr, H,
              HD: tl.constexpr, HD_A: tl.constexpr, HD_B: tl.constexpr):
    x_a, x_b = _load_head(src, rows, s_t, n, HD, HD_A, HD_B, True)
    if NORM:
        w_a, w_b = _load_w(w_ptr, HD, HD_A, HD_B)
        x_a, x_b = _norm_rope(x_a, x_b, w_a, w_b, cos_ptr, sin_ptr, rows, n, eps, True, HD, HD_A, HD_B)
    ok = rows[:, None] < n
    ptr = dst + rows[:, None] * (H * HD)
    da = tl.arange(0, HD_A)
    tl.store(ptr + da[None, :], x_a.to(dst.dtype.element_ty), mask=ok)
    if HD_B > 0:
        db = HD_A + tl.arange(0, HD_B)
        tl.store(ptr + db[None, :], x_b.to(dst.dtype.element_ty), mask=ok & (db[None, :] < HD))


# ------------------------------------------------------------------------- launchers

def _configs(family: str):
    if family == INTERPRET_FAMILY:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    if family == SM90:
        # Hopper flash-attention forward shapes, checked by compiling offline for sm_90: the
        # 8-warp ones do not spill (hd 72 fused at BLOCK_N 128: a few bytes); the 4-warp one
        # spills in the fused variant but suits the plain core; BLOCK_M 256 spilled badly.
        return [
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=4),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        ]
    # SM80 (<= 99 KB per block, mma.sync), from bench.compile_matrix for sm_89/sm_120. Of the
    # Hopper set only 128 x 64 at 3 stages fits in bf16 (98 KB with hd 72 fused, 1 KB to
    # spare), and the int8 mode's hd-72 fused variant needs 114 KB there: it cannot launch.
    # 4 stages (120-138 KB) and 128 x 128 (160-180 KB) never can. mma.sync holds the
    # accumulators in more registers per thread than wgmma, so the fused hd-72 kernel (norm
    # and RoPE of every k tile) spills at 128 x 64 and at 64 x 64 with 4 warps; 128 x 32 with
    # 8 warps and 64 x 32 with 4 do not spill in bf16 (32 bytes on sm_120 for the latter; a
    # few bytes in some 8-bit modes).
    # The 2-stage 128 x 64 is the FlashAttention-2 tile on these cards.
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
    ]


_attn_fwd_tuned = ArchAutotune(_attn_fwd, _configs, key=["HD", "L", "T", "HAS_TXT", "NORM", "ALIGN", "QK8", "PV8"])


def _chunks(hd: int, eight_bit: bool = False) -> tuple[int, int]:
    # sm_90's 8-bit MMA reduces 32 elements at a time: an 8-bit tail chunk is 32 wide
    hd_a = 1 << (hd.bit_length() - 1)
    rest = hd - hd_a
    hd_b = 0 if rest == 0 else max(32 if eight_bit else 16, triton.next_power_of_2(rest))
    return hd_a, hd_b


def _check_head_dim(hd: int, what: str):
    if hd % 2 or hd < 16 or hd > 256:
        raise ValueError(f"{what}: head dim {hd} must be even and in [16, 256]")


def _check_qkv(name: str, t: torch.Tensor, heads: int, B: int | None = None, C: int | None = None,
               dtype: torch.dtype | None = None, device: torch.device | None = None):
    if not isinstance(t, torch.Tensor) or t.dim() != 3:
        raise ValueError(f"{name}: expected a [B, N, 3*heads*hd] tensor, got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: dtype {t.dtype} not supported; expected one of {FLOAT_DTYPES}")
    if t.shape[2] % (3 * heads):
        raise ValueError(f"{name}: last dim {t.shape[2]} is not 3*heads*hd with heads={heads}")
    if t.stride(2) != 1:
        raise ValueError(f"{name}: last dim must be contiguous (stride {t.stride(2)})")
    if B is not None and t.shape[0] != B:
        raise ValueError(f"{name}: batch {t.shape[0]} != image batch {B}")
    if C is not None and t.shape[2] != C:
        raise ValueError(f"{name}: last dim {t.shape[2]} != image last dim {C}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name}: dtype {t.dtype} != qkv_img dtype {dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: device {t.device} != qkv_img device {device}")


def _check_vec(name: str, w, hd: int, device):
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (hd,):
        raise ValueError(f"{name}: expected an RMSNorm weight of shape ({hd},), got "
                         f"{tuple(w.shape) if isinstance(w, torch.Tensor) else w!r}")
    if w.device != device or not w.is_contiguous() or not w.is_floating_point():
        raise ValueError(f"{name}: expected a contiguous floating tensor on {device}")


def _check_table(name: str, t, n: int, hd: int, device):
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n, hd // 2):
        raise ValueError(f"{name}: expected a float32 table of shape ({n}, {hd // 2}), got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else t!r}")
    if t.dtype != torch.float32 or not t.is_contiguous() or t.device != device:
        raise ValueError(f"{name}: expected contiguous float32 on {device}, got {t.dtype} "
                         f"(contiguous={t.is_contiguous()}) on {t.device}")


def check_inputs(qkv_img, qkv_txt, q_norm_img, k_norm_img, q_norm_txt, k_norm_txt,
                 cos_img, sin_img, cos_txt, sin_txt, heads) -> tuple[int, int, int, int]:
    """Validate everything; returns (B, L, T, hd)."""
    if not isinstance(heads, int) or heads <= 0:
        raise ValueError(f"heads: expected a positive int, got {heads!r}")
    _check_qkv("qkv_img", qkv_img, heads)
    B, L, C = qkv_img.shape
    hd = C // (3 * heads)
    _check_head_dim(hd, "qkv_img")
    if L == 0:
        raise ValueError("qkv_img: no image tokens")
    dev = qkv_img.device
    _check_vec("q_norm_img", q_norm_img, hd, dev)
    _check_vec("k_norm_img", k_norm_img, hd, dev)
    _check_table("rope_img cos", cos_img, L, hd, dev)
    _check_table("rope_img sin", sin_img, L, hd, dev)
    T = 0
    if qkv_txt is not None:
        _check_qkv("qkv_txt", qkv_txt, heads, B, C, qkv_img.dtype, dev)
        T = qkv_txt.shape[1]
        _check_vec("q_norm_txt", q_norm_txt, hd, dev)
        _check_vec("k_norm_txt", k_norm_txt, hd, dev)
        _check_table("rope_txt cos", cos_txt, T, hd, dev)
        _check_table("rope_txt sin", sin_txt, T, hd, dev)
    else:
        for name, v in (("q_norm_txt", q_norm_txt), ("k_norm_txt", k_norm_txt), ("rope_txt cos", cos_txt),
                        ("rope_txt sin", sin_txt)):
            if v is not None:
                raise ValueError(f"{name}: given without qkv_txt")
    return B, L, T, hd


def _require_aligned(what: str, tensors, strides, hd: int) -> int:
    unit, ok = aligned_rows(tensors, *strides, hd)   # the head offset h*hd starts rows too
    if tensors[0].is_cuda and not ok:
        raise ValueError(f"{what}: on CUDA every q/k/v row must start 16-byte aligned (head dim {hd}, strides "
                         f"{tuple(strides)}, {tensors[0].dtype}); use a head dim that is a multiple of "
                         f"{16 // tensors[0].element_size()} and contiguous inputs, or ops.attention, which "
                         f"falls back to PyTorch")
    return unit


def rows_aligned(qkv: torch.Tensor, heads: int) -> bool:
    """Whether the CUDA kernels accept this QKV Linear output (see _common.aligned_rows);
    ops.attention sends the others to the PyTorch chain."""
    hd = qkv.shape[-1] // (3 * heads)
    return aligned_rows([qkv], qkv.stride(0), qkv.stride(1), hd)[1]


def _split(qkv: torch.Tensor, heads: int, hd: int):
    v = qkv.view(qkv.shape[0], qkv.shape[1], 3, heads * hd)
    return v[:, :, 0], v[:, :, 1], v[:, :, 2]


# mode -> (QK8, PV8) of _attn_fwd: QK^T in e4m3 or int8, PV in e4m3 or in the input dtype
MODES = {"fp8": (1, True), "fp8qk": (1, False), "int8": (2, True), "int8qk": (2, False)}


def _mode(mode) -> tuple[int, bool]:
    if mode is None:
        return 0, False
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected None (no 8-bit arithmetic) or one of {tuple(MODES)}")
    return MODES[mode]


def _amax(x: torch.Tensor, dims) -> torch.Tensor:
    """|x|'s max over dims (pidkern.fp8.amax: never 0), contiguous, as the kernel reads it."""
    return amax(x, dims, keepdim=False).contiguous()


def attention_fused(qkv_img, qkv_txt, q_norm_img, k_norm_img, q_norm_txt, k_norm_txt,
                    cos_img, sin_img, cos_txt, sin_txt, heads: int, eps: float = 1e-6, mode: str | None = None):
    """The fully fused kernel. Returns (o_img [B, L, H*hd], o_txt [B, T, H*hd]; T may be 0).
    mode: None, or an 8-bit mode of MODES (see _attn_fwd for the scales)."""
    qk8, pv8 = _mode(mode)
    B, L, T, hd = check_inputs(qkv_img, qkv_txt, q_norm_img, k_norm_img, q_norm_txt, k_norm_txt,
                               cos_img, sin_img, cos_txt, sin_txt, heads)
    o_img = torch.empty(B, L, heads * hd, device=qkv_img.device, dtype=qkv_img.dtype)
    o_txt = torch.empty(B, T, heads * hd, device=qkv_img.device, dtype=qkv_img.dtype)
    if B == 0:
        return o_img, o_txt
    wdt = torch.promote_types(q_norm_img.dtype, k_norm_img.dtype)
    qi, ki, vi = _split(qkv_img, heads, hd)
    if T:
        qt, kt, vt = _split(qkv_txt, heads, hd)
        ws = [w.to(wdt) for w in (q_norm_img, k_norm_img, q_norm_txt, k_norm_txt)]
        tabs = (cos_img, sin_img, cos_txt, sin_txt)
        s_t = (qkv_txt.stride(0), qkv_txt.stride(1))
    else:
        qt, kt, vt = qi, ki, vi
        ws = [q_norm_img.to(wdt), k_norm_img.to(wdt)] * 2
        tabs = (cos_img, sin_img, cos_img, sin_img)
        s_t = (qkv_img.stride(0), qkv_img.stride(1))
    vs = None
    if pv8:   # v's amax per (batch, head, channel) over both sources: one pass over v
        vs = _amax(vi.unflatten(2, (heads, hd)), 1)
        if T:
            vs = torch.maximum(vs, _amax(vt.unflatten(2, (heads, hd)), 1))
    # with no text, hand the kernel real buffers (never the empty o_txt's null pointer)
    _launch(qi, ki, vi, o_img, qt, kt, vt, o_txt if T else o_img, tabs, ws, (qkv_img.stride(0), qkv_img.stride(1)), s_t,
            B, L, T, heads, hd, eps, norm=True, qk8=qk8, pv8=pv8, vs=vs)
    return o_img, o_txt


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str | None = None) -> torch.Tensor:
    """Plain attention over prepared q, k, v [B, N, H, hd] (last two dims packed);
    returns [B, N, H*hd]. mode as in attention_fused; an e4m3 k is scaled by its amax per
    (batch, head)."""
    qk8, pv8 = _mode(mode)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4 or t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name}: expected [B, N, H, hd] matching q {tuple(q.shape)} {q.dtype}, "
                             f"got {tuple(t.shape)} {t.dtype}")
        if t.stride(3) != 1 or t.stride(2) != t.shape[3]:
            raise ValueError(f"{name}: heads and head dim must be packed (strides {t.stride()})")
        if t.stride(1) != t.shape[2] * t.shape[3]:
            raise ValueError(f"{name}: tokens must be packed (strides {t.stride()})")
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q: dtype {q.dtype} not supported; expected one of {FLOAT_DTYPES}")
    B, N, H, hd = q.shape
    _check_head_dim(hd, "q")
    o = torch.empty(B, N, H * hd, device=q.device, dtype=q.dtype)
    if B == 0 or N == 0:
        return o
    dummy_tab = torch.empty(1, device=q.device, dtype=torch.float32)
    dummy_w = torch.empty(1, device=q.device, dtype=torch.float32)
    s = (q.stride(0), q.stride(1))
    ks = _amax(k, (1, 3)) if qk8 == 1 else None
    vs = _amax(v, 1) if pv8 else None
    _launch(q, k, v, o, q, k, v, o, (dummy_tab,) * 4, [dummy_w] * 4, s, s, B, N, 0, H, hd, 0.0, norm=False,
            qk8=qk8, pv8=pv8, ks=ks, vs=vs)
    return o


def _launch(qi, ki, vi, oi, qt, kt, vt, ot, tabs, ws, s_i, s_t, B, L, T, H, hd, eps, norm, qk8=0, pv8=False,
            ks=None, vs=None):
    """qk8, pv8: _attn_fwd's QK8, PV8; ks: k's amax per (batch, head) (qk8 == 1 in the core);
    vs: v's amax per (batch, head, channel) (pv8)."""
    for name, s in (("k", ki.stride()), ("v", vi.stride())):
        if s[:2] != tuple(s_i):
            raise ValueError(f"{name}: strides {s} differ from q's {s_i}")
    hd_a, hd_b = _chunks(hd, qk8 > 0 or pv8)
    qk_scale = LOG2E / math.sqrt(hd)
    dummy = oi if ks is None or vs is None else None
    strides = (*s_i, *s_t, oi.stride(0), oi.stride(1), ot.stride(0), ot.stride(1))
    align = _require_aligned("attention", (qi, ki, vi, oi, qt, kt, vt, ot), strides, hd)

    def grid(meta):
        return (triton.cdiv(L, meta["BLOCK_M"]) + triton.cdiv(T, meta["BLOCK_M"]), B * H)

    kernel = _attn_fwd_tuned.at(qi.device)
    with on_device(qi):
        kernel[grid](qi, ki, vi, oi, qt, kt, vt, ot, *tabs, *ws,
                     *(s // align for s in strides), L, T, H, qk_scale, eps,
                     dummy if ks is None else ks, dummy if vs is None else vs,
                     HD=hd, HD_A=hd_a, HD_B=hd_b, HAS_TXT=T > 0, NORM=norm, PREC=dot_precision(qi.dtype),
                     ALIGN=align, QK8=qk8, PV8=pv8)


def attention_prep(qkv_img, qkv_txt, q_norm_img, k_norm_img, q_norm_txt, k_norm_txt,
                   cos_img, sin_img, cos_txt, sin_txt, heads: int, eps: float = 1e-6):
    """QK-norm + RoPE of q, k and a copy of v into three [B, T+L, H, hd] tensors, text first."""
    B, L, T, hd = check_inputs(qkv_img, qkv_txt, q_norm_img, k_norm_img, q_norm_txt, k_norm_txt,
                               cos_img, sin_img, cos_txt, sin_txt, heads)
    shape = (B, T + L, heads, hd)
    q, k, v = (torch.empty(shape, device=qkv_img.device, dtype=qkv_img.dtype) for _ in range(3))
    if B == 0:
        return q, k, v
    hd_a, hd_b = _chunks(hd)
    block = 32 if INTERPRET else 64
    srcs = [(qkv_img, q_norm_img, k_norm_img, cos_img, sin_img, L, T)]
    if T:
        srcs.append((qkv_txt, q_norm_txt, k_norm_txt, cos_txt, sin_txt, T, 0))
    with on_device(qkv_img):
        for qkv, wq, wk, cos, sin, n, tok0 in srcs:
            align = _require_aligned("attention_prep", (qkv, q), (qkv.stride(0), qkv.stride(1), q.stride(0)), hd)
            _prep[(triton.cdiv(n, block), B * heads)](
                qkv, q, k, v, cos, sin, wq, wk, qkv.stride(0) // align, qkv.stride(1) // align, q.stride(0) // align,
                n, tok0, heads, eps,
                HD=hd, HD_A=hd_a, HD_B=hd_b, ALIGN=align, BLOCK=block, num_warps=4)
    return q, k, v
