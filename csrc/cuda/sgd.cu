// CUDA kernel of the fused SGD step over one bucket's tables (kernel_common.cuh: the shared device code and
// numerics; launch_common.h: the tables).
#include <cuda_runtime.h>

#include <cstdint>

#include "fused_sched/sgd_math.h"
#include "kernel_common.cuh"
#include "sgd.h"
#include "state_format.cuh"

namespace fused_sched::cuda {
namespace {

// A row of another state format (docs/state_formats.md, state_format.cuh): the momentum buffer (kFormat) widened
// to float32 (not read when fresh: the buffer becomes the gradient), the unchanged sgd_element, the buffer
// narrowed (bfloat16: to nearest even with kStateRoundNearest, else stochastically under the state_rounding_key of
// rounding_key(seed, step after its increment, param id), the step being the float32 one kColStep points to;
// 8-bit: each block's new absmax, then the codes); bfloat16 params with int16 remainders update the joined
// float32 master.
template <typename P, int64_t kFormat>
__device__ __forceinline__ void sgd_formatted_chunk(const KernelArgs& a, const int64_t* entry, int64_t start,
                                                    const SgdCoeffs<float>& coeffs, const GradPrescale<float>& pre) {
  using Bits = typename ParamTraits<P>::Bits;
  constexpr bool k8bit = kFormat == kFormatBlockwise8bit;
  const int64_t numel = entry[kColNumel];
  const int64_t end = start + a.chunk_elements < numel ? start + a.chunk_elements : numel;
  const auto param = FormattedParam<P, false>::make(entry, false, 0u);
  Bits* const grad = as_ptr<Bits>(entry[kColGrad]);
  const float* table = nullptr;
  if constexpr (k8bit) table = stage_qmap(as_ptr<const float>(entry[kColQmap]));
  uint32_t state_key = 0u;
  const bool nearest = (coeffs.flags & kStateRoundNearest) != 0;
  if constexpr (kFormat == kFormatBFloat16) {
    const float* step_ptr = as_ptr<const float>(entry[kColStep]);
    // Python gives every such row a step; a missing one keys the bits on step 1.
    const float new_step = (step_ptr != nullptr ? *step_ptr : 0.0f) + 1.0f;
    const uint32_t key =
        rounding_key(a.sr_seed, static_cast<uint32_t>(new_step), static_cast<uint32_t>(entry[kColParamId]));
    state_key = state_rounding_key(key, 0);
  }
  const auto buf_lane = moment_lane<kFormat>(entry, 0, table, nearest, state_key);
  const bool fresh = entry[kColFresh] != 0;
  const bool write_buf = coeffs.has_momentum && entry[kColState0] != 0;
  const bool read_buf = write_buf && !fresh;
  const bool element_fresh = fresh || entry[kColState0] == 0;
  const int lanes = k8bit ? lanes_per_block(entry) : 1;
  const bool aligned = param.aligned(start) && aligned16(grad + start) && (!write_buf || buf_lane.aligned(start));
  // The same trips for every thread of the block (8-bit rows shuffle).
  for (int64_t base = start; base < end; base += static_cast<int64_t>(blockDim.x) * kLaneElements) {
    const LaneSpan s = lane_span(base, end, aligned);
    float p[kLaneElements], g[kLaneElements], buf[kLaneElements];
    param.load(s, p);
    load_grads<P>(grad, s, pre, g);
    if (read_buf) {
      buf_lane.load(s, buf);
    } else {
#pragma unroll
      for (int k = 0; k < kLaneElements; ++k) buf[k] = 0.0f;
    }
#pragma unroll
    for (int k = 0; k < kLaneElements; ++k) sgd_element(p[k], g[k], buf[k], element_fresh, coeffs);
    param.store(s, p);
    if (write_buf) {  // the same for the whole block (one row)
      if constexpr (k8bit) {
        buf_lane.quantize_store(s, buf, group_absmax(lane_absmax(s, buf), lanes), lanes);
      } else {
        buf_lane.store(s, buf);
      }
    }
  }
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
    const bool fresh = entry[kColFresh] != 0;
    const int64_t numel = entry[kColNumel];
    const int64_t group = entry[kColGroup];

    double row[kHyperColumns];
    load_effective_row<kMomentum>(a.hyper, group, a.schedule, a.schedule_segments, a.schedule_step, row);
    const SgdCoeffs<float> coeffs = sgd_coeffs(row);
    const int64_t format = entry[kColFormat];
    if (format != kFormatFloat32) {
      switch (state_format_of(format)) {
        case kFormatBFloat16: sgd_formatted_chunk<P, kFormatBFloat16>(a, entry, start, coeffs, pre); break;
        case kFormatBlockwise8bit: sgd_formatted_chunk<P, kFormatBlockwise8bit>(a, entry, start, coeffs, pre); break;
        default: sgd_formatted_chunk<P, kFormatFloat32>(a, entry, start, coeffs, pre);  // remainders
      }
      continue;
    }
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
  finish(a, skipped, [&a](int64_t r) {
    int64_t* entry = a.table + r * kTableColumns;
    entry[kColFresh] = 0;
    float* step = as_ptr<float>(entry[kColStep]);  // bfloat16 momentum buffers rounded stochastically
    if (step != nullptr) *step = *step + 1.0f;
  });
}

cudaError_t launch(ParamDtype dtype, const KernelArgs& args, cudaStream_t stream) {
  return launch_step(dtype, args.n_chunks, [&](auto tag, unsigned int grid) {
    sgd_tables_kernel<decltype(tag)><<<grid, kThreads, 0, stream>>>(args);
  });
}

}  // namespace

cudaError_t launch_sgd_tables(ParamDtype param_dtype, int64_t* table, int64_t n_rows, const int64_t* chunks,
                              int64_t n_chunks, int64_t chunk_elements, const double* hyper, const double* schedule,
                              int64_t schedule_segments, const double* schedule_step, int32_t* counter,
                              cudaStream_t stream, const StepOptions& options) {
  cudaError_t err = check_args(table, n_rows, chunks, n_chunks, chunk_elements, hyper, schedule, schedule_segments,
                               schedule_step, counter);
  if (err != cudaSuccess || n_rows == 0) return err;
  return launch(param_dtype,
                make_args(table, n_rows, chunks, n_chunks, chunk_elements, hyper, schedule,
                          schedule_segments, schedule_step, counter, options),
                stream);
}

}  // namespace fused_sched::cuda
