// Launcher of the two elementwise passes of a Muon step (muon.cu; the math: fused_sched/muon_math.h); the tables
// and StepOptions: launch_common.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "launch_common.h"

namespace fused_sched::cuda {

// One pass of a Muon step over a bucket's tables. The table's rows: state0 = the float32 momentum buffer (0: a zero
// buffer that is not kept), state1 = the bfloat16 workspace laid out like the param, kColStep = the address of the
// param's float64 lr ratio (adjust_lr_fn), kColMaster = 0 and kColFormat = 0 (Muon has no master weights and no
// state formats).
// * phase 0 (kMuonMomentumPass): reads the gradients (prescaled and written back when grad_scale or clip_coef is
//   given), updates the momentum buffers and writes the update to orthogonalize into the workspaces.
//   options.step_advance is ignored: only the update pass completes a step.
// * phase 1 (kMuonUpdatePass): reads the orthogonalized update from the workspaces and updates the params; writes
//   step_advance. grad_scale and clip_coef are not read (no gradient is).
// found_inf != 0 skips either pass entirely. options.sr_seed is ignored (Muon never rounds stochastically).
// cudaErrorInvalidValue for a phase other than 0 or 1, and for the arguments launch_common.h lists.
cudaError_t launch_muon_tables(ParamDtype param_dtype, const int64_t* table, int64_t n_rows, const int64_t* chunks,
                               int64_t n_chunks, int64_t chunk_elements, const double* hyper, const double* schedule,
                               int64_t schedule_segments, const double* schedule_step, int32_t* counter,
                               int64_t phase, cudaStream_t stream, const StepOptions& options = StepOptions{});

}  // namespace fused_sched::cuda
