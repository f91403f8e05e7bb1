"""The fused output stage (pixel head + fold + sampler update) and its PyTorch fallback.

`pixel_output_step` / `pixel_output_final` / `philox_normal` call the ops of the C++/CUDA
extension `pidkern._C` (`torch.ops.pidkern.*`) when it was built, and the same math in
plain PyTorch (the released chain of ops) when it was not. Fake implementations are
registered here so the ops trace under torch.compile; they never read t, t_next, seed
or step on the host, so they also replay in CUDA graphs with new values.

Noise: either an explicit `noise` tensor (e.g. from the release's torch.Generator
stream) or `seed`/`step` (int64 tensors on the op's device): then standard normals come
from a counter-based Philox4x32-10 stream, element n of the [B, 3, H, W] noise taking
lane n % 4 of counter (n // 4, step) under key seed, through Box-Muller. That stream is
NOT torch's (torch.randn with a Generator gives other numbers); it is the same on CPU,
CUDA and in the fallback below, bit for bit.

Rounding of the final image: uint8 = round-half-to-even((x + 1) * 127.5) in float32 of
the clamped float result x, i.e. `((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)`.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .reference import fold_patch_pixels, rms_norm
from .sampler import philox_key, sde_update

try:
    from pidkern import _C  # noqa: F401  (registers torch.ops.pidkern.*)
    HAS_EXT = True
except ImportError as e:  # not built (no compiler, no torch at build time, build failure)
    HAS_EXT = False
    warnings.warn(f"pidkern._C is not available ({e}); the output stage runs in PyTorch "
                  "(reinstall with `pip install --no-build-isolation -e .` to build it)", RuntimeWarning,
                  stacklevel=2)

__all__ = ["HAS_EXT", "pixel_output_step", "pixel_output_final", "philox_normal",
           "reference_output_step", "reference_output_final", "philox_normal_torch", "to_uint8"]


# ---------------------------------------------------------------- fake (meta) kernels
if HAS_EXT:
    @torch.library.register_fake("pidkern::pixel_output_step")
    def _step_fake(tokens, norm_w, lin_w, lin_b, x_t, t, t_next, noise=None, seed=None, step=None, patch=16,
                   eps=1e-6):
        return torch.empty_like(x_t, dtype=torch.float32, memory_format=torch.contiguous_format)

    @torch.library.register_fake("pidkern::pixel_output_final")
    def _final_fake(tokens, norm_w, lin_w, lin_b, x_t, t, patch=16, eps=1e-6):
        B, _, H, W = x_t.shape
        return (torch.empty_like(x_t, dtype=torch.float32, memory_format=torch.contiguous_format),
                x_t.new_empty((B, H, W, 3), dtype=torch.uint8))

    @torch.library.register_fake("pidkern::philox_normal")
    def _philox_fake(seed, step, size):
        return seed.new_empty(size, dtype=torch.float32)


# ---------------------------------------------------------------- PyTorch math
def _pixel_head(tokens, norm_w, lin_w, lin_b, eps):
    """FinalLayer in the tokens' dtype: RMSNorm(16), Linear(16 -> 3): [B*L, P2, 3]."""
    dt = tokens.dtype
    return F.linear(rms_norm(tokens, norm_w.to(dt), eps), lin_w.to(dt), lin_b.to(dt))


def _as_t(t, like):
    return t.to(like.device) if torch.is_tensor(t) else torch.tensor(float(t), dtype=torch.float64, device=like.device)


def reference_output_step(tokens, norm_w, lin_w, lin_b, x_t, t, t_next, noise, patch=16, eps=1e-6):
    """The released chain: head, fold, then the update in float64, rounded to float32."""
    B, _, H, W = x_t.shape
    v = fold_patch_pixels(_pixel_head(tokens, norm_w, lin_w, lin_b, eps), B, H, W, patch)
    tn = _as_t(t_next, x_t).double()
    x = sde_update(x_t, v, _as_t(t, x_t).double(), tn, noise)
    return torch.where(tn == 0, x.clamp(-1, 1), x)      # the last step's image is clamped here


def to_uint8(x):
    """The final image's rounding rule (half to even, in float32)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def reference_output_final(tokens, norm_w, lin_w, lin_b, x_t, t, patch=16, eps=1e-6):
    out = reference_output_step(tokens, norm_w, lin_w, lin_b, x_t, t, 0.0, torch.zeros_like(x_t), patch, eps)
    return out, to_uint8(out).permute(0, 2, 3, 1).contiguous()


_M = 0xFFFFFFFF


def _f32(c, like):
    return torch.tensor(c, dtype=torch.float32, device=like.device)


def _log_unit(u):
    bits = u.view(torch.int32)
    e = (bits >> 23) - 127
    f = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)
    big = f > _f32(1.41421356, f)
    f = torch.where(big, f * _f32(0.5, f), f)
    e = (e + big.to(torch.int32)).to(torch.float32)
    f = f - _f32(1.0, f)
    s = f / (_f32(2.0, f) + f)
    z = s * s
    w = z * z
    r = z * (_f32(0.66666662693, f) + w * _f32(0.28498786688, f)) + w * (_f32(0.40000972152, f) + w * _f32(0.24279078841, f))
    hfsq = _f32(0.5, f) * f * f
    return e * _f32(6.9313812256e-01, f) + (f - (hfsq - (s * (hfsq + r) + e * _f32(9.0580006145e-06, f))))


def _sincos_2pi(u):
    c_ = lambda v: _f32(v, u)  # noqa: E731
    y = u * c_(4.0)
    q = (y + c_(0.5)).to(torch.int32)
    r = y - q.to(torch.float32)
    a = r * c_(1.57079632679)
    a2 = a * a
    sa = a + a * a2 * (c_(-1.66666667e-1) + a2 * (c_(8.33333333e-3) + a2 * (c_(-1.98412698e-4) + a2 * c_(2.75573192e-6))))
    ca = c_(1.0) + a2 * (c_(-0.5) + a2 * (c_(4.16666667e-2) + a2 * (c_(-1.38888889e-3) + a2 * (
        c_(2.48015873e-5) + a2 * c_(-2.75573192e-7)))))
    k = q & 3
    s = torch.where(k == 0, sa, torch.where(k == 1, ca, torch.where(k == 2, -sa, -ca)))
    c = torch.where(k == 0, ca, torch.where(k == 1, -sa, torch.where(k == 2, -ca, sa)))
    return s, c


def philox_normal_torch(seed, step, size):
    """The extension's Philox/Box-Muller stream in PyTorch ops (same bits, slower)."""
    dev = seed.device
    n = 1
    for d in size:
        n *= int(d)
    seed, step = seed.reshape(()).to(torch.int64), step.reshape(()).to(torch.int64)
    g = torch.arange((n + 3) // 4, dtype=torch.int64, device=dev)
    c = [g & _M, (g >> 32) & _M, (step & _M).expand_as(g), ((step >> 32) & _M).expand_as(g)]
    k0, k1 = seed & _M, (seed >> 32) & _M
    for rnd in range(10):
        if rnd:
            k0, k1 = (k0 + 0x9E3779B9) & _M, (k1 + 0xBB67AE85) & _M
        p0, p1 = c[0] * 0xD2511F53, c[2] * 0xCD9E8D57  # wraps mod 2^64: low and high words survive
        c = [((p1 >> 32) & _M) ^ c[1] ^ k0, p1 & _M, ((p0 >> 32) & _M) ^ c[3] ^ k1, p0 & _M]
    k = _f32(5.9604644775390625e-08, g)
    u1 = ((c[0] >> 8) + 1).to(torch.float32) * k
    u2 = (c[1] >> 8).to(torch.float32) * k
    u3 = ((c[2] >> 8) + 1).to(torch.float32) * k
    u4 = (c[3] >> 8).to(torch.float32) * k
    m2 = _f32(-2.0, g)
    # torch's float32 sqrt is not correctly rounded on some CPUs (AVX-512); float64 then
    # float32 is (double rounding is harmless for sqrt), and so are the C++/CUDA sqrtf.
    r1 = torch.sqrt((m2 * _log_unit(u1)).double()).float()
    r2 = torch.sqrt((m2 * _log_unit(u3)).double()).float()
    s1, c1 = _sincos_2pi(u2)
    s2, c2 = _sincos_2pi(u4)
    z = torch.stack([r1 * c1, r1 * s1, r2 * c2, r2 * s2], dim=1).reshape(-1)[:n]
    return z.reshape(tuple(size))


# ---------------------------------------------------------------- public entry points
def philox_normal(seed: torch.Tensor, step: torch.Tensor, size) -> torch.Tensor:
    """The in-kernel noise stream as a tensor (float32, `size`, on seed's device)."""
    if HAS_EXT:
        return torch.ops.pidkern.philox_normal(seed, step, list(size))
    return philox_normal_torch(seed, step, size)


def pixel_output_step(tokens, norm_w, lin_w, lin_b, x_t, t, t_next, noise=None, seed=None, step=None, *,
                      patch: int = 16, eps: float = 1e-6, use_ext: bool | None = None) -> torch.Tensor:
    """x_next [B, 3, H, W] float32 from the pixel tokens [B*L, P*P, 16] of one step.

    t, t_next: 0-d float32/float64 tensors on x_t's device (Python floats work outside CUDA
    graphs); float64 gives exactly the release's update. Give `noise` or `seed` and `step`.
    """
    t, t_next = _as_t(t, x_t), _as_t(t_next, x_t)
    if use_ext if use_ext is not None else HAS_EXT:
        return torch.ops.pidkern.pixel_output_step(tokens, norm_w, lin_w, lin_b, x_t, t, t_next, noise, seed, step,
                                                   patch, eps)
    if noise is None:
        if seed is None or step is None:
            raise ValueError("give noise=[B,3,H,W] or seed and step")
        noise = philox_normal_torch(seed, step, x_t.shape)
    return reference_output_step(tokens, norm_w, lin_w, lin_b, x_t, t, t_next, noise, patch, eps)


def pixel_output_final(tokens, norm_w, lin_w, lin_b, x_t, t, *, patch: int = 16, eps: float = 1e-6,
                       use_ext: bool | None = None):
    """The last step (t_next = 0): (x0 clamped [B, 3, H, W] float32, image [B, H, W, 3] uint8)."""
    t = _as_t(t, x_t)
    if use_ext if use_ext is not None else HAS_EXT:
        return torch.ops.pidkern.pixel_output_final(tokens, norm_w, lin_w, lin_b, x_t, t, patch, eps)
    return reference_output_final(tokens, norm_w, lin_w, lin_b, x_t, t, patch, eps)


def philox_draws(seed: int | None, device):
    """draw(k, shape): the k-th standard normal tensor of the Philox stream of `seed` (the
    stream the output stage draws inside a graph, here one tensor at a time)."""
    key = philox_key(seed, device)
    return lambda k, shape: philox_normal(key, torch.tensor(k, dtype=torch.int64, device=device), shape)
