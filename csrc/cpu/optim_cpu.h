#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

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
void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList max_exp_avg_sqs, at::TensorList steps, const at::Tensor& hyper,
                   at::IntArrayRef group_index, const std::optional<at::Tensor>& schedule,
                   const std::optional<at::Tensor>& schedule_step, bool checked);
void sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  const at::Tensor& hyper, at::IntArrayRef group_index, at::IntArrayRef fresh_buffers,
                  const std::optional<at::Tensor>& schedule, const std::optional<at::Tensor>& schedule_step,
                  bool checked);
// Every group's (lr, momentum) program value at the step in schedule_step: float64 [groups, 2], NaN where the
// program sets nothing. The kernels' own evaluation, exposed for tests and for plotting.
at::Tensor evaluate_schedule_cpu(const at::Tensor& schedule, const at::Tensor& schedule_step);
}  // namespace fused_sched::cpu
