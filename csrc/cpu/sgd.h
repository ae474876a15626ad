// The CPU implementation of fused_sched::sgd_step_ (sgd.cpp); StepOptions, `checked` and the schedule
// arguments are described in step_common.h.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "step_common.h"

namespace fused_sched::cpu {
void sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  const at::Tensor& hyper, at::IntArrayRef group_index, at::IntArrayRef fresh_buffers,
                  const std::optional<at::Tensor>& schedule, const std::optional<at::Tensor>& schedule_step,
                  const StepOptions& options, bool checked);
}  // namespace fused_sched::cpu
