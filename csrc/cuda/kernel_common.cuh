// Device code and launch helpers shared by the CUDA kernels (adam.cu, sgd.cu, grad_norm.cu), each its own
// translation unit. The step kernels update every tensor of one (device, dtype) bucket in one launch and advance its
// steps. They mirror the Triton kernels (fused_sched/backends/triton/) table for table and the
// per-element math of csrc/include/fused_sched (optim_math.h, adam_math.h, sgd_math.h) operation for operation. No
// torch header: see launch_common.h for the tables and *_torch.cpp for the glue.
//
// Numerics: the build passes --fmad=false, so a multiply and an add round on their own except in the explicit
// fmaf calls of MathOps<float>::fma; float32 division and sqrt are IEEE round-to-nearest (nvcc's defaults
// -prec-div=true -prec-sqrt=true; never build this with --use_fast_math). The float64 scalars (adam_coeffs,
// sgd_coeffs, schedules) use CUDA's double pow / cos / sqrt, and float32 -> bf16 / fp16 rounds to nearest even
// (or stochastically: optim_math.h bf16_bits_stochastic, for bfloat16 params that ask for it).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "fused_sched/optim_math.h"
#include "fused_sched/schedule_math.h"
#include "launch_common.h"

namespace fused_sched::cuda {

// Untuned (no GPU was available when these were chosen).
constexpr int kThreads = 256;     // threads per block
// Persistent blocks per SM: grid = min(n_chunks, SMs * kBlocksPerSm), and the kernels' __launch_bounds__ make
// sure that many fit (at most 128 registers a thread). ptxas (CUDA 13, -Xptxas -v, sm_90) gives the Adam kernels
// 116-122 registers and the SGD kernels 92, without spills (96-122 and 90 before the state formats: the 8-element
// lanes of the formatted rows, state_format.cuh, set the float32 kernels' count now; occupancy is the grid's
// kBlocksPerSm either way); the 40-byte stack frame is the schedule evaluation's (per chunk, not per element).
// Capping them at 64 registers for 4 blocks (__launch_bounds__(kThreads, 4)) spilled about 200 bytes in the
// bf16/fp16 Adam kernels (before master weights), so it was not done.
constexpr int kBlocksPerSm = 2;
constexpr int kMaxCachedDevices = 64;

// Parameter storage as raw bits, converted to and from float32 (round to nearest even).
template <typename P>
struct ParamTraits;

template <>
struct ParamTraits<float> {
  using Bits = uint32_t;
  static __device__ __forceinline__ float to_float(Bits b) { return __uint_as_float(b); }
  static __device__ __forceinline__ Bits from_float(float f) { return __float_as_uint(f); }
};

template <>
struct ParamTraits<__half> {
  using Bits = uint16_t;
  static __device__ __forceinline__ float to_float(Bits b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ Bits from_float(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

template <>
struct ParamTraits<__nv_bfloat16> {
  using Bits = uint16_t;
  static __device__ __forceinline__ float to_float(Bits b) { return __bfloat162float(__ushort_as_bfloat16(b)); }
  static __device__ __forceinline__ Bits from_float(float f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
};

// The table's addresses reach the kernels as integers, so the compiler cannot prove they point into global memory
// and would emit generic ld.v4 / st.v4; __ldca / __stwb (the default cache policies: cache at all levels,
// write back) issue ld.global.ca.v4 / st.global.wb.v4 instead.
//
// One 16-byte vector of parameters: 4 floats or 8 halfs / bfloat16s (float32 states: kVec / 4 float4s).
template <typename P>
struct Vec {
  using Bits = typename ParamTraits<P>::Bits;
  static constexpr int kN = 16 / static_cast<int>(sizeof(Bits));
  static constexpr int kPerWord = 4 / static_cast<int>(sizeof(Bits));

  static __device__ __forceinline__ void load(const Bits* ptr, float (&out)[kN]) {
    const uint4 raw = __ldca(reinterpret_cast<const uint4*>(ptr));
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < kN; ++i) {
      const uint32_t w = words[i / kPerWord];
      const Bits b = kPerWord == 1 ? static_cast<Bits>(w)
                                   : static_cast<Bits>(w >> (16 * (i % kPerWord)));  // little endian
      out[i] = ParamTraits<P>::to_float(b);
    }
  }

  // to_bits(k, value): the storage bits of element k of the vector.
  template <typename ToBits>
  static __device__ __forceinline__ void store(Bits* ptr, const float (&in)[kN], ToBits&& to_bits) {
    uint32_t words[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int i = 0; i < kN; ++i) {
      const uint32_t b = static_cast<uint32_t>(to_bits(i, in[i]));
      words[i / kPerWord] |= kPerWord == 1 ? b : b << (16 * (i % kPerWord));
    }
    __stwb(reinterpret_cast<uint4*>(ptr), make_uint4(words[0], words[1], words[2], words[3]));
  }

  static __device__ __forceinline__ void store(Bits* ptr, const float (&in)[kN]) {
    store(ptr, in, [](int, float f) { return ParamTraits<P>::from_float(f); });
  }
};

template <int N>
__device__ __forceinline__ void load_floats(const float* ptr, float (&out)[N]) {
  static_assert(N % 4 == 0, "float4 pieces");
#pragma unroll
  for (int i = 0; i < N / 4; ++i) {
    const float4 f = __ldca(reinterpret_cast<const float4*>(ptr) + i);
    out[4 * i] = f.x;
    out[4 * i + 1] = f.y;
    out[4 * i + 2] = f.z;
    out[4 * i + 3] = f.w;
  }
}

template <int N>
__device__ __forceinline__ void store_floats(float* ptr, const float (&in)[N]) {
#pragma unroll
  for (int i = 0; i < N / 4; ++i) {
    __stwb(reinterpret_cast<float4*>(ptr) + i, make_float4(in[4 * i], in[4 * i + 1], in[4 * i + 2], in[4 * i + 3]));
  }
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T>
__device__ __forceinline__ T* as_ptr(int64_t address) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(address));
}

// Where a parameter's float32 value comes from and where the updated value goes (the CPU kernels' ParamAccess,
// csrc/cpu/kernel_common.h): the param itself, or its float32 master copy (read and written in place of the
// param, which receives it rounded to nearest even); a bfloat16 param without a master is written with
// stochastic rounding when `stochastic` is set (kAllowStochastic: Adam only; SGD writes its params to nearest).
template <typename P, bool kAllowStochastic>
struct ParamAccess {
  using Bits = typename ParamTraits<P>::Bits;
  using V = Vec<P>;
  static constexpr int kN = V::kN;
  static constexpr bool kCanRoundStochastically = kAllowStochastic && std::is_same<P, __nv_bfloat16>::value;

  Bits* param;
  float* master;    // nullptr without a master copy
  bool stochastic;  // only read when kCanRoundStochastically
  uint32_t key;     // rounding_key(seed, step, param id) when stochastic

  __device__ __forceinline__ void load(int64_t i, float (&p)[kN]) const {
    if (master != nullptr) {
      load_floats(master + i, p);
    } else {
      V::load(param + i, p);
    }
  }

  __device__ __forceinline__ void store(int64_t i, const float (&p)[kN]) const {
    if (master != nullptr) store_floats(master + i, p);
    if constexpr (kCanRoundStochastically) {
      if (stochastic) {
        const uint32_t k = key;
        V::store(param + i, p, [k, i](int j, float f) { return bf16_bits_stochastic(f, rounding_bits(k, i + j)); });
        return;
      }
    }
    V::store(param + i, p);
  }

  __device__ __forceinline__ float load_one(int64_t i) const {
    return master != nullptr ? master[i] : ParamTraits<P>::to_float(param[i]);
  }

  __device__ __forceinline__ void store_one(int64_t i, float f) const {
    if (master != nullptr) master[i] = f;
    if constexpr (kCanRoundStochastically) {
      if (stochastic) {
        param[i] = bf16_bits_stochastic(f, rounding_bits(key, i));
        return;
      }
    }
    param[i] = ParamTraits<P>::from_float(f);
  }
};

// effective_hyper (csrc/cpu/step_common.cpp) for one group: a copy of its hyper row with the values its schedule
// program sets at the scheduler's step in place of lr and of the kernel's momentum column (Adam: kBeta1, SGD:
// kMomentum), unless the row's flags have kLrFromTable / kMomentumFromTable.
template <int kMomentumColumn>
__device__ __forceinline__ void load_effective_row(const double* hyper, int64_t group, const double* schedule,
                                                   int64_t segments, const double* schedule_step,
                                                   double (&row)[kHyperColumns]) {
  static_assert(kMomentumColumn >= 0 && kMomentumColumn < kHyperColumns, "a column of the hyper row");
  const double* h = hyper + group * kHyperColumns;
#pragma unroll
  for (int k = 0; k < kHyperColumns; ++k) row[k] = h[k];
  if (schedule != nullptr) {
    double value[2] = {0.0, 0.0};
    const uint32_t set =
        evaluate_schedule(schedule + group * segments * kScheduleColumns, segments, *schedule_step, value);
    const uint32_t flags = hyper_flags(row);
    if ((set & (1u << kTargetLr)) && !(flags & kLrFromTable)) row[kLr] = value[kTargetLr];
    // A compile-time column: a run-time index (row[adam ? kBeta1 : kMomentum]) made the whole row a local-memory
    // array (64 bytes of stack and 48/48 bytes of STL/LDL per step kernel on sm_80 and sm_90,
    // bench/kernel_resources.py).
    if ((set & (1u << kTargetMomentum)) && !(flags & kMomentumFromTable)) row[kMomentumColumn] = value[kTargetMomentum];
  }
}

struct KernelArgs {
  int64_t* table;  // written only by sgd_tables_kernel (fresh flags; Adam writes the steps it points to)
  const int64_t* chunks;
  const double* hyper;
  const double* schedule;
  const double* schedule_step;
  int32_t* counter;
  const float* grad_scale;  // StepOptions (launch_common.h), each may be nullptr
  const float* found_inf;
  const float* clip_coef;
  double* step_advance;
  uint64_t sr_seed;
  int64_t n_rows;
  int64_t n_chunks;
  int64_t chunk_elements;
  int64_t schedule_segments;
};

// found_inf != 0 (NaN included, as in the CPU op's `!= 0.0f`): the whole launch is skipped.
__device__ __forceinline__ bool step_skipped(const KernelArgs& a) {
  return a.found_inf != nullptr && *a.found_inf != 0.0f;
}

// optim_math.h GradPrescale of this launch: read once per block.
__device__ __forceinline__ GradPrescale<float> load_prescale(const KernelArgs& a) {
  GradPrescale<float> s;
  s.divide = a.grad_scale != nullptr;
  s.multiply = a.clip_coef != nullptr;
  s.scale = s.divide ? *a.grad_scale : 1.0f;
  s.coef = s.multiply ? *a.clip_coef : 1.0f;
  return s;
}

// Takes this block's ticket once its chunks are done; the block holding the last one (every other block has
// then finished reading steps / fresh flags) runs end_row(r) on every table row with all its threads unless
// found_inf skipped the step (Adam advances the row's step, SGD clears its fresh flag and advances its step if it
// has one), records in step_advance whether the step ran, then zeroes the counter for the next launch (or
// CUDA-graph replay).
template <typename EndRow>
__device__ __forceinline__ void finish(const KernelArgs& a, bool skipped, EndRow&& end_row) {
  __shared__ int is_last;
  __syncthreads();  // every thread's reads of steps / flags precede the ticket
  if (threadIdx.x == 0) {
    __threadfence();
    const int ticket = atomicAdd(a.counter, 1);
    is_last = ticket == static_cast<int>(gridDim.x) - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  if (!skipped) {
    for (int64_t r = threadIdx.x; r < a.n_rows; r += blockDim.x) end_row(r);
  }
  if (threadIdx.x == 0) {
    // "A step ran since the schedulers last looked": set by a step that ran, left alone by a skipped one (the
    // bound scheduler clears it when it consumes it).
    if (a.step_advance != nullptr && !skipped) *a.step_advance = 1.0;
    *a.counter = 0;
  }
}

// SM count of the current device, cached per device index (a benign race: every writer stores the same value).
inline cudaError_t grid_size(int64_t n_chunks, int blocks_per_sm, unsigned int* grid) {
  static int sm_cache[kMaxCachedDevices] = {};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  int sms = device < kMaxCachedDevices ? __atomic_load_n(&sm_cache[device], __ATOMIC_RELAXED) : 0;
  if (sms <= 0) {
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return err;
    if (device < kMaxCachedDevices) __atomic_store_n(&sm_cache[device], sms, __ATOMIC_RELAXED);
  }
  const int64_t persistent = static_cast<int64_t>(sms) * blocks_per_sm;
  const int64_t blocks = n_chunks < persistent ? n_chunks : persistent;
  // At least one block even without chunks (a bucket of empty tensors): the steps must still advance.
  *grid = static_cast<unsigned int>(blocks > 1 ? blocks : 1);
  return cudaSuccess;
}

// Launches a step kernel on its persistent grid: launch_one(tag, grid) with a value of the element type of `dtype`
// runs `kernel<decltype(tag)><<<grid, kThreads, 0, stream>>>(args)` (the launch stays in the kernel's own source,
// where tests/cuda_host_emulation.py finds it).
template <typename LaunchOne>
cudaError_t launch_step(ParamDtype dtype, int64_t n_chunks, LaunchOne&& launch_one) {
  unsigned int grid = 1;
  cudaError_t err = grid_size(n_chunks, kBlocksPerSm, &grid);
  if (err != cudaSuccess) return err;
  const bool known = dispatch_dtype(dtype, [&](auto tag) { launch_one(tag, grid); });
  if (!known) return cudaErrorInvalidValue;
  return cudaGetLastError();
}

inline cudaError_t check_args(const int64_t* table, int64_t n_rows, const int64_t* chunks, int64_t n_chunks,
                              int64_t chunk_elements, const double* hyper, const double* schedule, int64_t segments,
                              const double* schedule_step, const int32_t* counter) {
  if (n_rows < 0 || n_chunks < 0 || chunk_elements <= 0 || table == nullptr || hyper == nullptr ||
      counter == nullptr || (n_chunks > 0 && chunks == nullptr) ||
      (schedule != nullptr && (segments < 0 || schedule_step == nullptr))) {
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

// Runs fn(tag) with a value of the element type of `dtype`; false for an unknown dtype.
template <typename Fn>
bool dispatch_dtype(ParamDtype dtype, Fn&& fn) {
  switch (dtype) {
    case ParamDtype::kFloat: fn(float{}); return true;
    case ParamDtype::kBFloat16: fn(__nv_bfloat16{}); return true;
    case ParamDtype::kHalf: fn(__half{}); return true;
  }
  return false;
}

inline KernelArgs make_args(int64_t* table, int64_t n_rows, const int64_t* chunks, int64_t n_chunks,
                            int64_t chunk_elements, const double* hyper, const double* schedule, int64_t segments,
                            const double* schedule_step, int32_t* counter, const StepOptions& options) {
  KernelArgs a;
  a.table = table;
  a.chunks = chunks;
  a.hyper = hyper;
  a.schedule = schedule;
  a.schedule_step = schedule_step;
  a.counter = counter;
  a.grad_scale = options.grad_scale;
  a.found_inf = options.found_inf;
  a.clip_coef = options.clip_coef;
  a.step_advance = options.step_advance;
  a.sr_seed = options.sr_seed;
  a.n_rows = n_rows;
  a.n_chunks = n_chunks;
  a.chunk_elements = chunk_elements;
  a.schedule_segments = schedule != nullptr ? segments : 0;
  return a;
}

}  // namespace fused_sched::cuda
