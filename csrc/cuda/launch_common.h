// What the CUDA launchers (adam.h, sgd.h, grad_norm.h; kernels in csrc/cuda/*.cu) share. Plain C++ over raw device
// pointers: these headers include no torch header, so the kernels compile (and are compile-checked by
// .ci/nvcc_check.sh) without a CUDA build of torch. The torch glue is csrc/cuda/*_torch.cpp.
//
// The tables are those of the Triton backend (fused_sched/backends/triton/), all on the device:
// * table: int64 [n_rows, kTableColumns] (optim_math.h TableColumn), one row per tensor: param, grad, state0,
//   state1, state2 addresses, kColStep, numel, param-group index, float32 master-copy address, param id, state
//   format, absmax0, absmax1, code table, SGD's fresh flag.
//   Adam: state0 = exp_avg, state1 = exp_avg_sq, state2 = max_exp_avg_sq (0 when absent), kColStep = address of
//   the float32 one-element step tensor. SGD: state0 = momentum_buffer (0 when absent), kColStep = address of
//   the float32 step of a bfloat16 buffer rounded stochastically (0 without), kColFresh = the "fresh buffer" flag
//   (nonzero on the step that creates the buffer). kColMaster: 0, or a float32 copy laid out like
//   the param, read and written in its place (the param receives it rounded to nearest even). kColParamId: the
//   param's index in the optimizer, which keys stochastic rounding's random bits. An address is 0 for a tensor
//   of numel 0.
//   The low-memory state formats (docs/state_formats.md, state_format_math.h; kernels in state_format.cuh):
//   kColFormat, a bit field per row: bits 0-1 the moments' format (0 float32, 1 bfloat16, 2 blockwise 8-bit
//   codes), bit 2 (kFormatMasterRemainder) kColMaster holding int16 remainders of a bfloat16 param instead of a
//   float32 master, bits 8-15 log2 of the 8-bit block size (32..256). kColAbsmax0 / kColAbsmax1: the float32
//   absmax per block of state0 / state1 (8-bit rows), kColQmap: the float32 [4, 256] code table (8-bit rows).
//   Rows of format 0 take the float32 path, unchanged; the others are handled per chunk by their own code. Adam:
//   bfloat16 moments are written stochastically (state_rounding_key) unless the group's flags have
//   kStateRoundNearest; 8-bit rows have no amsgrad (their state2 is not read). SGD: the bfloat16 buffer the same
//   way, keyed on the step kColStep points to. The list-taking ops (*_torch.cpp) pass float32 rows only.
// * chunks: int64 [n_chunks, 2] of (row, start); a chunk covers [start, min(start + chunk_elements, numel)) of
//   its tensor (the chunk map of triton_kernels.build_chunks(numels, chunk_elements)). With 8-bit rows,
//   chunk_elements must be a multiple of 256 (a block of the 8-bit states never straddles two chunks).
// * hyper: float64 [groups, kHyperColumns] (optim_math.h).
// * schedule (optional, nullptr for none): float64 [groups, segments, kScheduleColumns] (schedule_math.h), with
//   schedule_step: float64 [1], the scheduler's step counter. A group's program overrides lr and beta1 (SGD:
//   momentum) exactly as effective_hyper in csrc/cpu/step_common.cpp does.
// * counter: int32 [1], zero before the first launch; each launch leaves it zero. Launches sharing a counter
//   must not run concurrently (same stream, or otherwise ordered).
// After every block has finished its chunks, the last block advances every step by 1 (float32) and clears every
// SGD fresh flag, so one launch is one complete optimizer step and the host reads nothing.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fused_sched::cuda {

enum class ParamDtype : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };

// Elements per chunk, the unit of work of a block, in the list-taking ops (*_torch.cpp). Untuned (no GPU
// was available); the Triton backend's DEFAULT_CHUNK. The eager runner passes its own, which must stay equal
// (fused_sched/backends/cuda_backend.py CHUNK_ELEMENTS) for the compiled and the eager clip to agree to the bit.
constexpr int64_t kDefaultChunkElements = 65536;

// The large-model inputs of a step (csrc/cpu/step_common.h StepOptions), as device pointers; each may be nullptr.
// * grad_scale (float32 [1], GradScaler's scale): every gradient is divided by it.
// * found_inf (float32 [1]): when nonzero the launch changes nothing at all: no parameter, state or master is
//   written, steps are not advanced and SGD fresh flags are not cleared.
// * clip_coef (float32 [1], a fused clip_grad_norm_'s coefficient): every gradient is multiplied by it (after the
//   division by grad_scale).
// * step_advance (float64 [1], written by the last block): 0.0 when found_inf skipped the step, else 1.0.
// * sr_seed: the seed of stochastic rounding (Adam: bfloat16 params without a master copy whose group has
//   kStochasticRounding are written with optim_math.h bf16_bits_stochastic, bits from
//   rounding_key(sr_seed, step after its increment, param id) and rounding_bits(key, element index); Adam and SGD:
//   bfloat16 states, under state_rounding_key of that key).
// The pointers are read on the device (the host reads no device value), so a launch can be captured in a CUDA
// graph and replayed while the scale, found_inf and clip coefficient change.
struct StepOptions {
  const float* grad_scale = nullptr;
  const float* found_inf = nullptr;
  const float* clip_coef = nullptr;
  double* step_advance = nullptr;
  uint64_t sr_seed = 0;
};

// The step launchers (adam.h launch_adam_tables, sgd.h launch_sgd_tables):
// Returns cudaErrorInvalidValue for a bad argument (unknown dtype, chunk_elements <= 0, negative counts, a
// missing pointer), the launch error otherwise. Launches nothing when n_rows == 0 (step_advance is then not
// written either, as in the Triton launcher).

}  // namespace fused_sched::cuda
