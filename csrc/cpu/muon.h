// The CPU implementation of fused_sched::muon_step_ (muon.cpp); StepOptions, `checked` and the schedule arguments are
// described in step_common.h, the two passes in muon_math.h.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "step_common.h"

namespace fused_sched::cpu {
// lr_ratios: each param's adjust_lr_fn factor. phase: muon_math.h MuonPass.
void muon_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   at::TensorList updates, const std::vector<double>& lr_ratios, const at::Tensor& hyper,
                   at::IntArrayRef group_index, int64_t phase, const std::optional<at::Tensor>& schedule,
                   const std::optional<at::Tensor>& schedule_step, const StepOptions& options, bool checked);
}  // namespace fused_sched::cpu
