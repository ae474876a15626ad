// Vectorized CPU kernels of SGD (kernel_common.h says how the capability units include them).
#pragma once

#include "fused_sched/sgd_math.h"
#include "kernel_common.h"
#include "state_format_kernels.h"

namespace fused_sched::cpu::CPU_CAPABILITY {

inline SgdCoeffs<FVec> broadcast(const SgdCoeffs<float>& c) {
  return {FVec(c.neg_lr), FVec(c.weight_decay), FVec(c.momentum), FVec(c.one_minus_dampening), c.flags,
          c.has_momentum};
}

template <typename scalar_t>
void sgd_range(const TensorSlot& t, const SgdCoeffs<float>& c, const GradPrescale<float>& pre, int64_t begin,
               int64_t end) {
  using IO = ParamIO<scalar_t>;
  constexpr int64_t V = IO::kVectors;
  constexpr int64_t F = FVec::size();
  const ParamAccess<scalar_t> param(t);
  auto* g = static_cast<scalar_t*>(const_cast<void*>(t.grad));  // written back when prescaled, as in adam_range
  const bool write_grad = pre.divide || pre.multiply;
  float* buf = t.state0;
  const bool has_buf = c.has_momentum;
  const SgdCoeffs<FVec> cv = broadcast(c);
  const GradPrescale<FVec> prev = broadcast(pre);
  int64_t i = begin;
  for (; i + IO::kLanes <= end; i += IO::kLanes) {
    FVec pv[V], gv[V];
    param.load(i, pv);
    IO::load(g + i, gv);
    for (int64_t k = 0; k < V; ++k) gv[k] = prescale_grad(gv[k], prev);
    if (write_grad) IO::store(g + i, gv);
    for (int64_t k = 0; k < V; ++k) {
      FVec bv = has_buf ? FVec::loadu(buf + i + k * F) : FVec(0.0f);
      sgd_element(pv[k], gv[k], bv, t.fresh, cv);
      if (has_buf) bv.store(buf + i + k * F);
    }
    param.store(i, pv);
  }
  float scratch = 0.0f;
  for (; i < end; ++i) {
    float pf = param.load_one(i);
    float& bf = has_buf ? buf[i] : scratch;
    const float gf = prescale_grad(static_cast<float>(g[i]), pre);
    if (write_grad) g[i] = static_cast<scalar_t>(gf);
    sgd_element(pf, gf, bf, t.fresh, c);
    param.store_one(i, pf);
  }
}

inline void sgd_chunks(ParamType type, const TensorSlot* slots, const Chunk* chunks, const StepExtras& extras,
                       int64_t first, int64_t last) {
  if (first >= last) return;
  dispatch_param_type(type, [&](auto tag) {
    using scalar_t = decltype(tag);
    for_each_chunk(slots, chunks, extras, first, last, [](const TensorSlot& t) { return sgd_coeffs(t.hyper); },
                   [](const TensorSlot& t, const SgdCoeffs<float>& c, const GradPrescale<float>& pre, int64_t begin,
                      int64_t end) { row_range<scalar_t>(t, c, pre, begin, end, sgd_range<scalar_t>); });
  });
}

}  // namespace fused_sched::cpu::CPU_CAPABILITY
