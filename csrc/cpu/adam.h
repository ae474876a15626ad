// The CPU implementation of fused_sched::adam_step_ (adam.cpp); StepOptions, `checked` and the schedule
// arguments are described in step_common.h.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "step_common.h"

namespace fused_sched::cpu {
void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList max_exp_avg_sqs, at::TensorList steps, const at::Tensor& hyper,
                   at::IntArrayRef group_index, const std::optional<at::Tensor>& schedule,
                   const std::optional<at::Tensor>& schedule_step, const StepOptions& options, bool checked);
}  // namespace fused_sched::cpu
