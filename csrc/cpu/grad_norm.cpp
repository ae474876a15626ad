// The norm pass of a fused clip_grad_norm_ on CPU gradients: per-chunk partials from the vectorized kernels,
// combined in chunk order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "grad_norm.h"
#include "step_common.h"

namespace fused_sched::cpu {

double grad_norm_accumulate_cpu(at::TensorList grads, double norm_type, double grad_scale) {
  TORCH_CHECK(norm_type > 0.0, "fused_sched: norm_type must be positive or inf, got ", norm_type);
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.device().is_cpu() && g.is_non_overlapping_and_dense(), "fused_sched: grads[", i,
                "] must be a dense CPU tensor");
    for (int64_t s = 0; s < g.numel(); s += kChunkElements) {
      chunks.push_back({static_cast<int64_t>(i), s, std::min(g.numel(), s + kChunkElements)});
    }
  }
  const float scale = static_cast<float>(grad_scale);
  const bool divide = grad_scale != 1.0;  // x / 1 == x: skipping the division changes no bit
  const KernelTable* k = active_kernels();
  // One partial per chunk, combined in chunk order: the result does not depend on the thread count.
  std::vector<double> partial(chunks.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const Chunk& ch = chunks[c];
      const at::Tensor& g = grads[ch.tensor];
      partial[c] = k->grad_norm(param_type(g.scalar_type()), g.data_ptr(), ch.begin, ch.end, norm_type, scale,
                                divide);
    }
  });
  return combine_norm_parts(partial, norm_type);
}

double combine_norm_parts(const std::vector<double>& parts, double norm_type) {
  const bool inf_norm = std::isinf(norm_type);
  double total = 0.0;
  for (double p : parts) {
    if (inf_norm) {
      total = (std::isnan(p) || std::isnan(total)) ? NAN : std::max(total, p);
    } else {
      total += p;
    }
  }
  return total;
}

}  // namespace fused_sched::cpu
