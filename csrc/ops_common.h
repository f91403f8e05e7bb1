// Argument checks shared by the CPU and CUDA implementations of the output-stage ops:
// both fill the same torch-free OutputStageParams.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "output_stage.h"

namespace pk {

inline void check_scalar(const at::Tensor& x, const char* name, const at::Tensor& like, bool integer) {
  TORCH_CHECK(x.numel() == 1, name, ": expected one element (a 0-d tensor), got shape ", x.sizes());
  TORCH_CHECK(x.device() == like.device(), name, ": expected a tensor on ", like.device(), " (a device tensor so ",
              "graph replays can change it), got ", x.device());
  if (integer) {
    TORCH_CHECK(x.scalar_type() == at::kLong, name, ": expected int64, got ", x.scalar_type());
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, name,
                ": expected float32 or float64, got ", x.scalar_type());
  }
}

struct Prepared {
  OutputStageParams p;
  at::Tensor tokens, norm_w, lin_w, lin_b, x_t, t, t_next, noise, out, out_u8;  // keep alive
};

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

// t_next undefined: the final variant (t_next = 0). want_u8: also allocate the image.
inline Prepared prepare(const at::Tensor& tokens, const at::Tensor& norm_w, const at::Tensor& lin_w,
                        const at::Tensor& lin_b, const at::Tensor& x_t, const at::Tensor& t,
                        const at::Tensor& t_next, const c10::optional<at::Tensor>& noise,
                        const c10::optional<at::Tensor>& seed, const c10::optional<at::Tensor>& step, int64_t patch,
                        double eps, bool want_u8) {
  Prepared r;
  TORCH_CHECK(x_t.dim() == 4 && x_t.size(1) == 3, "x_t: expected [B, 3, H, W], got ", x_t.sizes());
  TORCH_CHECK(x_t.scalar_type() == at::kFloat, "x_t: expected float32, got ", x_t.scalar_type());
  TORCH_CHECK(patch >= 1 && 12 * patch * patch <= 48 * 1024, "patch: expected 1..63, got ", patch);
  const int64_t B = x_t.size(0), H = x_t.size(2), W = x_t.size(3), P = patch;
  TORCH_CHECK(H % P == 0 && W % P == 0, "x_t: H and W must be multiples of patch=", P, ", got ", H, "x", W);
  const int64_t L = (H / P) * (W / P);
  TORCH_CHECK(tokens.dim() == 3 && tokens.size(0) == B * L && tokens.size(1) == P * P && tokens.size(2) == 16,
              "tokens: expected [B*L, P*P, 16] = [", B * L, ", ", P * P, ", 16], got ", tokens.sizes());
  const auto tt = tokens.scalar_type();
  TORCH_CHECK(tt == at::kFloat || tt == at::kHalf || tt == at::kBFloat16,
              "tokens: expected float32, float16 or bfloat16, got ", tt);
  TORCH_CHECK(norm_w.numel() == 16, "norm_w: expected [16], got ", norm_w.sizes());
  TORCH_CHECK(lin_w.dim() == 2 && lin_w.size(0) == 3 && lin_w.size(1) == 16, "lin_w: expected [3, 16], got ",
              lin_w.sizes());
  TORCH_CHECK(lin_b.numel() == 3, "lin_b: expected [3], got ", lin_b.sizes());
  for (const at::Tensor* w : {&tokens, &norm_w, &lin_w, &lin_b})
    TORCH_CHECK(w->device() == x_t.device(), "all tensors must be on ", x_t.device(), ", got one on ", w->device());
  check_scalar(t, "t", x_t, false);
  if (t_next.defined()) {
    check_scalar(t_next, "t_next", x_t, false);
    TORCH_CHECK(t_next.scalar_type() == t.scalar_type(), "t_next: expected the dtype of t (", t.scalar_type(),
                "), got ", t_next.scalar_type());
  }
  const bool has_noise = noise.has_value() && noise->defined();
  const bool has_seed = seed.has_value() && seed->defined();
  if (t_next.defined()) {
    TORCH_CHECK(has_noise != has_seed, "give exactly one noise source: noise=[B,3,H,W] or seed and step");
  }
  if (has_noise) {
    TORCH_CHECK(noise->sizes() == x_t.sizes() && noise->scalar_type() == at::kFloat,
                "noise: expected float32 ", x_t.sizes(), ", got ", noise->scalar_type(), " ", noise->sizes());
    TORCH_CHECK(noise->device() == x_t.device(), "noise: expected a tensor on ", x_t.device());
    r.noise = noise->contiguous();
  }
  if (has_seed) {
    TORCH_CHECK(step.has_value() && step->defined(), "step: required with seed");
    check_scalar(*seed, "seed", x_t, true);
    check_scalar(*step, "step", x_t, true);
  }

  r.tokens = tokens.contiguous();
  if (!aligned16(r.tokens.data_ptr())) r.tokens = r.tokens.clone();
  r.norm_w = norm_w.to(at::kFloat).contiguous();
  r.lin_w = lin_w.to(at::kFloat).contiguous();
  r.lin_b = lin_b.to(at::kFloat).contiguous();
  r.x_t = x_t.contiguous();
  r.t = t;
  r.t_next = t_next;
  r.out = at::empty({B, 3, H, W}, x_t.options());
  if (want_u8) r.out_u8 = at::empty({B, H, W, 3}, x_t.options().dtype(at::kByte));

  OutputStageParams& p = r.p;
  p.tokens = r.tokens.data_ptr();
  p.token_type = tt == at::kFloat ? kF32 : (tt == at::kHalf ? kF16 : kBF16);
  p.norm_w = r.norm_w.data_ptr<float>();
  p.lin_w = r.lin_w.data_ptr<float>();
  p.lin_b = r.lin_b.data_ptr<float>();
  p.x_t = r.x_t.data_ptr<float>();
  p.t = t.data_ptr();
  p.t_next = t_next.defined() ? t_next.data_ptr() : nullptr;
  p.t_is_double = t.scalar_type() == at::kDouble;
  p.noise = has_noise ? r.noise.data_ptr<float>() : nullptr;
  p.seed = has_seed ? seed->data_ptr<int64_t>() : nullptr;
  p.step = has_seed ? step->data_ptr<int64_t>() : nullptr;
  p.out = r.out.data_ptr<float>();
  p.out_u8 = want_u8 ? r.out_u8.data_ptr<uint8_t>() : nullptr;
  p.B = (int)B;
  p.H = (int)H;
  p.W = (int)W;
  p.P = (int)P;
  p.eps = (float)eps;
  p.vec = W % 4 == 0 && P % 4 == 0 && aligned16(p.x_t) && aligned16(p.out) && (!p.noise || aligned16(p.noise));
  return r;
}

}  // namespace pk
