// CUDA kernels of the fused output stage. Plain CUDA (no torch headers) so CI can
// compile-check this file with nvcc alone; output_stage_cuda.cu is the torch binding.
//
// One block covers one patch-row band (P image rows) of one image, over a span of S
// patches. Phase 1 reads the span's tokens, which are one contiguous stretch of memory
// ([S, P*P, 16]), one pixel (16 channels) per thread, and leaves the three output values
// of each pixel in a shared-memory tile laid out as image rows. Phase 2 walks the tile
// row by row, four columns per thread, so x_t, noise and the outputs move as 16-byte
// accesses along full image rows.
//
// Compile with --fmad=false: pidkern_math.h must round exactly like the CPU twin.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "output_stage.h"
#include "pidkern_math.h"

namespace pk {
namespace {

constexpr int kThreads = 256;
constexpr int kPixPerThread = 4;  // token loads in flight per thread in phase 1

struct RoundF32 {
  __device__ float operator()(float x) const { return x; }
};
struct RoundF16 {
  __device__ float operator()(float x) const { return __half2float(__float2half_rn(x)); }
};
struct RoundBF16 {
  __device__ float operator()(float x) const { return __bfloat162float(__float2bfloat16_rn(x)); }
};

// Token loading is split into a raw 16-byte-vector load and a conversion, so a thread
// can put the loads of several pixels in flight before it needs any of them.
template <typename T>
struct Tok;

template <>
struct Tok<float> {
  using Round = RoundF32;
  struct Raw {
    float4 v[4];
  };
  __device__ static Raw load(const void* base, long long pix) {
    const float4* p = reinterpret_cast<const float4*>(base) + pix * 4;
    Raw r;
#pragma unroll
    for (int k = 0; k < 4; ++k) r.v[k] = __ldcs(p + k);
    return r;
  }
  __device__ static void convert(const Raw& r, float x[16]) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      x[4 * k] = r.v[k].x;
      x[4 * k + 1] = r.v[k].y;
      x[4 * k + 2] = r.v[k].z;
      x[4 * k + 3] = r.v[k].w;
    }
  }
};

struct Raw16 {
  uint4 v[2];
};

__device__ __forceinline__ Raw16 load16(const void* base, long long pix) {
  const uint4* p = reinterpret_cast<const uint4*>(base) + pix * 2;
  Raw16 r;
  r.v[0] = __ldcs(p);
  r.v[1] = __ldcs(p + 1);
  return r;
}

template <>
struct Tok<__half> {
  using Round = RoundF16;
  using Raw = Raw16;
  __device__ static Raw load(const void* base, long long pix) { return load16(base, pix); }
  __device__ static void convert(const Raw& r, float x[16]) {
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      uint32_t w[4] = {r.v[k].x, r.v[k].y, r.v[k].z, r.v[k].w};
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        __half2 h = *reinterpret_cast<const __half2*>(&w[m]);
        float2 f = __half22float2(h);
        x[8 * k + 2 * m] = f.x;
        x[8 * k + 2 * m + 1] = f.y;
      }
    }
  }
};

template <>
struct Tok<__nv_bfloat16> {
  using Round = RoundBF16;
  using Raw = Raw16;
  __device__ static Raw load(const void* base, long long pix) { return load16(base, pix); }
  __device__ static void convert(const Raw& r, float x[16]) {
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      uint32_t w[4] = {r.v[k].x, r.v[k].y, r.v[k].z, r.v[k].w};
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        x[8 * k + 2 * m] = __uint_as_float(w[m] << 16);  // little endian: low half first
        x[8 * k + 2 * m + 1] = __uint_as_float(w[m] & 0xFFFF0000u);
      }
    }
  }
};

__device__ __forceinline__ double read_t(const void* p, int is_double) {
  if (!p) return 0.0;
  return is_double ? *reinterpret_cast<const double*>(p) : (double)*reinterpret_cast<const float*>(p);
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads) output_stage_kernel(const OutputStageParams p, int span) {
  extern __shared__ float4 tile_raw[];  // float4: 16-byte aligned for the vector reads
  float* tile = reinterpret_cast<float*>(tile_raw);  // [3][P][span*P]: outputs as image rows
  const int P = p.P, P2 = P * P;
  const int Hs = p.H / P, Ws = p.W / P;
  const int ws0 = blockIdx.x * span, hs = blockIdx.y, b = blockIdx.z;
  const int nspan = min(span, Ws - ws0);
  const int stride = span * P;  // tile row length

  __shared__ float w_s[16 + 48 + 3];
  if (threadIdx.x < 16) w_s[threadIdx.x] = p.norm_w[threadIdx.x];
  if (threadIdx.x < 48) w_s[16 + threadIdx.x] = p.lin_w[threadIdx.x];
  if (threadIdx.x < 3) w_s[64 + threadIdx.x] = p.lin_b[threadIdx.x];
  __syncthreads();

  // Phase 1: tokens -> tile.
  const long long pix0 = ((long long)b * Hs * Ws + (long long)hs * Ws + ws0) * P2;
  const typename Tok<T>::Round round;
  const int npix = nspan * P2;
  for (int q0 = threadIdx.x; q0 < npix; q0 += kPixPerThread * kThreads) {
    typename Tok<T>::Raw raw[kPixPerThread];
#pragma unroll
    for (int u = 0; u < kPixPerThread; ++u)
      if (q0 + u * kThreads < npix) raw[u] = Tok<T>::load(p.tokens, pix0 + q0 + u * kThreads);
#pragma unroll
    for (int u = 0; u < kPixPerThread; ++u) {
      const int q = q0 + u * kThreads;
      if (q < npix) {
      float x[16], v[3];
      Tok<T>::convert(raw[u], x);
      pixel_head(x, w_s, w_s + 16, w_s + 64, p.eps, round, v);
      const int wl = q / P2, pp = q - wl * P2, i = pp / P, j = pp - i * P;
#pragma unroll
      for (int c = 0; c < 3; ++c) tile[(c * P + i) * stride + wl * P + j] = v[c];
      }
    }
  }
  __syncthreads();

  // Phase 2: tile + x_t (+ noise) -> rows of x_next (and of the uint8 image).
  const double t = read_t(p.t, p.t_is_double), tn = read_t(p.t_next, p.t_is_double);
  const bool renoise = tn != 0.0;
  const uint64_t seed = p.noise || !renoise ? 0 : (uint64_t)*p.seed;
  const uint64_t step = p.noise || !renoise ? 0 : (uint64_t)*p.step;
  const int width = nspan * P;
  const long long HW = (long long)p.H * p.W;
  const int y0 = hs * P, x0 = ws0 * P;

  if (VEC) {
    const int w4 = width / 4;
    for (int it = threadIdx.x; it < P * w4; it += kThreads) {
      const int i = it / w4, c4 = it - i * w4;
      const int y = y0 + i, x = x0 + 4 * c4;
      float o[3][4];
#pragma unroll
      for (int c = 0; c < 3; ++c) {
        const long long n = ((long long)(b * 3 + c)) * HW + (long long)y * p.W + x;
        const float4 vv = *reinterpret_cast<const float4*>(&tile[(c * P + i) * stride + 4 * c4]);
        const float4 xt = __ldcs(reinterpret_cast<const float4*>(p.x_t + n));
        float e[4] = {0.f, 0.f, 0.f, 0.f};
        if (renoise) {
          if (p.noise) {
            const float4 ee = __ldcs(reinterpret_cast<const float4*>(p.noise + n));
            e[0] = ee.x; e[1] = ee.y; e[2] = ee.z; e[3] = ee.w;
          } else {
            normal4(seed, step, (uint64_t)n >> 2, e);
          }
        }
        o[c][0] = sampler_update(xt.x, vv.x, t, tn, e[0]);
        o[c][1] = sampler_update(xt.y, vv.y, t, tn, e[1]);
        o[c][2] = sampler_update(xt.z, vv.z, t, tn, e[2]);
        o[c][3] = sampler_update(xt.w, vv.w, t, tn, e[3]);
        __stcs(reinterpret_cast<float4*>(p.out + n), make_float4(o[c][0], o[c][1], o[c][2], o[c][3]));
      }
      if (p.out_u8) {
        uint32_t w[3] = {0u, 0u, 0u};
#pragma unroll
        for (int k = 0; k < 12; ++k) w[k / 4] |= (uint32_t)to_u8(o[k % 3][k / 3]) << (8 * (k % 4));
        uint32_t* dst = reinterpret_cast<uint32_t*>(p.out_u8 + (((long long)b * p.H + y) * p.W + x) * 3);
        dst[0] = w[0];
        dst[1] = w[1];
        dst[2] = w[2];
      }
    }
  } else {
    for (int it = threadIdx.x; it < P * width; it += kThreads) {
      const int i = it / width, xl = it - i * width;
      const int y = y0 + i, x = x0 + xl;
#pragma unroll
      for (int c = 0; c < 3; ++c) {
        const long long n = ((long long)(b * 3 + c)) * HW + (long long)y * p.W + x;
        float e = 0.f;
        if (renoise) {
          if (p.noise) {
            e = p.noise[n];
          } else {
            float e4[4];
            normal4(seed, step, (uint64_t)n >> 2, e4);
            e = e4[n & 3];
          }
        }
        const float o = sampler_update(p.x_t[n], tile[(c * P + i) * stride + xl], t, tn, e);
        p.out[n] = o;
        if (p.out_u8) p.out_u8[(((long long)b * p.H + y) * p.W + x) * 3 + c] = to_u8(o);
      }
    }
  }
}

template <typename T>
int launch_typed(const OutputStageParams& p, cudaStream_t stream) {
  const int P2 = p.P * p.P, Hs = p.H / p.P, Ws = p.W / p.P;
  int span = 1024 / P2;  // about 1024 pixels per block
  if (span < 1) span = 1;
  if (span > Ws) span = Ws;
  const size_t smem = sizeof(float) * 3 * P2 * span;
  dim3 grid((Ws + span - 1) / span, Hs, p.B);
  if (p.vec)
    output_stage_kernel<T, true><<<grid, kThreads, smem, stream>>>(p, span);
  else
    output_stage_kernel<T, false><<<grid, kThreads, smem, stream>>>(p, span);
  return (int)cudaGetLastError();
}

__global__ void philox_normal_kernel(float* out, int64_t n, const int64_t* seed, const int64_t* step) {
  const int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (g * 4 >= n) return;
  float e[4];
  normal4((uint64_t)*seed, (uint64_t)*step, (uint64_t)g, e);
#pragma unroll
  for (int k = 0; k < 4; ++k)
    if (g * 4 + k < n) out[g * 4 + k] = e[k];
}

}  // namespace

int launch_output_stage(const OutputStageParams& p, void* stream) {
  if (p.B == 0 || p.H == 0 || p.W == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.token_type) {
    case kF32: return launch_typed<float>(p, s);
    case kF16: return launch_typed<__half>(p, s);
    case kBF16: return launch_typed<__nv_bfloat16>(p, s);
  }
  return (int)cudaErrorInvalidValue;
}

int launch_philox_normal(float* out, int64_t n, const int64_t* seed, const int64_t* step, void* stream) {
  if (n == 0) return 0;
  const int64_t groups = (n + 3) / 4;
  philox_normal_kernel<<<(unsigned)((groups + 255) / 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(out, n, seed,
                                                                                                         step);
  return (int)cudaGetLastError();
}

}  // namespace pk
