// CUDA kernels of the fused optimizer step: one launch updates every tensor of one (device, dtype) bucket and
// advances its steps. They mirror the Triton kernels (fused_sched/backends/triton_kernels.py) table for table and
// the per-element math of csrc/include/fused_sched/optim_math.h operation for operation. No torch header: see
// optim_cuda.h for the tables and optim_cuda_torch.cpp for the glue.
//
// Numerics: the build passes --fmad=false, so a multiply and an add round on their own except in the explicit
// fmaf calls of MathOps<float>::fma; float32 division and sqrt are IEEE round-to-nearest (nvcc's defaults
// -prec-div=true -prec-sqrt=true; never build this with --use_fast_math). The float64 scalars (adam_coeffs,
// sgd_coeffs, schedules) use CUDA's double pow / cos / sqrt, and float32 -> bf16 / fp16 rounds to nearest even.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fused_sched/optim_math.h"
#include "fused_sched/schedule_math.h"
#include "optim_cuda.h"

namespace fused_sched::cuda {
namespace {

// Untuned (no GPU was available when these were chosen).
constexpr int kThreads = 256;     // threads per block
// Persistent blocks per SM: grid = min(n_chunks, SMs * kBlocksPerSm). ptxas (CUDA 13, -Xptxas -v) gives the
// Adam kernels about 104 registers (spills: none, or a few dozen bytes in the per-chunk float64 code), so 2 blocks
// of 256 threads fit an SM's 64K registers; capping them at 64 registers for 4 blocks
// (__launch_bounds__(kThreads, 4)) spilled about 200 bytes in the bf16/fp16 Adam kernels, so it was not done.
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

  static __device__ __forceinline__ void store(Bits* ptr, const float (&in)[kN]) {
    uint32_t words[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int i = 0; i < kN; ++i) {
      const uint32_t b = static_cast<uint32_t>(ParamTraits<P>::from_float(in[i]));
      words[i / kPerWord] |= kPerWord == 1 ? b : b << (16 * (i % kPerWord));
    }
    __stwb(reinterpret_cast<uint4*>(ptr), make_uint4(words[0], words[1], words[2], words[3]));
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

// effective_hyper (optim_cpu.cpp) for one group: a copy of its hyper row with the values its schedule program sets
// at the scheduler's step in place of lr and beta1 (SGD: momentum).
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
    if (set & (1u << kTargetLr)) row[kLr] = value[kTargetLr];
    if (set & (1u << kTargetMomentum)) row[adam ? kBeta1 : kMomentum] = value[kTargetMomentum];
  }
}

struct KernelArgs {
  int64_t* table;  // written only by sgd_tables_kernel (fresh flags)
  const int64_t* chunks;
  const double* hyper;
  const double* schedule;
  const double* schedule_step;
  int32_t* counter;
  int64_t n_rows;
  int64_t n_chunks;
  int64_t chunk_elements;
  int64_t schedule_segments;
};

// Takes this block's ticket once its chunks are done; the block holding the last one (every other block has
// then finished reading steps / fresh flags) advances the steps (Adam) or clears the fresh flags (SGD) with all
// its threads, then zeroes the counter for the next launch (or CUDA-graph replay).
template <bool kAdam>
__device__ __forceinline__ void finish(const KernelArgs& a) {
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
  for (int64_t r = threadIdx.x; r < a.n_rows; r += blockDim.x) {
    if constexpr (kAdam) {
      float* step = as_ptr<float>(a.table[r * 8 + 5]);
      // torch keeps the step in float32 and adds 1 in float32.
      if (step != nullptr) *step = *step + 1.0f;
    } else {
      a.table[r * 8 + 5] = 0;
    }
  }
  if (threadIdx.x == 0) *a.counter = 0;
}

template <int N>
__device__ __forceinline__ void adam_elements(float (&p)[N], float (&g)[N], float (&m)[N], float (&v)[N],
                                              float (&vmax)[N], const AdamCoeffs<float>& c) {
#pragma unroll
  for (int i = 0; i < N; ++i) adam_element(p[i], g[i], m[i], v[i], vmax[i], c);
}

template <typename P>
__global__ void __launch_bounds__(kThreads) adam_tables_kernel(KernelArgs a) {
  using Bits = typename ParamTraits<P>::Bits;
  using V = Vec<P>;
  constexpr int kN = V::kN;
  for (int64_t c = blockIdx.x; c < a.n_chunks; c += gridDim.x) {
    const int64_t row_index = a.chunks[2 * c];
    const int64_t start = a.chunks[2 * c + 1];
    const int64_t* entry = a.table + row_index * 8;
    Bits* const param = as_ptr<Bits>(entry[0]);
    const Bits* const grad = as_ptr<const Bits>(entry[1]);
    float* const exp_avg = as_ptr<float>(entry[2]);
    float* const exp_avg_sq = as_ptr<float>(entry[3]);
    float* const max_exp_avg_sq = as_ptr<float>(entry[4]);
    const float* const step_ptr = as_ptr<const float>(entry[5]);
    const int64_t numel = entry[6];
    const int64_t group = entry[7];

    double row[kHyperColumns];
    load_effective_row(a.hyper, group, a.schedule, a.schedule_segments, a.schedule_step, /*adam=*/true, row);
    // The float32 step after torch's increment, in float64.
    const double step = static_cast<double>(*step_ptr + 1.0f);
    const AdamCoeffs<float> coeffs = adam_coeffs(row, step);
    // A missing max_exp_avg_sq (the host cannot read the flags without a sync) leaves amsgrad's maximum over a
    // zero buffer, i.e. plain Adam; the Python side always passes it for amsgrad groups.
    const bool amsgrad = (coeffs.flags & kAmsgrad) && max_exp_avg_sq != nullptr;

    const int64_t end = start + a.chunk_elements < numel ? start + a.chunk_elements : numel;
    int64_t tail = start;
    if (aligned16(param + start) && aligned16(grad + start) && aligned16(exp_avg + start) &&
        aligned16(exp_avg_sq + start) && (!amsgrad || aligned16(max_exp_avg_sq + start))) {
      const int64_t n_vec = (end - start) / kN;
      for (int64_t j = threadIdx.x; j < n_vec; j += blockDim.x) {
        const int64_t i = start + j * kN;
        float p[kN], g[kN], m[kN], v[kN], vmax[kN];
        V::load(param + i, p);
        V::load(grad + i, g);
        load_floats(exp_avg + i, m);
        load_floats(exp_avg_sq + i, v);
        if (amsgrad) {
          load_floats(max_exp_avg_sq + i, vmax);
        } else {
#pragma unroll
          for (int k = 0; k < kN; ++k) vmax[k] = 0.0f;
        }
        adam_elements(p, g, m, v, vmax, coeffs);
        V::store(param + i, p);
        store_floats(exp_avg + i, m);
        store_floats(exp_avg_sq + i, v);
        if (amsgrad) store_floats(max_exp_avg_sq + i, vmax);
      }
      tail = start + n_vec * kN;
    }
    for (int64_t i = tail + threadIdx.x; i < end; i += blockDim.x) {
      float p = ParamTraits<P>::to_float(param[i]);
      float g = ParamTraits<P>::to_float(grad[i]);
      float m = exp_avg[i], v = exp_avg_sq[i];
      float vmax = amsgrad ? max_exp_avg_sq[i] : 0.0f;
      adam_element(p, g, m, v, vmax, coeffs);
      param[i] = ParamTraits<P>::from_float(p);
      exp_avg[i] = m;
      exp_avg_sq[i] = v;
      if (amsgrad) max_exp_avg_sq[i] = vmax;
    }
  }
  finish<true>(a);
}

template <typename P>
__global__ void __launch_bounds__(kThreads) sgd_tables_kernel(KernelArgs a) {
  using Bits = typename ParamTraits<P>::Bits;
  using V = Vec<P>;
  constexpr int kN = V::kN;
  for (int64_t c = blockIdx.x; c < a.n_chunks; c += gridDim.x) {
    const int64_t row_index = a.chunks[2 * c];
    const int64_t start = a.chunks[2 * c + 1];
    const int64_t* entry = a.table + row_index * 8;
    Bits* const param = as_ptr<Bits>(entry[0]);
    const Bits* const grad = as_ptr<const Bits>(entry[1]);
    float* const buf_ptr = as_ptr<float>(entry[2]);
    const bool fresh = entry[5] != 0;
    const int64_t numel = entry[6];
    const int64_t group = entry[7];

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
    if (aligned16(param + start) && aligned16(grad + start) && (!write_buf || aligned16(buf_ptr + start))) {
      const int64_t n_vec = (end - start) / kN;
      for (int64_t j = threadIdx.x; j < n_vec; j += blockDim.x) {
        const int64_t i = start + j * kN;
        float p[kN], g[kN], buf[kN];
        V::load(param + i, p);
        V::load(grad + i, g);
        if (read_buf) {
          load_floats(buf_ptr + i, buf);
        } else {
#pragma unroll
          for (int k = 0; k < kN; ++k) buf[k] = 0.0f;
        }
#pragma unroll
        for (int k = 0; k < kN; ++k) sgd_element(p[k], g[k], buf[k], element_fresh, coeffs);
        V::store(param + i, p);
        if (write_buf) store_floats(buf_ptr + i, buf);
      }
      tail = start + n_vec * kN;
    }
    for (int64_t i = tail + threadIdx.x; i < end; i += blockDim.x) {
      float p = ParamTraits<P>::to_float(param[i]);
      const float g = ParamTraits<P>::to_float(grad[i]);
      float buf = read_buf ? buf_ptr[i] : 0.0f;
      sgd_element(p, g, buf, element_fresh, coeffs);
      param[i] = ParamTraits<P>::from_float(p);
      if (write_buf) buf_ptr[i] = buf;
    }
  }
  finish<false>(a);
}

// SM count of the current device, cached per device index (a benign race: every writer stores the same value).
cudaError_t grid_size(int64_t n_chunks, unsigned int* grid) {
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
  const int64_t persistent = static_cast<int64_t>(sms) * kBlocksPerSm;
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

template <bool kAdam>
cudaError_t launch(ParamDtype dtype, const KernelArgs& args, cudaStream_t stream) {
  unsigned int grid = 1;
  cudaError_t err = grid_size(args.n_chunks, &grid);
  if (err != cudaSuccess) return err;
  auto run = [&](auto tag) {
    using P = decltype(tag);
    if constexpr (kAdam) {
      adam_tables_kernel<P><<<grid, kThreads, 0, stream>>>(args);
    } else {
      sgd_tables_kernel<P><<<grid, kThreads, 0, stream>>>(args);
    }
  };
  switch (dtype) {
    case ParamDtype::kFloat: run(float{}); break;
    case ParamDtype::kBFloat16: run(__nv_bfloat16{}); break;
    case ParamDtype::kHalf: run(__half{}); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

KernelArgs make_args(int64_t* table, int64_t n_rows, const int64_t* chunks, int64_t n_chunks, int64_t chunk_elements,
                     const double* hyper, const double* schedule, int64_t segments, const double* schedule_step,
                     int32_t* counter) {
  KernelArgs a;
  a.table = table;
  a.chunks = chunks;
  a.hyper = hyper;
  a.schedule = schedule;
  a.schedule_step = schedule_step;
  a.counter = counter;
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
                               cudaStream_t stream) {
  cudaError_t err = check_args(table, n_rows, chunks, n_chunks, chunk_elements, hyper, schedule, schedule_segments,
                               schedule_step, counter);
  if (err != cudaSuccess || n_rows == 0) return err;
  // The Adam kernel never writes the table (it writes the step tensors the table points to).
  return launch<true>(param_dtype,
                      make_args(const_cast<int64_t*>(table), n_rows, chunks, n_chunks, chunk_elements, hyper,
                                schedule, schedule_segments, schedule_step, counter),
                      stream);
}

cudaError_t launch_sgd_tables(ParamDtype param_dtype, int64_t* table, int64_t n_rows, const int64_t* chunks,
                              int64_t n_chunks, int64_t chunk_elements, const double* hyper, const double* schedule,
                              int64_t schedule_segments, const double* schedule_step, int32_t* counter,
                              cudaStream_t stream) {
  cudaError_t err = check_args(table, n_rows, chunks, n_chunks, chunk_elements, hyper, schedule, schedule_segments,
                               schedule_step, counter);
  if (err != cudaSuccess || n_rows == 0) return err;
  return launch<false>(param_dtype,
                       make_args(table, n_rows, chunks, n_chunks, chunk_elements, hyper, schedule,
                                 schedule_segments, schedule_step, counter),
                       stream);
}

}  // namespace fused_sched::cuda
