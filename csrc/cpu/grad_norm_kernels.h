// Vectorized CPU kernels of the norm pass of a fused clip (kernel_common.h says how the capability units
// include them).
#pragma once

#include <cmath>

#include "kernel_common.h"

namespace fused_sched::cpu::CPU_CAPABILITY {

// The norm pass (NormFn). kLanes independent float64 accumulators: the compiler vectorizes the loop for this
// capability (AVX-512: 16 floats squared, widened and added as two vectors of 8 doubles) without reassociating
// any sum. Measured on GPT-2 124M (2 threads, AVX-512): 48 ms for the earlier baseline-ISA loop with a division
// by 1.0 per element, 24 ms now (torch.nn.utils.get_total_norm, foreach, float32 sums: 18 ms); the three
// capabilities are within 1 ms of each other, so the pass is bound by memory, not by the float64 adds.
template <typename scalar_t, bool kDivide>
double norm_range(const scalar_t* g, int64_t begin, int64_t end, double norm_type, float scale) {
  constexpr int kLanes = 16;
  auto magnitude = [&](int64_t i) {
    float x = static_cast<float>(g[i]);
    if constexpr (kDivide) x = x / scale;
    return std::fabs(x);
  };
  int64_t i = begin;
  if (std::isinf(norm_type)) {
    float best = 0.0f;
    bool nan = false;
    for (; i < end; ++i) {
      const float a = magnitude(i);
      nan |= a != a;
      best = a > best ? a : best;
    }
    return nan ? NAN : static_cast<double>(best);
  }
  double lanes[kLanes] = {};
  if (norm_type == 2.0) {
    for (; i + kLanes <= end; i += kLanes) {
      for (int k = 0; k < kLanes; ++k) {
        const float a = magnitude(i + k);
        lanes[k] += static_cast<double>(a * a);
      }
    }
    for (; i < end; ++i) {
      const float a = magnitude(i);
      lanes[0] += static_cast<double>(a * a);
    }
  } else if (norm_type == 1.0) {
    for (; i + kLanes <= end; i += kLanes) {
      for (int k = 0; k < kLanes; ++k) lanes[k] += static_cast<double>(magnitude(i + k));
    }
    for (; i < end; ++i) lanes[0] += static_cast<double>(magnitude(i));
  } else {
    for (; i < end; ++i) lanes[0] += std::pow(static_cast<double>(magnitude(i)), norm_type);
  }
  double sum = 0.0;
  for (double l : lanes) sum += l;
  return sum;
}

inline double grad_norm(ParamType type, const void* grad, int64_t begin, int64_t end, double norm_type, float scale,
                        bool divide) {
  double result = 0.0;
  dispatch_param_type(type, [&](auto tag) {
    using scalar_t = decltype(tag);
    const auto* g = static_cast<const scalar_t*>(grad);
    result = divide ? norm_range<scalar_t, true>(g, begin, end, norm_type, scale)
                    : norm_range<scalar_t, false>(g, begin, end, norm_type, scale);
  });
  return result;
}

}  // namespace fused_sched::cpu::CPU_CAPABILITY
