#!/usr/bin/env bash
# Compile-checks every CUDA kernel source for sm_80 and sm_90 with nvcc (no GPU needed). The kernels include no
# torch header, only CUDA's and csrc/include, so this works with a CPU build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || true)}
[ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc
shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [ -z "$NVCC" ]; then
  echo "nvcc not found: CUDA compile-check skipped"
  exit 0
fi
if [ ${#sources[@]} -eq 0 ]; then
  echo "no CUDA sources yet"
  exit 0
fi
out=$(mktemp -d)
for src in "${sources[@]}"; do
  echo "nvcc $src"
  "$NVCC" -std=c++17 -O3 -lineinfo --fmad=false -Icsrc/include \
    -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 \
    -c "$src" -o "$out/$(basename "$src").o"
done
