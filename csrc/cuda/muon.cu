// CUDA kernels of the two elementwise passes of a Muon step over one bucket's tables (muon_math.h: the math and
// the passes; kernel_common.cuh: the shared device code and numerics; launch_common.h: the tables). The
// Newton-Schulz orthogonalization between the passes is batched matmuls in Python (fused_sched/optim/muon.py).
//
// Both passes walk a chunk in lanes of kLaneElements consecutive elements per thread (state_format.cuh LaneSpan):
// the bfloat16 workspace then moves in whole 16-byte vectors for every param dtype (8 elements: one uint4; the
// float32 params, gradients and momentum buffers in two), where a Vec<P> step of 4 float32 elements would leave
// 8-byte workspace accesses. A lane whose 8 elements do not all exist, or a chunk with a tensor that is not 16-byte
// aligned, moves element by element.
#include <cuda_runtime.h>

#include <cstdint>

#include "fused_sched/muon_math.h"
#include "kernel_common.cuh"
#include "muon.h"
#include "state_format.cuh"

namespace fused_sched::cuda {
namespace {

using WorkspaceBits = LaneBits<uint16_t>;
using Bf16 = ParamTraits<__nv_bfloat16>;

// The chunk a block works on: its table row, its element range and the row's hyper values with the schedule
// applied (momentum driven through kMomentum, as SGD's).
struct MuonChunk {
  const int64_t* entry;
  int64_t start;
  int64_t end;
  double row[kHyperColumns];
};

__device__ __forceinline__ void load_chunk(const KernelArgs& a, int64_t c, MuonChunk& k) {
  const int64_t row_index = a.chunks[2 * c];
  k.start = a.chunks[2 * c + 1];
  k.entry = a.table + row_index * kTableColumns;
  const int64_t numel = k.entry[kColNumel];
  k.end = k.start + a.chunk_elements < numel ? k.start + a.chunk_elements : numel;
  load_effective_row<kMomentum>(a.hyper, k.entry[kColGroup], a.schedule, a.schedule_segments, a.schedule_step,
                                k.row);
}

// Momentum pass (phase 0). No end-of-launch work: the buffers and workspaces are all it writes (no step, no
// step_advance: the update pass completes the step), so it takes no ticket and leaves the counter alone.
template <typename P>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) muon_momentum_kernel(KernelArgs a) {
  using Bits = typename ParamTraits<P>::Bits;
  if (step_skipped(a)) return;  // found_inf: nothing is written, not even the prescaled gradients
  const GradPrescale<float> pre = load_prescale(a);
  for (int64_t c = blockIdx.x; c < a.n_chunks; c += gridDim.x) {
    MuonChunk k;
    load_chunk(a, c, k);
    // The lr ratio belongs to the update pass: the momentum pass reads only the momentum and the flags.
    const MuonCoeffs<float> coeffs = muon_coeffs(k.row, 0.0);
    Bits* const grad = as_ptr<Bits>(k.entry[kColGrad]);  // written back when prescaled
    // A missing buffer (0; the Python side always passes one) acts as a zero buffer that is not kept, as in SGD:
    // the table op cannot check the table's contents without reading it back from the device.
    const MomentLane<kFormatFloat32> buf{as_ptr<uint32_t>(k.entry[kColState0])};
    const bool has_buf = buf.ptr != nullptr;
    uint16_t* const workspace = as_ptr<uint16_t>(k.entry[kColState1]);
    const bool aligned = aligned16(grad + k.start) && buf.aligned(k.start) && aligned16(workspace + k.start);
    for (int64_t base = k.start; base < k.end; base += static_cast<int64_t>(blockDim.x) * kLaneElements) {
      const LaneSpan s = lane_span(base, k.end, aligned);
      if (s.n <= 0) break;  // this thread's later lanes lie past the end too (no barrier in the loop)
      float g[kLaneElements], m[kLaneElements];
      uint32_t u[kLaneElements];
      load_grads<P>(grad, s, pre, g);
      if (has_buf) {
        buf.load(s, m);
      } else {
#pragma unroll
        for (int e = 0; e < kLaneElements; ++e) m[e] = 0.0f;
      }
      // The update rounded to nearest even (cvt.rn.bf16.f32, torch's CUDA .bfloat16()).
#pragma unroll
      for (int e = 0; e < kLaneElements; ++e) u[e] = Bf16::from_float(muon_momentum_element(g[e], m[e], coeffs));
      if (has_buf) buf.store(s, m);
      WorkspaceBits::store(workspace + s.i, s.n, s.vec, u);
    }
  }
}

// Update pass (phase 1): weight decay and the orthogonalized update, then step_advance (finish, kernel_common.cuh).
template <typename P>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) muon_update_kernel(KernelArgs a) {
  const bool skipped = step_skipped(a);
  for (int64_t c = blockIdx.x; !skipped && c < a.n_chunks; c += gridDim.x) {
    MuonChunk k;
    load_chunk(a, c, k);
    // Read once per chunk. A missing ratio (0; the Python side always passes one) reads as 1 rather than fault
    // the device: the table op cannot check the table without reading it back.
    const double* const ratio = as_ptr<const double>(k.entry[kColStep]);
    const MuonCoeffs<float> coeffs = muon_coeffs(k.row, ratio != nullptr ? *ratio : 1.0);
    // Muon rows have kColMaster = 0 and kColFormat = 0: the param itself, rounded to nearest even.
    const auto param = FormattedParam<P, /*kAllowStochastic=*/false>::make(k.entry, false, 0u);
    const uint16_t* const workspace = as_ptr<const uint16_t>(k.entry[kColState1]);
    const bool aligned = param.aligned(k.start) && aligned16(workspace + k.start);
    for (int64_t base = k.start; base < k.end; base += static_cast<int64_t>(blockDim.x) * kLaneElements) {
      const LaneSpan s = lane_span(base, k.end, aligned);
      if (s.n <= 0) break;
      float p[kLaneElements];
      uint32_t o[kLaneElements];
      param.load(s, p);
      WorkspaceBits::load(workspace + s.i, s.n, s.vec, o);
#pragma unroll
      for (int e = 0; e < kLaneElements; ++e) {
        muon_update_element(p[e], Bf16::to_float(static_cast<uint16_t>(o[e])), coeffs);
      }
      param.store(s, p);
    }
  }
  finish(a, skipped, [](int64_t) {});  // no per-row work: step_advance and the counter only
}

cudaError_t launch(ParamDtype dtype, int64_t phase, const KernelArgs& args, cudaStream_t stream) {
  return launch_step(dtype, args.n_chunks, [&](auto tag, unsigned int grid) {
    if (phase == kMuonMomentumPass) {
      muon_momentum_kernel<decltype(tag)><<<grid, kThreads, 0, stream>>>(args);
    } else {
      muon_update_kernel<decltype(tag)><<<grid, kThreads, 0, stream>>>(args);
    }
  });
}

}  // namespace

cudaError_t launch_muon_tables(ParamDtype param_dtype, const int64_t* table, int64_t n_rows, const int64_t* chunks,
                               int64_t n_chunks, int64_t chunk_elements, const double* hyper, const double* schedule,
                               int64_t schedule_segments, const double* schedule_step, int32_t* counter,
                               int64_t phase, cudaStream_t stream, const StepOptions& options) {
  if (phase != kMuonMomentumPass && phase != kMuonUpdatePass) return cudaErrorInvalidValue;
  cudaError_t err = check_args(table, n_rows, chunks, n_chunks, chunk_elements, hyper, schedule, schedule_segments,
                               schedule_step, counter);
  if (err != cudaSuccess || n_rows == 0) return err;
  StepOptions muon_options = options;
  muon_options.sr_seed = 0;  // Muon never rounds stochastically
  if (phase == kMuonMomentumPass) muon_options.step_advance = nullptr;  // the update pass completes the step
  // Neither kernel writes the table (only the tensors it points to).
  return launch(param_dtype, phase,
                make_args(const_cast<int64_t*>(table), n_rows, chunks, n_chunks, chunk_elements, hyper, schedule,
                          schedule_segments, schedule_step, counter, muon_options),
                stream);
}

}  // namespace fused_sched::cuda
