// Interface between the torch binding and the torch-free CUDA kernels
// (output_stage_kernels.cu), so the kernels compile with nvcc alone.
#pragma once
#include <stdint.h>

namespace pk {

enum TokenType { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct OutputStageParams {
  const void* tokens;    // [B*L, P*P, 16], contiguous, 16-byte aligned
  int token_type;        // TokenType
  const float* norm_w;   // [16]
  const float* lin_w;    // [3, 16]
  const float* lin_b;    // [3]
  const float* x_t;      // [B, 3, H, W]
  const void* t;         // one float or double (t_is_double)
  const void* t_next;    // one float or double; null: 0 (the final variant)
  int t_is_double;
  const float* noise;    // [B, 3, H, W] or null
  const int64_t* seed;   // one value, used when noise is null and t_next != 0
  const int64_t* step;   // one value
  float* out;            // [B, 3, H, W]
  uint8_t* out_u8;       // [B, H, W, 3] or null
  int B, H, W, P;
  float eps;
  int vec;               // 1: W % 4 == 0 and x_t / noise / out 16-byte aligned
};

// Returns a cudaError_t as int (0: launched). stream: a cudaStream_t.
int launch_output_stage(const OutputStageParams& p, void* stream);
int launch_philox_normal(float* out, int64_t n, const int64_t* seed, const int64_t* step, void* stream);

}  // namespace pk
