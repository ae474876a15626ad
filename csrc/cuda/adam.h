// Launcher of the fused Adam / AdamW step (adam.cu); the tables and StepOptions: launch_common.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "launch_common.h"

namespace fused_sched::cuda {

cudaError_t launch_adam_tables(ParamDtype param_dtype, const int64_t* table, int64_t n_rows, const int64_t* chunks,
                               int64_t n_chunks, int64_t chunk_elements, const double* hyper, const double* schedule,
                               int64_t schedule_segments, const double* schedule_step, int32_t* counter,
                               cudaStream_t stream, const StepOptions& options = StepOptions{});

}  // namespace fused_sched::cuda
