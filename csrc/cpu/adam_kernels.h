// Vectorized CPU kernels of Adam / AdamW (kernel_common.h says how the capability units include them).
#pragma once

#include "fused_sched/adam_math.h"
#include "kernel_common.h"
#include "state_format_kernels.h"

namespace fused_sched::cpu::CPU_CAPABILITY {

inline AdamCoeffs<FVec> broadcast(const AdamCoeffs<float>& c) {
  return {FVec(c.decay),       FVec(c.weight_decay), FVec(c.lerp_weight), FVec(c.lerp_weight_minus_one),
          FVec(c.beta2),       FVec(c.one_minus_beta2), FVec(c.bc2_sqrt), FVec(c.eps),
          FVec(c.neg_step_size), c.lerp_small,     c.flags};
}

template <typename scalar_t>
void adam_range(const TensorSlot& t, const AdamCoeffs<float>& c, const GradPrescale<float>& pre, int64_t begin,
                int64_t end) {
  using IO = ParamIO<scalar_t>;
  constexpr int64_t V = IO::kVectors;
  constexpr int64_t F = FVec::size();
  const ParamAccess<scalar_t> param(t);
  // The prescaled gradient is written back (unscaled by GradScaler's scale, clipped), as torch's fused kernels
  // and torch.nn.utils.clip_grad_norm_ leave it.
  auto* g = static_cast<scalar_t*>(const_cast<void*>(t.grad));
  const bool write_grad = pre.divide || pre.multiply;
  float* m = t.state0;
  float* v = t.state1;
  float* vmax = t.state2;
  const bool amsgrad = c.flags & kAmsgrad;
  const AdamCoeffs<FVec> cv = broadcast(c);
  const GradPrescale<FVec> prev = broadcast(pre);
  int64_t i = begin;
  for (; i + IO::kLanes <= end; i += IO::kLanes) {
    FVec pv[V], gv[V];
    param.load(i, pv);
    IO::load(g + i, gv);
    for (int64_t k = 0; k < V; ++k) gv[k] = prescale_grad(gv[k], prev);
    if (write_grad) IO::store(g + i, gv);
    for (int64_t k = 0; k < V; ++k) {
      FVec mv = FVec::loadu(m + i + k * F);
      FVec vv = FVec::loadu(v + i + k * F);
      FVec xv = amsgrad ? FVec::loadu(vmax + i + k * F) : FVec(0.0f);
      adam_element(pv[k], gv[k], mv, vv, xv, cv);
      mv.store(m + i + k * F);
      vv.store(v + i + k * F);
      if (amsgrad) xv.store(vmax + i + k * F);
    }
    param.store(i, pv);
  }
  float scratch = 0.0f;
  for (; i < end; ++i) {
    float pf = param.load_one(i);
    float& xf = amsgrad ? vmax[i] : scratch;
    const float gf = prescale_grad(static_cast<float>(g[i]), pre);
    if (write_grad) g[i] = static_cast<scalar_t>(gf);
    adam_element(pf, gf, m[i], v[i], xf, c);
    param.store_one(i, pf);
  }
}

inline void adam_chunks(ParamType type, const TensorSlot* slots, const Chunk* chunks, const StepExtras& extras,
                        int64_t first, int64_t last) {
  if (first >= last) return;
  dispatch_param_type(type, [&](auto tag) {
    using scalar_t = decltype(tag);
    for_each_chunk(slots, chunks, extras, first, last, [](const TensorSlot& t) { return adam_coeffs(t.hyper, t.step); },
                   [](const TensorSlot& t, const AdamCoeffs<float>& c, const GradPrescale<float>& pre, int64_t begin,
                      int64_t end) { row_range<scalar_t>(t, c, pre, begin, end, adam_range<scalar_t>); });
  });
}

}  // namespace fused_sched::cpu::CPU_CAPABILITY
