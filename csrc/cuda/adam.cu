// CUDA kernel of the fused Adam / AdamW step over one bucket's tables (kernel_common.cuh: the shared device
// code and numerics; launch_common.h: the tables).
#include <cuda_runtime.h>

#include <cstdint>

#include "adam.h"
#include "fused_sched/adam_math.h"
#include "kernel_common.cuh"
#include "state_format.cuh"

namespace fused_sched::cuda {
namespace {

template <int N>
__device__ __forceinline__ void adam_elements(float (&p)[N], float (&g)[N], float (&m)[N], float (&v)[N],
                                              float (&vmax)[N], const AdamCoeffs<float>& c) {
#pragma unroll
  for (int i = 0; i < N; ++i) adam_element(p[i], g[i], m[i], v[i], vmax[i], c);
}

// A row of another state format (docs/state_formats.md, state_format.cuh): its moments (kFormat) widened to
// float32, the unchanged adam_element, the results narrowed (bfloat16: to nearest even with kStateRoundNearest,
// else stochastically under state_rounding_key; 8-bit: each block's new absmax, then the codes); bfloat16 params
// with int16 remainders update the joined float32 master. 8-bit rows never have amsgrad (Python rejects it):
// their state2 is not read. `step` is the float32 step after its increment.
template <typename P, int64_t kFormat>
__device__ __forceinline__ void adam_formatted_chunk(const KernelArgs& a, const int64_t* entry, int64_t start,
                                                     const AdamCoeffs<float>& coeffs, const GradPrescale<float>& pre,
                                                     float step) {
  using Bits = typename ParamTraits<P>::Bits;
  constexpr bool k8bit = kFormat == kFormatBlockwise8bit;
  const int64_t numel = entry[kColNumel];
  const int64_t end = start + a.chunk_elements < numel ? start + a.chunk_elements : numel;
  const uint32_t key =
      rounding_key(a.sr_seed, static_cast<uint32_t>(step), static_cast<uint32_t>(entry[kColParamId]));
  const auto param = FormattedParam<P, true>::make(entry, (coeffs.flags & kStochasticRounding) != 0, key);
  Bits* const grad = as_ptr<Bits>(entry[kColGrad]);
  const float* table = nullptr;
  if constexpr (k8bit) table = stage_qmap(as_ptr<const float>(entry[kColQmap]));
  const bool nearest = (coeffs.flags & kStateRoundNearest) != 0;
  const auto m0 = moment_lane<kFormat>(entry, 0, table, nearest, state_rounding_key(key, 0));
  const auto m1 = moment_lane<kFormat>(entry, 1, table, nearest, state_rounding_key(key, 1));
  const auto m2 = moment_lane<kFormat>(entry, 2, table, nearest, state_rounding_key(key, 2));
  const bool amsgrad = !k8bit && (coeffs.flags & kAmsgrad) && entry[kColState2] != 0;
  const int lanes = k8bit ? lanes_per_block(entry) : 1;
  const bool aligned = param.aligned(start) && aligned16(grad + start) && m0.aligned(start) && m1.aligned(start) &&
                       (!amsgrad || m2.aligned(start));
  // The same trips for every thread of the block (8-bit rows shuffle).
  for (int64_t base = start; base < end; base += static_cast<int64_t>(blockDim.x) * kLaneElements) {
    const LaneSpan s = lane_span(base, end, aligned);
    float p[kLaneElements], g[kLaneElements], m[kLaneElements], v[kLaneElements], vmax[kLaneElements];
    param.load(s, p);
    load_grads<P>(grad, s, pre, g);
    m0.load(s, m);
    m1.load(s, v);
    if (amsgrad) {
      m2.load(s, vmax);
    } else {
#pragma unroll
      for (int k = 0; k < kLaneElements; ++k) vmax[k] = 0.0f;
    }
    adam_elements(p, g, m, v, vmax, coeffs);
    // The order of the stores only sets which values stay live (ptxas -v: the fewest registers this way).
    if constexpr (k8bit) {
      param.store(s, p);
      float am = lane_absmax(s, m), av = lane_absmax(s, v);
      group_absmax2(am, av, lanes);
      m0.quantize_store(s, m, am, lanes);
      m1.quantize_store(s, v, av, lanes);
    } else {
      m0.store(s, m);
      m1.store(s, v);
      if (amsgrad) m2.store(s, vmax);
      param.store(s, p);
    }
  }
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
    load_effective_row<kBeta1>(a.hyper, group, a.schedule, a.schedule_segments, a.schedule_step, row);
    // The float32 step after torch's increment.
    const float new_step = *step_ptr + 1.0f;
    const AdamCoeffs<float> coeffs = adam_coeffs(row, static_cast<double>(new_step));
    const int64_t format = entry[kColFormat];
    if (format != kFormatFloat32) {
      switch (state_format_of(format)) {
        case kFormatBFloat16: adam_formatted_chunk<P, kFormatBFloat16>(a, entry, start, coeffs, pre, new_step); break;
        case kFormatBlockwise8bit:
          adam_formatted_chunk<P, kFormatBlockwise8bit>(a, entry, start, coeffs, pre, new_step);
          break;
        default: adam_formatted_chunk<P, kFormatFloat32>(a, entry, start, coeffs, pre, new_step);  // remainders
      }
      continue;
    }
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
  finish(a, skipped, [&a](int64_t r) {
    float* step = as_ptr<float>(a.table[r * kTableColumns + kColStep]);
    // torch keeps the step in float32 and adds 1 in float32.
    if (step != nullptr) *step = *step + 1.0f;
  });
}

cudaError_t launch(ParamDtype dtype, const KernelArgs& args, cudaStream_t stream) {
  return launch_step(dtype, args.n_chunks, [&](auto tag, unsigned int grid) {
    adam_tables_kernel<decltype(tag)><<<grid, kThreads, 0, stream>>>(args);
  });
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
  return launch(param_dtype,
                make_args(const_cast<int64_t*>(table), n_rows, chunks, n_chunks, chunk_elements, hyper,
                          schedule, schedule_segments, schedule_step, counter, options),
                stream);
}

}  // namespace fused_sched::cuda
