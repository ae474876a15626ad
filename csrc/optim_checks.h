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

}  // namespace fused_sched
