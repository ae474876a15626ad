// Launchers of the norm pass of a fused clip (grad_norm.cu); the tables: launch_common.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "launch_common.h"

namespace fused_sched::cuda {

// The norm pass of a fused clip_grad_norm_ over one bucket (triton_kernels.grad_norm_kernel): block b adds
// |g / grad_scale|^norm_type over its chunks' gradients (table column kColGrad, grad_dtype elements) and writes
// the sum at partials[slot_offset + b]; for norm_type = inf it writes the maximum of |g / grad_scale| instead.
// NaN propagates. |g|^2 is squared in float32 and summed in float64, |g|^1 summed in float64, any other p raised
// by pow() in float64. grad_scale may be nullptr (no division). Within a block the sum has a fixed order, so a
// given grid gives the same bits every time.
// *slots_used (when not nullptr) receives the grid size, which grad_norm_slots(n_chunks) gives in advance:
// partials must hold slot_offset + that many float64s. One launch per bucket, each with the slot_offset
// following the previous bucket's slots; the last one with finalize = true: its last block (a ticket on counter,
// which it leaves zero) combines partials[0 .. slot_offset + grid) in index order and writes
// out[0] = total_norm_from(combined, norm_type) (the total norm, float32) and
// out[1] = clip_coefficient(out[0], max_norm) (optim_math.h). Launches without finalize touch neither counter nor
// out (both may be nullptr). Launches one block even for n_chunks == 0 (its partial is 0).
cudaError_t launch_grad_norm_tables(ParamDtype grad_dtype, const int64_t* table, const int64_t* chunks,
                                    int64_t n_chunks, int64_t chunk_elements, double* partials, int64_t slot_offset,
                                    int32_t* counter, float* out, const float* grad_scale, double norm_type,
                                    float max_norm, bool finalize, int64_t* slots_used, cudaStream_t stream);

// The grid size (= partial slots) launch_grad_norm_tables uses for n_chunks chunks on the current device.
cudaError_t grad_norm_slots(int64_t n_chunks, int64_t* slots);

}  // namespace fused_sched::cuda
