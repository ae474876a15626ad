// Argument checks shared by the operators' implementations (CPU op, CUDA glue): one wording for one rule.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>

namespace fused_sched {

// A state or gradient must be laid out exactly like its parameter so that all of them can be walked as flat
// arrays of numel elements.
inline void check_companion(const at::Tensor& p, const at::Tensor& t, at::ScalarType dtype, const char* what,
                            size_t i) {
  TORCH_CHECK(t.device() == p.device(), "fused_sched: ", what, "[", i, "] is on ", t.device(), " but its parameter on ",
              p.device());
  TORCH_CHECK(t.scalar_type() == dtype, "fused_sched: ", what, "[", i, "] must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == p.sizes() && t.strides() == p.strides(), "fused_sched: ", what, "[", i, "] has shape ",
              t.sizes(), " strides ", t.strides(), " but its parameter ", p.sizes(), " ", p.strides());
  TORCH_CHECK(!t.is_sparse(), "fused_sched: ", what, "[", i, "] is sparse; fused_sched supports dense tensors only");
}

// The arguments of a fused clip's norm operator (grad_norm_clip, CPU and CUDA): a positive or infinite norm_type,
// and bucket_sizes that cut the n_grads gradients into consecutive buckets (an empty bucket adds nothing).
inline void check_norm_clip_args(at::IntArrayRef bucket_sizes, size_t n_grads, double norm_type) {
  TORCH_CHECK(norm_type > 0.0, "fused_sched: norm_type must be positive or inf, got ", norm_type);
  int64_t total_size = 0;
  for (int64_t n : bucket_sizes) {
    TORCH_CHECK(n >= 0, "fused_sched: bucket_sizes must not be negative");
    total_size += n;
  }
  TORCH_CHECK(total_size == static_cast<int64_t>(n_grads), "fused_sched: bucket_sizes add up to ", total_size,
              " but ", n_grads, " grads were given");
}

}  // namespace fused_sched
