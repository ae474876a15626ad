// CUDA kernels of the fused optimizer step: one launch updates every tensor of one (device, dtype) bucket and
// advances its steps. They mirror the Triton kernels (fused_sched/backends/triton_kernels.py) table for table and
// the per-element math of csrc/include/fused_sched/optim_math.h operation for operation. No torch header: see
// optim_cuda.h for the tables and optim_cuda_torch.cpp for the glue.
//
// Numerics: the build passes --fmad=false, so a multiply and an add round on their own except in the explicit
// fmaf calls of MathOps<float>::fma; float32 division and sqrt are IEEE round-to-nearest (nvcc's defaults
// -prec-div=true -prec-sqrt=true; never build this with --use_fast_math). The float64 scalars (adam_coeffs,
// sgd_coeffs, schedules) use CUDA's double pow / cos / sqrt, and float32 -> bf16 / fp16 rounds to nearest even
// (or stochastically: optim_math.h bf16_bits_stochastic, for bfloat16 params that ask for it).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "fused_sched/adam_math.h"
#include "fused_sched/optim_math.h"
#include "fused_sched/sgd_math.h"
#include "fused_sched/schedule_math.h"
#include "optim_cuda.h"

namespace fused_sched::cuda {
namespace {

// Untuned (no GPU was available when these were chosen).
constexpr int kThreads = 256;     // threads per block
// Persistent blocks per SM: grid = min(n_chunks, SMs * kBlocksPerSm), and the kernels' __launch_bounds__ make
// sure that many fit (at most 128 registers a thread). ptxas (CUDA 13, -Xptxas -v) gives the Adam kernels 94-122
// registers and the SGD kernels 81-84, without spills; the 64-byte stack frame is the schedule evaluation's
// (per chunk, not per element). Capping them at 64 registers for 4 blocks (__launch_bounds__(kThreads, 4))
// spilled about 200 bytes in the bf16/fp16 Adam kernels (before master weights), so it was not done.
constexpr int kBlocksPerSm = 2;
// The norm pass reads one stream (the gradients) and needs few registers (32-62): more blocks per SM keep more
// loads in flight.
constexpr int kNormBlocksPerSm = 4;
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
// optim_cpu_kernels_impl.h): the param itself, or its float32 master copy (read and written in place of the
// param, which receives it rounded to nearest even); a bfloat16 param without a master is written with
// stochastic rounding when `stochastic` is set (kAllowStochastic: Adam only; SGD keeps no step to draw from).
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

// effective_hyper (optim_cpu.cpp) for one group: a copy of its hyper row with the values its schedule program sets
// at the scheduler's step in place of lr and beta1 (SGD: momentum), unless the row's flags have kLrFromTable /
// kMomentumFromTable.
__device__ __forceinline__ void load_effective_row(const double* hyper, int64_t group, const double* schedule,
                                                   int64_t segments, const double* schedule_step, bool adam,
                                                   double (&row)[kHyperColumns]) {
  const double* h = hyper + group * kHyperColumns;
#pragma unroll
  for (int k = 0; k < kHyperColumns; ++k) row[k] = h[k];
  if (schedule != nullptr) {
    double value[2] = {0.0, 0.0};
    const uint32_t set =
        evaluate_schedule(schedule + group * segments * kScheduleColumns, segments, *schedule_step, value);
    const uint32_t flags = hyper_flags(row);
    if ((set & (1u << kTargetLr)) && !(flags & kLrFromTable)) row[kLr] = value[kTargetLr];
    // Constant indices only: row[adam ? kBeta1 : kMomentum] made the whole row a local-memory array (64 bytes
    // of stack and 48/48 bytes of STL/LDL per step kernel on sm_80 and sm_90, bench/kernel_resources.py).
    if ((set & (1u << kTargetMomentum)) && !(flags & kMomentumFromTable)) {
      if (adam) {
        row[kBeta1] = value[kTargetMomentum];
      } else {
        row[kMomentum] = value[kTargetMomentum];
      }
    }
  }
}

struct KernelArgs {
  int64_t* table;  // written only by sgd_tables_kernel (fresh flags)
  const int64_t* chunks;
  const double* hyper;
  const double* schedule;
  const double* schedule_step;
  int32_t* counter;
  const float* grad_scale;  // StepOptions (optim_cuda.h), each may be nullptr
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
// then finished reading steps / fresh flags) advances the steps (Adam) or clears the fresh flags (SGD) with all
// its threads unless found_inf skipped the step, records in step_advance whether the step ran, then zeroes the
// counter for the next launch (or CUDA-graph replay).
template <bool kAdam>
__device__ __forceinline__ void finish(const KernelArgs& a, bool skipped) {
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
    for (int64_t r = threadIdx.x; r < a.n_rows; r += blockDim.x) {
      if constexpr (kAdam) {
        float* step = as_ptr<float>(a.table[r * kTableColumns + kColStep]);
        // torch keeps the step in float32 and adds 1 in float32.
        if (step != nullptr) *step = *step + 1.0f;
      } else {
        a.table[r * kTableColumns + kColStep] = 0;
      }
    }
  }
  if (threadIdx.x == 0) {
    // "A step ran since the schedulers last looked": set by a step that ran, left alone by a skipped one (the
    // bound scheduler clears it when it consumes it).
    if (a.step_advance != nullptr && !skipped) *a.step_advance = 1.0;
    *a.counter = 0;
  }
}

template <int N>
__device__ __forceinline__ void adam_elements(float (&p)[N], float (&g)[N], float (&m)[N], float (&v)[N],
                                              float (&vmax)[N], const AdamCoeffs<float>& c) {
#pragma unroll
  for (int i = 0; i < N; ++i) adam_element(p[i], g[i], m[i], v[i], vmax[i], c);
}

template <typename P>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) adam_tables_kernel(KernelArgs a) {
  using Bits = typename ParamTraits<P>::Bits;
  using Access = ParamAccess<P, /*kAllowStochastic=*/true>;
  using V = Vec<P>;
  constexpr int kN = V::kN;
  const bool skipped = step_skipped(a);
  const GradPrescale<float> pre = load_prescale(a);
  for (int64_t c = blockIdx.x; !skipped && c < a.n_chunks; c += gridDim.x) {
    const int64_t row_index = a.chunks[2 * c];
    const int64_t start = a.chunks[2 * c + 1];
    const int64_t* entry = a.table + row_index * kTableColumns;
    Access param{as_ptr<Bits>(entry[kColParam]), as_ptr<float>(entry[kColMaster]), false, 0u};
    Bits* const grad = as_ptr<Bits>(entry[kColGrad]);  // written back when prescaled (as torch's fused kernels do)
    float* const exp_avg = as_ptr<float>(entry[kColState0]);
    float* const exp_avg_sq = as_ptr<float>(entry[kColState1]);
    float* const max_exp_avg_sq = as_ptr<float>(entry[kColState2]);
    const float* const step_ptr = as_ptr<const float>(entry[kColStep]);
    const int64_t numel = entry[kColNumel];
    const int64_t group = entry[kColGroup];

    double row[kHyperColumns];
    load_effective_row(a.hyper, group, a.schedule, a.schedule_segments, a.schedule_step, /*adam=*/true, row);
    // The float32 step after torch's increment.
    const float new_step = *step_ptr + 1.0f;
    const AdamCoeffs<float> coeffs = adam_coeffs(row, static_cast<double>(new_step));
    if constexpr (Access::kCanRoundStochastically) {
      if ((coeffs.flags & kStochasticRounding) && param.master == nullptr) {
        param.stochastic = true;
        param.key = rounding_key(a.sr_seed, static_cast<uint32_t>(new_step),
                                 static_cast<uint32_t>(entry[kColParamId]));
      }
    }
    // A missing max_exp_avg_sq (the host cannot read the flags without a sync) leaves amsgrad's maximum over a
    // zero buffer, i.e. plain Adam; the Python side always passes it for amsgrad groups.
    const bool amsgrad = (coeffs.flags & kAmsgrad) && max_exp_avg_sq != nullptr;

    const int64_t end = start + a.chunk_elements < numel ? start + a.chunk_elements : numel;
    int64_t tail = start;
    if (aligned16(param.param + start) && aligned16(grad + start) && aligned16(exp_avg + start) &&
        aligned16(exp_avg_sq + start) && (!amsgrad || aligned16(max_exp_avg_sq + start)) &&
        (param.master == nullptr || aligned16(param.master + start))) {
      const int64_t n_vec = (end - start) / kN;
      for (int64_t j = threadIdx.x; j < n_vec; j += blockDim.x) {
        const int64_t i = start + j * kN;
        float p[kN], g[kN], m[kN], v[kN], vmax[kN];
        param.load(i, p);
        V::load(grad + i, g);
        load_floats(exp_avg + i, m);
        load_floats(exp_avg_sq + i, v);
        if (amsgrad) {
          load_floats(max_exp_avg_sq + i, vmax);
        } else {
#pragma unroll
          for (int k = 0; k < kN; ++k) vmax[k] = 0.0f;
        }
#pragma unroll
        for (int k = 0; k < kN; ++k) g[k] = prescale_grad(g[k], pre);
        if (pre.divide || pre.multiply) V::store(grad + i, g);
        adam_elements(p, g, m, v, vmax, coeffs);
        param.store(i, p);
        store_floats(exp_avg + i, m);
        store_floats(exp_avg_sq + i, v);
        if (amsgrad) store_floats(max_exp_avg_sq + i, vmax);
      }
      tail = start + n_vec * kN;
    }
    for (int64_t i = tail + threadIdx.x; i < end; i += blockDim.x) {
      float p = param.load_one(i);
      const float g = prescale_grad(ParamTraits<P>::to_float(grad[i]), pre);
      if (pre.divide || pre.multiply) grad[i] = ParamTraits<P>::from_float(g);
      float m = exp_avg[i], v = exp_avg_sq[i];
      float vmax = amsgrad ? max_exp_avg_sq[i] : 0.0f;
      adam_element(p, g, m, v, vmax, coeffs);
      param.store_one(i, p);
      exp_avg[i] = m;
      exp_avg_sq[i] = v;
      if (amsgrad) max_exp_avg_sq[i] = vmax;
    }
  }
  finish<true>(a, skipped);
}

template <typename P>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) sgd_tables_kernel(KernelArgs a) {
  using Bits = typename ParamTraits<P>::Bits;
  using Access = ParamAccess<P, /*kAllowStochastic=*/false>;
  using V = Vec<P>;
  constexpr int kN = V::kN;
  const bool skipped = step_skipped(a);
  const GradPrescale<float> pre = load_prescale(a);
  for (int64_t c = blockIdx.x; !skipped && c < a.n_chunks; c += gridDim.x) {
    const int64_t row_index = a.chunks[2 * c];
    const int64_t start = a.chunks[2 * c + 1];
    const int64_t* entry = a.table + row_index * kTableColumns;
    const Access param{as_ptr<Bits>(entry[kColParam]), as_ptr<float>(entry[kColMaster]), false, 0u};
    Bits* const grad = as_ptr<Bits>(entry[kColGrad]);  // written back when prescaled
    float* const buf_ptr = as_ptr<float>(entry[kColState0]);
    const bool fresh = entry[kColStep] != 0;
    const int64_t numel = entry[kColNumel];
    const int64_t group = entry[kColGroup];

    double row[kHyperColumns];
    load_effective_row(a.hyper, group, a.schedule, a.schedule_segments, a.schedule_step, /*adam=*/false, row);
    const SgdCoeffs<float> coeffs = sgd_coeffs(row);
    // With momentum the buffer is written, and read unless fresh. A missing buffer (the host cannot read the
    // momentum without a sync) acts as a fresh one that is not kept; the Python side always passes it.
    const bool write_buf = coeffs.has_momentum && buf_ptr != nullptr;
    const bool read_buf = write_buf && !fresh;
    const bool element_fresh = fresh || buf_ptr == nullptr;

    const int64_t end = start + a.chunk_elements < numel ? start + a.chunk_elements : numel;
    int64_t tail = start;
    if (aligned16(param.param + start) && aligned16(grad + start) && (!write_buf || aligned16(buf_ptr + start)) &&
        (param.master == nullptr || aligned16(param.master + start))) {
      const int64_t n_vec = (end - start) / kN;
      for (int64_t j = threadIdx.x; j < n_vec; j += blockDim.x) {
        const int64_t i = start + j * kN;
        float p[kN], g[kN], buf[kN];
        param.load(i, p);
        V::load(grad + i, g);
        if (read_buf) {
          load_floats(buf_ptr + i, buf);
        } else {
#pragma unroll
          for (int k = 0; k < kN; ++k) buf[k] = 0.0f;
        }
#pragma unroll
        for (int k = 0; k < kN; ++k) g[k] = prescale_grad(g[k], pre);
        if (pre.divide || pre.multiply) V::store(grad + i, g);
#pragma unroll
        for (int k = 0; k < kN; ++k) sgd_element(p[k], g[k], buf[k], element_fresh, coeffs);
        param.store(i, p);
        if (write_buf) store_floats(buf_ptr + i, buf);
      }
      tail = start + n_vec * kN;
    }
    for (int64_t i = tail + threadIdx.x; i < end; i += blockDim.x) {
      float p = param.load_one(i);
      const float g = prescale_grad(ParamTraits<P>::to_float(grad[i]), pre);
      if (pre.divide || pre.multiply) grad[i] = ParamTraits<P>::from_float(g);
      float buf = read_buf ? buf_ptr[i] : 0.0f;
      sgd_element(p, g, buf, element_fresh, coeffs);
      param.store_one(i, p);
      if (write_buf) buf_ptr[i] = buf;
    }
  }
  finish<false>(a, skipped);
}

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
// norm kernels and the CPU pass (optim_cpu.cpp norm_chunk); a general p raised in float64.
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
  // |g / scale| (optim_cpu.cpp norm_chunk: std::fabs(g / scale); without a scale nothing is divided).
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

// SM count of the current device, cached per device index (a benign race: every writer stores the same value).
cudaError_t grid_size(int64_t n_chunks, int blocks_per_sm, unsigned int* grid) {
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

cudaError_t check_args(const int64_t* table, int64_t n_rows, const int64_t* chunks, int64_t n_chunks,
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

template <bool kAdam>
cudaError_t launch(ParamDtype dtype, const KernelArgs& args, cudaStream_t stream) {
  unsigned int grid = 1;
  cudaError_t err = grid_size(args.n_chunks, kBlocksPerSm, &grid);
  if (err != cudaSuccess) return err;
  const bool known = dispatch_dtype(dtype, [&](auto tag) {
    using P = decltype(tag);
    if constexpr (kAdam) {
      adam_tables_kernel<P><<<grid, kThreads, 0, stream>>>(args);
    } else {
      sgd_tables_kernel<P><<<grid, kThreads, 0, stream>>>(args);
    }
  });
  if (!known) return cudaErrorInvalidValue;
  return cudaGetLastError();
}

KernelArgs make_args(int64_t* table, int64_t n_rows, const int64_t* chunks, int64_t n_chunks, int64_t chunk_elements,
                     const double* hyper, const double* schedule, int64_t segments, const double* schedule_step,
                     int32_t* counter, const StepOptions& options) {
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

}  // namespace

cudaError_t launch_adam_tables(ParamDtype param_dtype, const int64_t* table, int64_t n_rows, const int64_t* chunks,
                               int64_t n_chunks, int64_t chunk_elements, const double* hyper, const double* schedule,
                               int64_t schedule_segments, const double* schedule_step, int32_t* counter,
                               cudaStream_t stream, const StepOptions& options) {
  cudaError_t err = check_args(table, n_rows, chunks, n_chunks, chunk_elements, hyper, schedule, schedule_segments,
                               schedule_step, counter);
  if (err != cudaSuccess || n_rows == 0) return err;
  // The Adam kernel never writes the table (it writes the step tensors the table points to).
  return launch<true>(param_dtype,
                      make_args(const_cast<int64_t*>(table), n_rows, chunks, n_chunks, chunk_elements, hyper,
                                schedule, schedule_segments, schedule_step, counter, options),
                      stream);
}

cudaError_t launch_sgd_tables(ParamDtype param_dtype, int64_t* table, int64_t n_rows, const int64_t* chunks,
                              int64_t n_chunks, int64_t chunk_elements, const double* hyper, const double* schedule,
                              int64_t schedule_segments, const double* schedule_step, int32_t* counter,
                              cudaStream_t stream, const StepOptions& options) {
  cudaError_t err = check_args(table, n_rows, chunks, n_chunks, chunk_elements, hyper, schedule, schedule_segments,
                               schedule_step, counter);
  if (err != cudaSuccess || n_rows == 0) return err;
  StepOptions sgd_options = options;
  sgd_options.sr_seed = 0;  // SGD never rounds stochastically
  return launch<false>(param_dtype,
                       make_args(table, n_rows, chunks, n_chunks, chunk_elements, hyper, schedule,
                                 schedule_segments, schedule_step, counter, sgd_options),
                       stream);
}

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
