#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

#include "optim_cpu_kernels.h"

namespace fused_sched::cpu {
// The CPU capability whose kernels run (default, avx2, avx512) and a switch for tests and benchmarks.
std::string cpu_capability();
void set_cpu_capability(const std::string& name);
const KernelTable* find_kernels(const std::string& name);

// Implementations of the operators fused_sched::adam_step_ / sgd_step_ on CPU tensors (schemas in
// fused_sched_ops.cpp). Every check runs before the first write. checked = true: the caller (OptimBucket, which
// checks every layout when it is built and in refresh_grads()) vouches for the tensors; only the element counts
// that memory safety depends on are compared again.
// schedule / schedule_step: optional device schedule programs (float64 [groups, segments, kScheduleColumns],
// schedule_math.h) and the scheduler's step counter (float64, one element); when given, each group's lr (and
// momentum / beta1) comes from its program at that step instead of from hyper.
//
// StepOptions: the large-model features, all optional.
// * master_params: empty, or one per param: a float32 tensor laid out like a low-precision param (its master
//   copy, updated in place of the param, which receives it rounded to nearest even), or an empty tensor for none.
// * grad_scale / found_inf (float32, one element; torch.amp.GradScaler's): gradients are divided by grad_scale;
//   when found_inf != 0 the call changes nothing at all (params, states, steps) and writes 0 to step_advance.
// * clip_coef (float32, one element): gradients are multiplied by it (a fused clip_grad_norm_).
// * step_advance (float64, one element): set to 1 by a step that runs, left alone by one that found_inf skips; a
//   device scheduler adds it to its step counter and clears it, so its step advances only when an optimizer step
//   ran since its last one (a skipped step holds a per-step schedule back, not a per-epoch one).
// * param_ids / sr_seed: stochastic rounding of bfloat16 params without a master copy (hyper flag
//   kStochasticRounding) draws its bits from (sr_seed, step, param id, element index); param_ids empty: the index
//   in the call.
struct StepOptions {
  at::TensorList master_params;
  std::optional<at::Tensor> grad_scale;
  std::optional<at::Tensor> found_inf;
  std::optional<at::Tensor> clip_coef;
  std::optional<at::Tensor> step_advance;
  at::IntArrayRef param_ids;
  int64_t sr_seed = 0;
};

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList max_exp_avg_sqs, at::TensorList steps, const at::Tensor& hyper,
                   at::IntArrayRef group_index, const std::optional<at::Tensor>& schedule,
                   const std::optional<at::Tensor>& schedule_step, const StepOptions& options, bool checked);
void sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  const at::Tensor& hyper, at::IntArrayRef group_index, at::IntArrayRef fresh_buffers,
                  const std::optional<at::Tensor>& schedule, const std::optional<at::Tensor>& schedule_step,
                  const StepOptions& options, bool checked);

// The accumulated gradient norm of a CPU bucket for a fused clip: the sum of |g / grad_scale|^norm_type (finite
// norm_type) or the maximum of |g / grad_scale| (infinite), in float64; NaN propagates. grad_scale: 1 for none.
double grad_norm_accumulate_cpu(at::TensorList grads, double norm_type, double grad_scale);
// The accumulation of several buckets from theirs, in order: the sum (finite norm_type) or the NaN-propagating
// maximum (infinite). The one rule for the optimizers' eager path and the fused_sched::grad_norm_clip operator.
double combine_norm_parts(const std::vector<double>& parts, double norm_type);
// Every group's (lr, momentum) program value at the step in schedule_step: float64 [groups, 2], NaN where the
// program sets nothing. The kernels' own evaluation, exposed for tests and for plotting.
at::Tensor evaluate_schedule_cpu(const at::Tensor& schedule, const at::Tensor& schedule_step);
}  // namespace fused_sched::cpu
