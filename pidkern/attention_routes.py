"""Attention through outside libraries, each one call after the fused QK-norm/RoPE prep.

Every route takes the prep's q, k, v [B, N, H, hd] (tokens, then heads, packed) and returns
[B, N, H*hd] in q's dtype, the softmax scale always 1/sqrt(hd) of the real head dim:

- "prep+flash": FA2, `flash_attn.flash_attn_func` (16-bit; takes [B, N, H, hd] as is);
- "prep+flash3-fp8": FA3 (Hopper), `flash_attn_interface.flash_attn_func` on e4m3 q, k, v
  with per-(batch, head) descale tensors;
- "prep+sage": SageAttention (`sageattention.sageattn`, INT8 QK^T, fp16 PV);
- "prep+cudnn-fp8": cuDNN's fp8 SDPA through the frontend (`import cudnn`), one graph
  built per shape and cached, per-tensor scales.

The libraries are imported when a route runs: a missing one raises an ImportError that names
the package, which the plan's race records as that candidate's failure. Head dims a library
does not take are zero-padded (exact: zero columns add nothing to q.k, and the padded output
columns, weighted sums of zeros, are sliced off). See docs/attention_fp8.md.
"""
from __future__ import annotations

import importlib
import math

import torch
import torch.nn.functional as F

from . import fp8, routes as R

# route -> (module to import, pip package), from the route table
LIBRARIES = {n: (r.library, R.LIBRARIES[r.library]) for n, r in R.TABLE["attention.patch"].items() if r.library}


def _import(route: str):
    module, package = LIBRARIES[route]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"attention backend {route!r} needs the {package!r} package (import {module}): "
                          f"{err}") from err


def importable(route: str) -> bool:
    """Whether the library of a library route imports here."""
    try:
        _import(route)
        return True
    except ImportError:
        return False


def available_attention_routes(device, precision: str = "fp8") -> tuple[str, ...]:
    """The attention routes worth racing on `device` (a device or a routes.DeviceSpec):
    precision "fp8" gives every 8-bit route whose capability rule it meets (the Triton
    modes, then each library route whose library imports), "native" the library routes
    of the bf16 race (FA2 where flash_attn imports). Off CUDA: ()."""
    if precision not in ("fp8", "native"):
        raise ValueError(f"precision={precision!r}: expected 'fp8' or 'native'")
    spec = device if isinstance(device, R.DeviceSpec) else R.DeviceSpec.of(device)
    if spec.type != "cuda":
        return ()
    if precision == "native":
        return tuple(n for n in R.race_candidates("attention.patch", "native", spec)
                     if R.TABLE["attention.patch"][n].library)
    return tuple(n for n, r in R.TABLE["attention.patch"].items()
                 if (r.accuracy != "exact" or r.library) and n != "prep+flash" and r.why_not(spec, "fp8") is None)


def _pad(x: torch.Tensor, hd: int) -> torch.Tensor:
    return x if x.shape[-1] == hd else F.pad(x, (0, hd - x.shape[-1]))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _check(q, k, v, route, dtypes=(torch.float16, torch.bfloat16)):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4 or t.shape != q.shape or t.dtype != q.dtype:
            raise ValueError(f"{route}: {name} must be [B, N, H, hd] like q {tuple(q.shape)} {q.dtype}, "
                             f"got {tuple(t.shape)} {t.dtype}")
    if q.dtype not in dtypes:
        raise ValueError(f"{route}: dtype {q.dtype} not supported; expected one of {dtypes}")


def _flat(o: torch.Tensor, hd: int, dtype) -> torch.Tensor:
    return o[..., :hd].to(dtype).reshape(o.shape[0], o.shape[1], -1)


def flash(q, k, v):
    """FA2: head dims up to 256 (it pads to a multiple of 8 itself), 16-bit inputs."""
    _check(q, k, v, "prep+flash")
    fa = _import("prep+flash")
    hd = q.shape[-1]
    o = fa.flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=1.0 / math.sqrt(hd), causal=False)
    return _flat(o, hd, q.dtype)


def flash3_fp8(q, k, v):
    """FA3 on e4m3 q, k, v (descale per (batch, head), as its interface takes); fp8 wants
    the head dim a multiple of 16, so 72 is padded to 80. Its fp8 output is bf16."""
    _check(q, k, v, "prep+flash3-fp8")
    fa3 = _import("prep+flash3-fp8")
    hd = q.shape[-1]
    hdp = _round_up(hd, 16)
    (q8, dq), (k8, dk), (v8, dv) = (fp8.quantize(_pad(t, hdp), (1, 3)) for t in (q, k, v))
    o = fa3.flash_attn_func(q8, k8, v8, softmax_scale=1.0 / math.sqrt(hd), causal=False,
                            q_descale=dq.flatten(1), k_descale=dk.flatten(1), v_descale=dv.flatten(1))
    if isinstance(o, tuple):   # some FA3 releases return (out, softmax_lse)
        o = o[0]
    return _flat(o, hd, q.dtype)


SAGE_HEAD_DIMS = (64, 96, 128)


def sage(q, k, v):
    """SageAttention 1.0.6: head dims 64, 96, 128 (72 padded to 96). It quantizes q, k to INT8
    itself (k smoothed by its mean over tokens, in place: k is the prep's own buffer)."""
    _check(q, k, v, "prep+sage", (torch.float16, torch.bfloat16, torch.float32))
    sa = _import("prep+sage")
    hd = q.shape[-1]
    hdp = next((d for d in SAGE_HEAD_DIMS if d >= hd), None)
    if hdp is None:
        raise ValueError(f"prep+sage: head dim {hd} is above SageAttention's largest, {SAGE_HEAD_DIMS[-1]}")
    q, k, v = (_pad(t, hdp).contiguous() for t in (q, k, v))
    o = sa.sageattn(q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=1.0 / math.sqrt(hd))
    return _flat(o, hd, q.dtype)


_CUDNN_GRAPHS: dict = {}
_CUDNN_FP8_OUT: dict = {}   # (shape, device, scale) -> whether the output must be e4m3


def _cudnn_graph(cudnn, shape, device, fp8_out: bool, scale: float):
    """One fp8 SDPA forward graph for q, k, v of `shape` [B, N, H, d] (viewed as
    [B, H, N, d] through strides), cached: building one takes milliseconds to seconds."""
    key = (tuple(shape), str(device), fp8_out, scale)
    if key in _CUDNN_GRAPHS:
        return _CUDNN_GRAPHS[key]
    B, N, H, d = shape
    dims, strides = [B, H, N, d], [N * H * d, d, H * d, 1]
    e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    handle = cudnn.create_handle()
    graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
    q, k, v = (graph.tensor(name=n, dim=dims, stride=strides, data_type=e4m3) for n in ("q", "k", "v"))
    names = ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")
    scalars = {n: graph.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32) for n in names}
    try:
        o, _, amax_s, amax_o = graph.sdpa_fp8(q=q, k=k, v=v, **scalars, generate_stats=False, attn_scale=scale,
                                              use_causal_mask=False)
    except TypeError:   # frontends before 1.11 name it is_inference
        o, _, amax_s, amax_o = graph.sdpa_fp8(q=q, k=k, v=v, **scalars, is_inference=True, attn_scale=scale,
                                              use_causal_mask=False)
    o.set_output(True).set_dim(dims).set_stride(strides).set_data_type(e4m3 if fp8_out else cudnn.data_type.BFLOAT16)
    for amax in (amax_s, amax_o):
        amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    workspace = torch.empty(graph.get_workspace_size(), device=device, dtype=torch.uint8)
    entry = (graph, handle, workspace, q, k, v, o, scalars, amax_s, amax_o)
    _CUDNN_GRAPHS[key] = entry
    return entry


# P = softmax probabilities <= 1, scaled by a power of two so the scale itself is exact
CUDNN_S_SCALE = 256.0


def cudnn_fp8(q, k, v):
    """cuDNN fp8 SDPA: per-tensor descales from the amax of q, k, v; P scaled by 256; the
    output in bf16 where the card's cuDNN allows it, else in e4m3 scaled so that |o| <= 224
    (o is a convex combination of v's rows, so |o| <= amax(v)). Head dim padded to a
    multiple of 16 (72 -> 80)."""
    _check(q, k, v, "prep+cudnn-fp8")
    cudnn = _import("prep+cudnn-fp8")
    B, N, H, hd = q.shape
    hdp = _round_up(hd, 16)
    scale = 1.0 / math.sqrt(hd)
    (q8, dq), (k8, dk), (v8, dv) = (fp8.quantize(_pad(t, hdp).contiguous(), (0, 1, 2, 3)) for t in (q, k, v))
    base = (tuple(q8.shape), str(q.device), scale)
    fp8_out = _CUDNN_FP8_OUT.get(base)
    if fp8_out is None:   # tried once per shape: a bf16 output first, else e4m3
        try:
            _cudnn_graph(cudnn, q8.shape, q.device, False, scale)
            fp8_out = False
        except Exception:  # noqa: BLE001 - Hopper's cuDNN (before 9.13) only writes an fp8 output
            _cudnn_graph(cudnn, q8.shape, q.device, True, scale)
            fp8_out = True
        _CUDNN_FP8_OUT[base] = fp8_out
    graph, handle, workspace, tq, tk, tv, to, sc, amax_s, amax_o = _cudnn_graph(cudnn, q8.shape, q.device, fp8_out,
                                                                                 scale)
    one = torch.ones(1, 1, 1, 1, device=q.device, dtype=torch.float32)
    scale_o = (fp8.E4M3_MAX / 2) / (dv * fp8.E4M3_MAX) if fp8_out else one      # 224 / amax(v)
    out = torch.empty(q8.shape, device=q.device, dtype=fp8.E4M3 if fp8_out else torch.bfloat16)
    pack = {tq: q8, tk: k8, tv: v8, to: out,
            sc["descale_q"]: dq.reshape(1, 1, 1, 1), sc["descale_k"]: dk.reshape(1, 1, 1, 1),
            sc["descale_v"]: dv.reshape(1, 1, 1, 1), sc["descale_s"]: one / CUDNN_S_SCALE,
            sc["scale_s"]: one * CUDNN_S_SCALE, sc["scale_o"]: scale_o.reshape(1, 1, 1, 1),
            amax_s: torch.empty_like(one), amax_o: torch.empty_like(one)}
    if q.is_cuda:
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
    graph.execute(pack, workspace, handle=handle)
    o = out.float() / scale_o if fp8_out else out
    return _flat(o, hd, q.dtype)


ROUTES = {"prep+flash": flash, "prep+flash3-fp8": flash3_fp8, "prep+sage": sage, "prep+cudnn-fp8": cudnn_fp8}
