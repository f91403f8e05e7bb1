// Per-element math of the output stage, shared verbatim by the CPU (g++) and CUDA (nvcc)
// implementations so both give the same bits. No torch, no CUDA headers.
//
// Bit-equality between the two rests on: every float/double operation written out
// (no library transcendental: log, sin, cos are the polynomials below), no
// multiply-add contraction (g++ -ffp-contract=off, nvcc --fmad=false), IEEE division
// and square root (nvcc's defaults -prec-div=true -prec-sqrt=true), and the same
// summation order.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define PK_HD __host__ __device__ __forceinline__
#define PK_UNROLL _Pragma("unroll")
#else
#define PK_HD inline
#define PK_UNROLL
#endif

namespace pk {

constexpr int kChannels = 16;  // pixel token width Dp

PK_HD uint32_t f2u(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}

PK_HD float u2f(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

// ---- Philox4x32-10 (Salmon et al., SC'11), counter-based: no state between calls.
struct U4 {
  uint32_t x, y, z, w;
};

PK_HD void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  uint64_t p = (uint64_t)a * (uint64_t)b;
  hi = (uint32_t)(p >> 32);
  lo = (uint32_t)p;
}

PK_HD U4 philox4x32_10(U4 c, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(0xD2511F53u, c.x, hi0, lo0);
    mulhilo(0xCD9E8D57u, c.z, hi1, lo1);
    c = U4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
  }
  return c;
}

// Natural log on (0, 1] (fdlibm's logf reduction and polynomial, spelled out).
PK_HD float log_unit(float u) {
  uint32_t bits = f2u(u);
  int e = (int)(bits >> 23) - 127;
  float f = u2f((bits & 0x7FFFFFu) | 0x3F800000u);  // mantissa in [1, 2)
  if (f > 1.41421356f) {  // keep f - 1 small on both sides of 1
    f = f * 0.5f;
    e += 1;
  }
  f = f - 1.0f;
  float s = f / (2.0f + f);
  float z = s * s;
  float w = z * z;
  float r = z * (0.66666662693f + w * 0.28498786688f) + w * (0.40000972152f + w * 0.24279078841f);
  float hfsq = 0.5f * f * f;
  float fe = (float)e;
  return fe * 6.9313812256e-01f + (f - (hfsq - (s * (hfsq + r) + fe * 9.0580006145e-06f)));
}

// sin and cos of 2*pi*u for u in [0, 1): quadrant by rounding 4u, then Taylor on [-pi/4, pi/4].
PK_HD void sincos_2pi(float u, float& s, float& c) {
  float y = u * 4.0f;
  float q = (float)(int)(y + 0.5f);  // y >= 0, so this is round-half-up; quadrant only
  float r = y - q;                    // exact, in [-0.5, 0.5]
  float a = r * 1.57079632679f;
  float a2 = a * a;
  float sa = a + a * a2 * (-1.66666667e-1f + a2 * (8.33333333e-3f + a2 * (-1.98412698e-4f + a2 * 2.75573192e-6f)));
  float ca = 1.0f + a2 * (-0.5f + a2 * (4.16666667e-2f + a2 * (-1.38888889e-3f + a2 * (2.48015873e-5f + a2 * -2.75573192e-7f))));
  switch (((int)q) & 3) {
    case 0: s = sa; c = ca; break;
    case 1: s = ca; c = -sa; break;
    case 2: s = -sa; c = -ca; break;
    default: s = -ca; c = sa; break;
  }
}

// Four standard normals from counter `group` of the stream (seed, step). Element n of a
// noise tensor (flat, row-major) takes lane n % 4 of group n / 4.
PK_HD void normal4(uint64_t seed, uint64_t step, uint64_t group, float out[4]) {
  U4 r = philox4x32_10(U4{(uint32_t)group, (uint32_t)(group >> 32), (uint32_t)step, (uint32_t)(step >> 32)},
                       (uint32_t)seed, (uint32_t)(seed >> 32));
  const float k = 5.9604644775390625e-08f;  // 2^-24
  float u1 = (float)((r.x >> 8) + 1u) * k;  // (0, 1]: log stays finite
  float u2 = (float)(r.y >> 8) * k;         // [0, 1)
  float u3 = (float)((r.z >> 8) + 1u) * k;
  float u4 = (float)(r.w >> 8) * k;
  float rad1 = sqrtf(-2.0f * log_unit(u1));
  float rad2 = sqrtf(-2.0f * log_unit(u3));
  float s, c;
  sincos_2pi(u2, s, c);
  out[0] = rad1 * c;
  out[1] = rad1 * s;
  sincos_2pi(u4, s, c);
  out[2] = rad2 * c;
  out[3] = rad2 * s;
}

// RMSNorm(16) in float32, cast back to the token dtype (Round), times the weight, then
// Linear(16 -> 3) accumulated in float32. x: the 16 channels as float.
template <typename Round>
PK_HD void pixel_head(const float* x, const float* nw, const float* lw, const float* lb, float eps, Round round,
                      float v[3]) {
  float ss = 0.0f;
PK_UNROLL
  for (int k = 0; k < kChannels; ++k) ss = ss + x[k] * x[k];
  float inv = 1.0f / sqrtf(ss / (float)kChannels + eps);
  float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f;
PK_UNROLL
  for (int k = 0; k < kChannels; ++k) {
    float n = round(x[k] * inv) * nw[k];
    a0 = a0 + n * lw[k];
    a1 = a1 + n * lw[kChannels + k];
    a2 = a2 + n * lw[2 * kChannels + k];
  }
  v[0] = a0 + lb[0];
  v[1] = a1 + lb[1];
  v[2] = a2 + lb[2];
}

// The sampler update in float64 (the release's precision), rounded once to float32.
// t_next == 0 is the last step: the clean estimate clamped to [-1, 1].
PK_HD float sampler_update(float xt, float v, double t, double tn, float eps) {
  double x0 = (double)xt - t * (double)v;
  double r;
  if (tn == 0.0) {
    r = x0 < -1.0 ? -1.0 : (x0 > 1.0 ? 1.0 : x0);
  } else {
    r = (1.0 - tn) * x0 + tn * (double)eps;
  }
  return (float)r;
}

// uint8 value of a final pixel: round-half-to-even((x + 1) * 127.5) in float32, x already
// clamped. Same as ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).
PK_HD uint8_t to_u8(float x) {
  float y = (x + 1.0f) * 127.5f;
#if defined(__CUDA_ARCH__)
  float q = rintf(y);
#else
  // round half to even without relying on the host's rounding mode
  float fl = (float)(int)y;  // y >= 0: floor
  float d = y - fl;
  float q = d > 0.5f ? fl + 1.0f : (d < 0.5f ? fl : (((int)fl & 1) ? fl + 1.0f : fl));
#endif
  return (uint8_t)(int)q;
}

}  // namespace pk
