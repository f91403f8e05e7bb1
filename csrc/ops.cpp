// pidkern._C: the schemas of the output-stage ops and their CPU implementation.
// The CPU code runs the same per-element math (pidkern_math.h) as the CUDA kernels,
// band by band, so CPU tests pin the CUDA results, in-kernel noise included.
// Built with -ffp-contract=off (see setup.py).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <vector>

#include "ops_common.h"
#include "pidkern_math.h"

// A plain extension module: the ops live in the dispatcher, nothing is bound here.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "pidkern C++/CUDA ops (see torch.ops.pidkern)", -1, nullptr};
  return PyModule_Create(&def);
}

namespace pk {
namespace {

template <typename T>
struct HostTok {
  static float load(const T& x) { return static_cast<float>(x); }
  float operator()(float x) const { return static_cast<float>(static_cast<T>(x)); }  // RNE, as on the GPU
};

double read_t(const void* p, int is_double) {
  if (!p) return 0.0;
  return is_double ? *static_cast<const double*>(p) : (double)*static_cast<const float*>(p);
}

template <typename T>
void run_cpu(const OutputStageParams& p) {
  const int P = p.P, P2 = P * P, W = p.W, Hs = p.H / P, Ws = p.W / P;
  const T* tokens = static_cast<const T*>(p.tokens);
  const double t = read_t(p.t, p.t_is_double), tn = read_t(p.t_next, p.t_is_double);
  const bool renoise = tn != 0.0;
  const uint64_t seed = p.noise || !renoise ? 0 : (uint64_t)*p.seed;
  const uint64_t step = p.noise || !renoise ? 0 : (uint64_t)*p.step;
  const int64_t HW = (int64_t)p.H * W;
  const HostTok<T> round;

  at::parallel_for(0, (int64_t)p.B * Hs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tile((size_t)3 * P * W);  // one band of P image rows
    for (int64_t band = begin; band < end; ++band) {
      const int b = (int)(band / Hs), hs = (int)(band % Hs);
      for (int ws = 0; ws < Ws; ++ws) {
        const T* src = tokens + (((int64_t)b * Hs + hs) * Ws + ws) * P2 * kChannels;
        for (int pp = 0; pp < P2; ++pp) {
          float x[kChannels], v[3];
          for (int k = 0; k < kChannels; ++k) x[k] = HostTok<T>::load(src[pp * kChannels + k]);
          pixel_head(x, p.norm_w, p.lin_w, p.lin_b, p.eps, round, v);
          const int i = pp / P, j = pp % P;
          for (int c = 0; c < 3; ++c) tile[((size_t)c * P + i) * W + ws * P + j] = v[c];
        }
      }
      for (int c = 0; c < 3; ++c) {
        for (int i = 0; i < P; ++i) {
          const int y = hs * P + i;
          const int64_t row = ((int64_t)b * 3 + c) * HW + (int64_t)y * W;
          uint64_t have = ~(uint64_t)0;
          float e4[4] = {0.f, 0.f, 0.f, 0.f};
          for (int x = 0; x < W; ++x) {
            const int64_t n = row + x;
            float e = 0.f;
            if (renoise) {
              if (p.noise) {
                e = p.noise[n];
              } else {
                if ((uint64_t)n >> 2 != have) {
                  have = (uint64_t)n >> 2;
                  normal4(seed, step, have, e4);
                }
                e = e4[n & 3];
              }
            }
            const float o = sampler_update(p.x_t[n], tile[((size_t)c * P + i) * W + x], t, tn, e);
            p.out[n] = o;
            if (p.out_u8) p.out_u8[(((int64_t)b * p.H + y) * W + x) * 3 + c] = to_u8(o);
          }
        }
      }
    }
  });
}

void dispatch_cpu(const OutputStageParams& p) {
  if (p.B == 0 || p.H == 0 || p.W == 0) return;
  switch (p.token_type) {
    case kF32: run_cpu<float>(p); break;
    case kF16: run_cpu<c10::Half>(p); break;
    default: run_cpu<c10::BFloat16>(p); break;
  }
}

at::Tensor step_cpu(const at::Tensor& tokens, const at::Tensor& norm_w, const at::Tensor& lin_w,
                    const at::Tensor& lin_b, const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& t_next,
                    const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& seed,
                    const c10::optional<at::Tensor>& step, int64_t patch, double eps) {
  Prepared r = prepare(tokens, norm_w, lin_w, lin_b, x_t, t, t_next, noise, seed, step, patch, eps, false);
  dispatch_cpu(r.p);
  return r.out;
}

std::tuple<at::Tensor, at::Tensor> final_cpu(const at::Tensor& tokens, const at::Tensor& norm_w,
                                             const at::Tensor& lin_w, const at::Tensor& lin_b, const at::Tensor& x_t,
                                             const at::Tensor& t, int64_t patch, double eps) {
  Prepared r = prepare(tokens, norm_w, lin_w, lin_b, x_t, t, at::Tensor(), c10::nullopt, c10::nullopt, c10::nullopt,
                       patch, eps, true);
  dispatch_cpu(r.p);
  return {r.out, r.out_u8};
}

at::Tensor philox_normal_cpu(const at::Tensor& seed, const at::Tensor& step, at::IntArrayRef size) {
  check_scalar(seed, "seed", seed, true);
  check_scalar(step, "step", seed, true);
  at::Tensor out = at::empty(size, seed.options().dtype(at::kFloat));
  const uint64_t s = (uint64_t)seed.item<int64_t>(), st = (uint64_t)step.item<int64_t>();
  float* o = out.data_ptr<float>();
  const int64_t n = out.numel();
  at::parallel_for(0, (n + 3) / 4, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      float e[4];
      normal4(s, st, (uint64_t)g, e);
      for (int k = 0; k < 4 && g * 4 + k < n; ++k) o[g * 4 + k] = e[k];
    }
  });
  return out;
}

}  // namespace
}  // namespace pk

TORCH_LIBRARY(pidkern, m) {
  m.def(
      "pixel_output_step(Tensor tokens, Tensor norm_w, Tensor lin_w, Tensor lin_b, Tensor x_t, Tensor t, "
      "Tensor t_next, Tensor? noise=None, Tensor? seed=None, Tensor? step=None, int patch=16, float eps=1e-6) "
      "-> Tensor");
  m.def(
      "pixel_output_final(Tensor tokens, Tensor norm_w, Tensor lin_w, Tensor lin_b, Tensor x_t, Tensor t, "
      "int patch=16, float eps=1e-6) -> (Tensor, Tensor)");
  m.def("philox_normal(Tensor seed, Tensor step, int[] size) -> Tensor");
}

TORCH_LIBRARY_IMPL(pidkern, CPU, m) {
  m.impl("pixel_output_step", &pk::step_cpu);
  m.impl("pixel_output_final", &pk::final_cpu);
  m.impl("philox_normal", &pk::philox_normal_cpu);
}
