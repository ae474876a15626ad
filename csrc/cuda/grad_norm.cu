// CUDA kernel of the norm pass of a fused clip over one bucket's tables (kernel_common.cuh: the shared device
// code; launch_common.h: the tables).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "fused_sched/optim_math.h"
#include "grad_norm.h"
#include "kernel_common.cuh"

namespace fused_sched::cuda {
namespace {

// The norm pass reads one stream (the gradients) and needs few registers (32-62): more blocks per SM keep more
// loads in flight.
constexpr int kNormBlocksPerSm = 4;

// ---- Norm pass of a fused clip (triton_kernels.grad_norm_kernel) ----

// Which |g|^p the pass accumulates (triton_kernels NORM_TWO, NORM_ONE, NORM_INF, NORM_P).
enum NormKind : int { kNormTwo = 0, kNormOne = 1, kNormInf = 2, kNormP = 3 };

struct NormArgs {
  const int64_t* table;
  const int64_t* chunks;
  double* partials;
  int32_t* counter;  // finalize only
  float* out;        // finalize only
  const float* grad_scale;
  int64_t n_chunks;
  int64_t chunk_elements;
  int64_t slot_offset;
  double norm_type;
  float max_norm;
  bool finalize;
};

// torch.maximum's NaN propagation (optim_math.h MathOps<float>::max), in float64.
__device__ __forceinline__ double nan_max(double a, double b) { return (a != a || a > b) ? a : b; }

template <int kKind>
__device__ __forceinline__ double combine(double a, double b) {
  if constexpr (kKind == kNormInf) {
    return nan_max(a, b);
  } else {
    return a + b;
  }
}

// One element's contribution, from its float32 magnitude: |g|^2 squared in float32 and |g| as is, like torch's
// norm kernels and the CPU pass (csrc/cpu/grad_norm_kernels.h norm_range); a general p raised in float64.
template <int kKind>
__device__ __forceinline__ double accumulate(double acc, float magnitude, double norm_type) {
  if constexpr (kKind == kNormInf) {
    return nan_max(acc, static_cast<double>(magnitude));
  } else if constexpr (kKind == kNormTwo) {
    return acc + static_cast<double>(magnitude * magnitude);
  } else if constexpr (kKind == kNormOne) {
    return acc + static_cast<double>(magnitude);
  } else {
    return acc + pow(static_cast<double>(magnitude), norm_type);
  }
}

// Block-wide combination in a fixed order (shuffle tree within each warp, then over the warps' results); the
// result is valid in thread 0.
template <int kKind>
__device__ __forceinline__ double block_combine(double v) {
  constexpr int kWarps = kThreads / 32;
  static_assert(kThreads % 32 == 0 && kWarps <= 32, "whole warps, at most 32 of them");
  __shared__ double warp_values[kWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = combine<kKind>(v, __shfl_down_sync(0xFFFFFFFFu, v, offset));
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  if (lane == 0) warp_values[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? warp_values[lane] : 0.0;  // 0: the identity of both the sum and the maximum of |g|
#pragma unroll
    for (int offset = kWarps / 2; offset > 0; offset >>= 1) {
      v = combine<kKind>(v, __shfl_down_sync(0xFFFFFFFFu, v, offset));
    }
  }
  return v;
}

template <typename P, int kKind>
__global__ void __launch_bounds__(kThreads, kNormBlocksPerSm) grad_norm_kernel(NormArgs a) {
  using Bits = typename ParamTraits<P>::Bits;
  using V = Vec<P>;
  constexpr int kN = V::kN;
  const bool divide = a.grad_scale != nullptr;
  const float scale = divide ? *a.grad_scale : 1.0f;
  const double norm_type = a.norm_type;
  // |g / scale| (csrc/cpu/grad_norm_kernels.h norm_range: std::fabs(g / scale); without a scale nothing is divided).
  auto magnitude = [divide, scale](float g) { return fabsf(divide ? g / scale : g); };
  double acc = 0.0;
  for (int64_t c = blockIdx.x; c < a.n_chunks; c += gridDim.x) {
    const int64_t row_index = a.chunks[2 * c];
    const int64_t start = a.chunks[2 * c + 1];
    const int64_t* entry = a.table + row_index * kTableColumns;
    const Bits* const grad = as_ptr<const Bits>(entry[kColGrad]);
    const int64_t numel = entry[kColNumel];
    if (grad == nullptr) continue;
    const int64_t end = start + a.chunk_elements < numel ? start + a.chunk_elements : numel;
    int64_t tail = start;
    if (aligned16(grad + start)) {
      const int64_t n_vec = (end - start) / kN;
      for (int64_t j = threadIdx.x; j < n_vec; j += blockDim.x) {
        float g[kN];
        V::load(grad + start + j * kN, g);
#pragma unroll
        for (int k = 0; k < kN; ++k) acc = accumulate<kKind>(acc, magnitude(g[k]), norm_type);
      }
      tail = start + n_vec * kN;
    }
    for (int64_t i = tail + threadIdx.x; i < end; i += blockDim.x) {
      acc = accumulate<kKind>(acc, magnitude(ParamTraits<P>::to_float(grad[i])), norm_type);
    }
  }
  acc = block_combine<kKind>(acc);
  if (threadIdx.x == 0) a.partials[a.slot_offset + blockIdx.x] = acc;
  if (!a.finalize) return;

  __shared__ int is_last;
  if (threadIdx.x == 0) {
    __threadfence();  // this block's partial precedes its ticket
    const int ticket = atomicAdd(a.counter, 1);
    is_last = ticket == static_cast<int>(gridDim.x) - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  // Every slot in index order: the whole block stages a tile of partials in shared memory (__ldcg: L2, never a
  // stale L1 line), thread 0 adds it up.
  __shared__ double tile[kThreads];
  const int64_t n_slots = a.slot_offset + gridDim.x;
  double total = 0.0;
  for (int64_t base = 0; base < n_slots; base += kThreads) {
    __syncthreads();  // the previous tile is consumed
    if (base + threadIdx.x < n_slots) tile[threadIdx.x] = __ldcg(a.partials + base + threadIdx.x);
    __syncthreads();
    if (threadIdx.x == 0) {
      const int count = n_slots - base < kThreads ? static_cast<int>(n_slots - base) : kThreads;
      for (int k = 0; k < count; ++k) total = combine<kKind>(total, tile[k]);
    }
  }
  if (threadIdx.x == 0) {
    const float norm = total_norm_from(total, norm_type);
    a.out[0] = norm;
    a.out[1] = clip_coefficient(norm, a.max_norm);
    *a.counter = 0;
  }
}

}  // namespace

cudaError_t grad_norm_slots(int64_t n_chunks, int64_t* slots) {
  if (n_chunks < 0 || slots == nullptr) return cudaErrorInvalidValue;
  unsigned int grid = 1;
  const cudaError_t err = grid_size(n_chunks, kNormBlocksPerSm, &grid);
  if (err == cudaSuccess) *slots = grid;
  return err;
}

cudaError_t launch_grad_norm_tables(ParamDtype grad_dtype, const int64_t* table, const int64_t* chunks,
                                    int64_t n_chunks, int64_t chunk_elements, double* partials, int64_t slot_offset,
                                    int32_t* counter, float* out, const float* grad_scale, double norm_type,
                                    float max_norm, bool finalize, int64_t* slots_used, cudaStream_t stream) {
  // !(norm_type > 0) also rejects NaN.
  if (n_chunks < 0 || chunk_elements <= 0 || slot_offset < 0 || partials == nullptr || !(norm_type > 0.0) ||
      (n_chunks > 0 && (table == nullptr || chunks == nullptr)) ||
      (finalize && (counter == nullptr || out == nullptr))) {
    return cudaErrorInvalidValue;
  }
  unsigned int grid = 1;
  cudaError_t err = grid_size(n_chunks, kNormBlocksPerSm, &grid);
  if (err != cudaSuccess) return err;
  NormArgs a;
  a.table = table;
  a.chunks = chunks;
  a.partials = partials;
  a.counter = counter;
  a.out = out;
  a.grad_scale = grad_scale;
  a.n_chunks = n_chunks;
  a.chunk_elements = chunk_elements;
  a.slot_offset = slot_offset;
  a.norm_type = norm_type;
  a.max_norm = max_norm;
  a.finalize = finalize;
  const int kind = norm_type == HUGE_VAL ? kNormInf : norm_type == 2.0 ? kNormTwo : norm_type == 1.0 ? kNormOne : kNormP;
  const bool known = dispatch_dtype(grad_dtype, [&](auto tag) {
    using P = decltype(tag);
    switch (kind) {
      case kNormTwo: grad_norm_kernel<P, kNormTwo><<<grid, kThreads, 0, stream>>>(a); break;
      case kNormOne: grad_norm_kernel<P, kNormOne><<<grid, kThreads, 0, stream>>>(a); break;
      case kNormInf: grad_norm_kernel<P, kNormInf><<<grid, kThreads, 0, stream>>>(a); break;
      default: grad_norm_kernel<P, kNormP><<<grid, kThreads, 0, stream>>>(a); break;
    }
  });
  if (!known) return cudaErrorInvalidValue;
  err = cudaGetLastError();
  if (err == cudaSuccess && slots_used != nullptr) *slots_used = grid;
  return err;
}

}  // namespace fused_sched::cuda
