#!/usr/bin/env bash
# Compile-check the torch-free CUDA kernels with nvcc alone (no torch, no GPU needed),
# for every target the project supports. Skips cleanly where nvcc is absent.
# The torch binding (output_stage_cuda.cu) needs torch's CUDA headers and is compiled
# only by the real build (setup.py).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$NVCC" ]; then
  echo "nvcc_check: no nvcc on PATH, skipping"
  exit 0
fi
"$NVCC" --version | tail -n 1
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
# every architecture family pidkern has configs for (docs/cards.md): A100, RTX 30xx, RTX 40xx,
# H100/H200, B200, RTX 50xx; nvcc 13 builds all six (it dropped sm_50-sm_72, not these)
for arch in 80 86 89 90 100 120; do
  for src in csrc/*_kernels.cu; do
    echo "nvcc sm_${arch}: ${src}"
    # the -D flags are the ones torch's CUDAExtension adds: the kernels must build under them
    "$NVCC" -std=c++17 -O3 --fmad=false -Werror all-warnings -Icsrc \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr \
      -gencode "arch=compute_${arch},code=sm_${arch}" -c "$src" -o "$out/$(basename "$src").sm_${arch}.o"
  done
done
echo "nvcc_check: ok"
