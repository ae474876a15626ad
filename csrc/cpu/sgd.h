// The CPU implementation of fused_sched::sgd_step_ (sgd.cpp); StepOptions, `checked` and the schedule
// arguments are described in step_common.h.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "step_common.h"

namespace fused_sched::cpu {
// steps: empty, or one per param: the float32 step (incremented by a step that runs) of a bfloat16 momentum
// buffer rounded stochastically, whose bits it keys with options.sr_seed and the param id; an empty tensor where
// there is none.
void sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, at::TensorList steps,
                  const at::Tensor& hyper, at::IntArrayRef group_index, at::IntArrayRef fresh_buffers,
                  const std::optional<at::Tensor>& schedule, const std::optional<at::Tensor>& schedule_step,
                  const StepOptions& options, bool checked);
}  // namespace fused_sched::cpu
