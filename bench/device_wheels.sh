#!/usr/bin/env bash
# The optional 8-bit libraries the GPU machine lacks, as Python 3.12 wheels in .whl/ (run
# here, where pip reaches an index; the device machine reaches none). Carry .whl with the
# run and install it there first, as bench/device_check.py's docstring shows. flash-attn
# publishes no wheels (it builds from source against one CUDA and torch): it is not fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
for spec in torchao==0.18.0 sageattention==1.0.6 nvidia-cudnn-frontend==1.32.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$spec"
done
ls -la .whl
