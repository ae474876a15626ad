// The norm pass of a fused clip on CPU gradients (grad_norm.cpp).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace fused_sched::cpu {
// The accumulated gradient norm of a CPU bucket for a fused clip: the sum of |g / grad_scale|^norm_type (finite
// norm_type) or the maximum of |g / grad_scale| (infinite), in float64; NaN propagates. grad_scale: 1 for none.
double grad_norm_accumulate_cpu(at::TensorList grads, double norm_type, double grad_scale);
// The accumulation of several buckets from theirs, in order: the sum (finite norm_type) or the NaN-propagating
// maximum (infinite). The one rule for the optimizers' eager path and the fused_sched::grad_norm_clip operator.
double combine_norm_parts(const std::vector<double>& parts, double norm_type);
}  // namespace fused_sched::cpu
