// CUDA launchers of the fused optimizer step (csrc/cuda/optim_cuda.cu). Plain C++ over raw device pointers: this
// header includes no torch header, so the kernels compile (and are compile-checked by .ci/nvcc_check.sh) without
// a CUDA build of torch. The torch glue is csrc/cuda/optim_cuda_torch.cpp.
//
// The tables are those of the Triton backend (fused_sched/backends/triton_kernels.py), all on the device:
// * table: int64 [n_rows, 8], one row per tensor: param, grad, state0, state1, state2 addresses, column 5, numel,
//   param-group index. Adam: state0 = exp_avg, state1 = exp_avg_sq, state2 = max_exp_avg_sq (0 when absent),
//   column 5 = address of the float32 one-element step tensor. SGD: state0 = momentum_buffer (0 when absent),
//   column 5 = the "fresh buffer" flag (nonzero on the step that creates the buffer). An address is 0 for a
//   tensor of numel 0.
// * chunks: int64 [n_chunks, 2] of (row, start); a chunk covers [start, min(start + chunk_elements, numel)) of
//   its tensor (the chunk map of triton_kernels.build_chunks(numels, chunk_elements)).
// * hyper: float64 [groups, kHyperColumns] (optim_math.h).
// * schedule (optional, nullptr for none): float64 [groups, segments, kScheduleColumns] (schedule_math.h), with
//   schedule_step: float64 [1], the scheduler's step counter. A group's program overrides lr and beta1 (SGD:
//   momentum) exactly as effective_hyper in csrc/cpu/optim_cpu.cpp does.
// * counter: int32 [1], zero before the first launch; each launch leaves it zero. Launches sharing a counter
//   must not run concurrently (same stream, or otherwise ordered).
// After every block has finished its chunks, the last block advances every Adam step by 1 (float32) or clears
// every SGD fresh flag, so one launch is one complete optimizer step and the host reads nothing.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fused_sched::cuda {

enum class ParamDtype : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };

// Elements per chunk, the unit of work of a block. Untuned (no GPU was available); the Triton backend's
// DEFAULT_CHUNK.
constexpr int64_t kDefaultChunkElements = 65536;

// Returns cudaErrorInvalidValue for a bad argument (unknown dtype, chunk_elements <= 0, negative counts, a
// missing pointer), the launch error otherwise. Launches nothing when n_rows == 0.
cudaError_t launch_adam_tables(ParamDtype param_dtype, const int64_t* table, int64_t n_rows, const int64_t* chunks,
                               int64_t n_chunks, int64_t chunk_elements, const double* hyper, const double* schedule,
                               int64_t schedule_segments, const double* schedule_step, int32_t* counter,
                               cudaStream_t stream);

cudaError_t launch_sgd_tables(ParamDtype param_dtype, int64_t* table, int64_t n_rows, const int64_t* chunks,
                              int64_t n_chunks, int64_t chunk_elements, const double* hyper, const double* schedule,
                              int64_t schedule_segments, const double* schedule_step, int32_t* counter,
                              cudaStream_t stream);

}  // namespace fused_sched::cuda
