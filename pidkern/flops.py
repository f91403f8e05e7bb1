"""Analytic FLOP model of a PiD decode (docs/design.md), so every timing can be turned into TFLOP/s.

Counts what a FLOP counter counts: matrix products (2 FLOP per multiply-add), convolutions
and attention (QK^T and PV). Norms, activations, RoPE and the sampler's elementwise
arithmetic are left out; at real sizes they are far below 0.1% of the total.

The latent adapter (convs + output heads) does not depend on t, so a decode needs it once;
`adapter_per_step=True` counts it every step, which is what an engine that recomputes it
(the released pipeline) executes.
"""
from __future__ import annotations

import math

from .config import PiDConfig


def _grid(config: PiDConfig, height: int, width: int) -> tuple[int, int]:
    if height % config.patch or width % config.patch:
        raise ValueError(f"height={height}, width={width} must be multiples of the patch size {config.patch}")
    return height // config.patch, width // config.patch


def adapter_input_channels(config: PiDConfig) -> int:
    """Channels entering the first adapter conv: the config's own count (after unpack and
    any space-to-depth), so the FLOP model and the network cannot disagree."""
    return config.adapter_in_channels


def _step_parts(config: PiDConfig, height: int, width: int, text_tokens: int, query_rows: int | None = None) -> dict:
    """FLOPs of one network call for one sample, adapter excluded, by part.

    query_rows: the patch rows whose tokens this process computes (a sequence-parallel
    band, pidkern.parallel); their queries still attend to the whole image, and the
    text stream is computed whole. None: every row."""
    D, Ly = config.hidden, text_tokens
    Hs, Ws = _grid(config, height, width)
    L = Hs * Ws
    Lq = L if query_rows is None else query_rows * Ws
    P2 = config.pixels_per_patch
    A, Dp = config.pixel_attn_dim, config.pixel_dim

    per_token = 2 * (3 * D * D + D * D + 3 * D * config.mlp_hidden)  # qkv, proj, SwiGLU
    patch_gemm = config.patch_blocks * ((Lq + Ly) * per_token + 2 * 2 * D * 6 * D)  # + adaLN img/txt
    patch_attn = config.patch_blocks * 4 * (Lq + Ly) * (L + Ly) * D

    pixel_gemm_block = (
        Lq * 2 * D * 6 * Dp * P2           # per-patch adaLN_modulation
        + Lq * 2 * P2 * Dp * A * 2         # compress_to_attn and expand_from_attn
        + Lq * 2 * (3 * A * A + A * A)     # qkv and proj
        + Lq * P2 * 2 * 2 * Dp * config.pixel_mlp_hidden  # per-pixel fc1 + fc2
    )
    pixel_gemm = config.pixel_blocks * pixel_gemm_block
    pixel_attn = config.pixel_blocks * 4 * Lq * L * A

    gate_out = 1 if config.is_v15 else D
    n_gates = config.num_lq_heads + (1 if config.is_v15 else 0)  # v1.5: pit_lq_gate
    gates = n_gates * Lq * 2 * 2 * D * gate_out

    pixels = Lq * P2                                    # this band's pixels
    embed = (Lq * 2 * 3 * P2 * D                       # s_embedder
             + 2 * (config.time_freq_dim * D + D * D)   # t_embedder
             + Ly * 2 * config.text_dim * D             # y_embedder
             + pixels * 2 * 3 * Dp                      # pixel_embedder
             + pixels * 2 * Dp * 3)                     # final_layer.linear
    return {"patch_gemm": patch_gemm, "patch_attention": patch_attn, "pixel_gemm": pixel_gemm,
            "pixel_attention": pixel_attn, "adapter_gates": gates, "embed_and_head": embed}


def _adapter_parts(config: PiDConfig, height: int, width: int) -> dict:
    Hs, Ws = _grid(config, height, width)
    L, Hd, D = Hs * Ws, config.adapter_width, config.hidden
    convs = L * 2 * 9 * Hd * (adapter_input_channels(config) + Hd * (1 + 2 * config.adapter_res_blocks))
    n_heads = config.num_lq_heads + (1 if config.is_v15 else 0)  # v1.5: pit_head
    heads = n_heads * L * 2 * Hd * D
    return {"adapter_convs": convs, "adapter_heads": heads}


def forward_flops(config: PiDConfig, batch: int, height: int, width: int, text_tokens: int | None = None) -> float:
    """FLOPs of one call of the network (adapter included) on a [batch, 3, height, width] image."""
    Ly = config.max_text if text_tokens is None else text_tokens
    parts = {**_step_parts(config, height, width, Ly), **_adapter_parts(config, height, width)}
    return float(batch * sum(parts.values()))


def decode_flops(config: PiDConfig, batch: int, height: int, width: int, steps: int = 4, *,
                 text_tokens: int | None = None, adapter_per_step: bool = False) -> dict:
    """FLOPs of a `steps`-step decode to `height x width`, with a breakdown.

    Returns total, per_step (one network call without the adapter), once (the adapter),
    attention (total in attention) and `breakdown`: each part summed over the decode.
    All numbers are FLOPs (not TFLOP) for the whole batch.
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    Ly = config.max_text if text_tokens is None else text_tokens
    step = {k: batch * v for k, v in _step_parts(config, height, width, Ly).items()}
    once = {k: batch * v for k, v in _adapter_parts(config, height, width).items()}
    adapter_runs = steps if adapter_per_step else 1
    breakdown = {k: v * steps for k, v in step.items()}
    breakdown.update({k: v * adapter_runs for k, v in once.items()})
    total = float(sum(breakdown.values()))
    attention = float(breakdown["patch_attention"] + breakdown["pixel_attention"])
    return {
        "total": total,
        "tflop": total / 1e12,
        "per_step": float(sum(step.values())),
        "once": float(sum(once.values())),
        "attention": attention,
        "attention_share": attention / total,
        "breakdown": {k: float(v) for k, v in breakdown.items()},
        "per_step_breakdown": {k: float(v) for k, v in step.items()},
        "steps": steps, "batch": batch, "height": height, "width": width,
        "text_tokens": Ly, "adapter_per_step": adapter_per_step,
    }


def tflops(flop: float, ms: float) -> float:
    """Achieved TFLOP/s of `flop` FLOPs done in `ms` milliseconds."""
    return flop / ms / 1e9 if ms > 0 else math.nan


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    *lead, s_q, d = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * math.prod(lead) * s_q * s_k * (d + d_v)


def flop_counter(display: bool = False):
    """torch.utils.flop_counter.FlopCounterMode that also counts the CPU SDPA kernel.

    PyTorch's registry knows the CUDA attention kernels only; on CPU, SDPA runs
    `_scaled_dot_product_flash_attention_for_cpu` and would count as zero.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _sdpa_flops
    return FlopCounterMode(display=display, custom_mapping=mapping)
