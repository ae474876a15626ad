// Launcher of the fused SGD step (sgd.cu); the tables and StepOptions: launch_common.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "launch_common.h"

namespace fused_sched::cuda {

// The table (launch_common.h) is written: the kernel's last block clears every row's fresh flag (kColFresh) and
// advances the float32 step that kColStep points to (bfloat16 momentum buffers rounded stochastically, with bits
// keyed on options.sr_seed, that step and the param id), unless found_inf skips the step.
cudaError_t launch_sgd_tables(ParamDtype param_dtype, int64_t* table, int64_t n_rows, const int64_t* chunks,
                              int64_t n_chunks, int64_t chunk_elements, const double* hyper, const double* schedule,
                              int64_t schedule_segments, const double* schedule_step, int32_t* counter,
                              cudaStream_t stream, const StepOptions& options = StepOptions{});

}  // namespace fused_sched::cuda
