#pragma once

#include <ATen/ATen.h>

#include <string>

#include "optim_cpu_kernels.h"

namespace fused_sched::cpu {
// The CPU capability whose kernels run (default, avx2, avx512) and a switch for tests and benchmarks.
std::string cpu_capability();
void set_cpu_capability(const std::string& name);
const KernelTable* find_kernels(const std::string& name);

// Implementations of the operators fused_sched::adam_step_ / sgd_step_ on CPU tensors (schemas in
// fused_sched_ops.cpp). Every check runs before the first write.
void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList max_exp_avg_sqs, at::TensorList steps, const at::Tensor& hyper,
                   at::IntArrayRef group_index);
void sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  const at::Tensor& hyper, at::IntArrayRef group_index, at::IntArrayRef fresh_buffers);
}  // namespace fused_sched::cpu
