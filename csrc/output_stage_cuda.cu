// CUDA implementation of the output-stage ops: argument checks (ops_common.h) and a
// launch of the torch-free kernels on the current stream. No host sync, no host read of
// t, t_next, seed or step, so the ops can be captured in CUDA graphs.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops_common.h"

namespace pk {
namespace {

void launch(const OutputStageParams& p) {
  const int err = launch_output_stage(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "pidkern output stage: CUDA launch failed: ", cudaGetErrorString((cudaError_t)err));
}

at::Tensor step_cuda(const at::Tensor& tokens, const at::Tensor& norm_w, const at::Tensor& lin_w,
                     const at::Tensor& lin_b, const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& t_next,
                     const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& seed,
                     const c10::optional<at::Tensor>& step, int64_t patch, double eps) {
  c10::cuda::CUDAGuard guard(x_t.device());
  Prepared r = prepare(tokens, norm_w, lin_w, lin_b, x_t, t, t_next, noise, seed, step, patch, eps, false);
  launch(r.p);
  return r.out;
}

std::tuple<at::Tensor, at::Tensor> final_cuda(const at::Tensor& tokens, const at::Tensor& norm_w,
                                              const at::Tensor& lin_w, const at::Tensor& lin_b,
                                              const at::Tensor& x_t, const at::Tensor& t, int64_t patch, double eps) {
  c10::cuda::CUDAGuard guard(x_t.device());
  Prepared r = prepare(tokens, norm_w, lin_w, lin_b, x_t, t, at::Tensor(), c10::nullopt, c10::nullopt, c10::nullopt,
                       patch, eps, true);
  launch(r.p);
  return {r.out, r.out_u8};
}

at::Tensor philox_normal_cuda(const at::Tensor& seed, const at::Tensor& step, at::IntArrayRef size) {
  c10::cuda::CUDAGuard guard(seed.device());
  check_scalar(seed, "seed", seed, true);
  check_scalar(step, "step", seed, true);
  at::Tensor out = at::empty(size, seed.options().dtype(at::kFloat));
  const int err = launch_philox_normal(out.data_ptr<float>(), out.numel(), seed.data_ptr<int64_t>(),
                                       step.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "pidkern philox_normal: CUDA launch failed: ", cudaGetErrorString((cudaError_t)err));
  return out;
}

}  // namespace
}  // namespace pk

TORCH_LIBRARY_IMPL(pidkern, CUDA, m) {
  m.impl("pixel_output_step", &pk::step_cuda);
  m.impl("pixel_output_final", &pk::final_cuda);
  m.impl("philox_normal", &pk::philox_normal_cuda);
}
