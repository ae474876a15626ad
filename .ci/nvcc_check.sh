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
trap 'rm -rf "$out"' EXIT
for src in "${sources[@]}"; do
  echo "nvcc $src"
  "$NVCC" -std=c++17 -O3 -lineinfo --fmad=false -Icsrc/include \
    -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_90,code=compute_90 \
    -c "$src" -o "$out/$(basename "$src").o"
done

# The torch glue (csrc/cuda/*_torch.cpp) is built only against a CUDA build of torch. A CPU build of torch
# ships every header it includes except c10/cuda/impl/cuda_cmake_macros.h, which torch's CUDA build generates (one
# macro, C10_CUDA_BUILD_SHARED_LIBS). With that one header stubbed, g++ -fsyntax-only type-checks the glue
# against the installed torch's headers and CUDA's. (An operator's schema is matched with its C++ signature when
# the library loads: only a CUDA build shows that, bench/gpu_check.sh.)
CXX=${CXX:-g++}
# CUDA's headers: $CUDA_HOME, else beside the real nvcc (it may be a wrapper script elsewhere), else the default.
cuda_include=""
for candidate in ${CUDA_HOME:+"$CUDA_HOME/include"} "$(dirname "$(dirname "$(readlink -f "$NVCC")")")/include" \
    /usr/local/cuda/include; do
  if [ -f "$candidate/cuda_runtime.h" ]; then cuda_include=$candidate; break; fi
done
if [ -z "$cuda_include" ]; then
  echo "CUDA headers not found (set CUDA_HOME): torch glue check skipped"
  exit 0
fi
torch_include=$(python -c "from torch.utils.cpp_extension import include_paths; print(' '.join(include_paths()))")
stub=$out/stub/c10/cuda/impl
mkdir -p "$stub"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$stub/cuda_cmake_macros.h"
includes=()
for dir in $torch_include; do includes+=(-isystem "$dir"); done
for glue in csrc/cuda/*_torch.cpp; do
  echo "g++ -fsyntax-only $glue (CPU torch headers + CUDA headers; one generated torch header stubbed)"
  "$CXX" -std=c++17 -fsyntax-only -Wall -Wextra -isystem "$out/stub" "${includes[@]}" -isystem "$cuda_include" \
    -Icsrc -Icsrc/include -Icsrc/cuda -DFUSED_SCHED_WITH_CUDA "$glue"
done
