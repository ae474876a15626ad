// Vectorized CPU kernels of Muon's two elementwise passes (muon_math.h; kernel_common.h says how the capability
// units include them). Both walk a tensor in units of two float vectors: the bfloat16 workspace and a 16-bit param
// load as one at::vec vector of that width, a float32 param as two.
#pragma once

#include <c10/util/BFloat16.h>

#include <type_traits>

#include "fused_sched/muon_math.h"
#include "kernel_common.h"

namespace fused_sched::cpu::CPU_CAPABILITY {

inline MuonCoeffs<FVec> broadcast(const MuonCoeffs<float>& c) {
  return {FVec(c.buffer_weight), FVec(c.buffer_weight_minus_one), FVec(c.nesterov_weight),
          FVec(c.nesterov_weight_minus_one), FVec(c.decay), FVec(c.neg_adjusted_lr), c.buffer_small,
          c.nesterov_small, c.nesterov};
}

// 2 * FVec::size() elements of a float, bfloat16 or float16 array as two float vectors.
template <typename scalar_t>
struct MuonPair {
  static constexpr int64_t F = FVec::size();
  static void load(const scalar_t* src, FVec (&out)[2]) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      out[0] = FVec::loadu(src);
      out[1] = FVec::loadu(src + F);
    } else {
      ParamIO<scalar_t>::load(src, out);
    }
  }
  static void store(scalar_t* dst, const FVec (&in)[2]) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      in[0].store(dst);
      in[1].store(dst + F);
    } else {
      ParamIO<scalar_t>::store(dst, in);
    }
  }
};

// The bfloat16 workspace of the update (the table's state1; TensorSlot types it float* like the other states).
inline c10::BFloat16* muon_workspace(const TensorSlot& t) { return reinterpret_cast<c10::BFloat16*>(t.state1); }

// Momentum pass over elements [begin, end): gradient prescaled (and written back when prescaled, as the Adam and
// SGD kernels do), momentum buffer updated, the update stored as bfloat16 (round to nearest even).
template <typename scalar_t>
void muon_momentum_range(const TensorSlot& t, const MuonCoeffs<float>& c, const GradPrescale<float>& pre,
                         int64_t begin, int64_t end) {
  constexpr int64_t F = FVec::size();
  auto* g = static_cast<scalar_t*>(const_cast<void*>(t.grad));
  float* buf = t.state0;
  c10::BFloat16* work = muon_workspace(t);
  const bool write_grad = pre.divide || pre.multiply;
  const MuonCoeffs<FVec> cv = broadcast(c);
  const GradPrescale<FVec> prev = broadcast(pre);
  int64_t i = begin;
  for (; i + 2 * F <= end; i += 2 * F) {
    FVec gv[2], uv[2];
    MuonPair<scalar_t>::load(g + i, gv);
    for (int64_t k = 0; k < 2; ++k) gv[k] = prescale_grad(gv[k], prev);
    if (write_grad) MuonPair<scalar_t>::store(g + i, gv);
    for (int64_t k = 0; k < 2; ++k) {
      FVec bv = FVec::loadu(buf + i + k * F);
      uv[k] = muon_momentum_element(gv[k], bv, cv);
      bv.store(buf + i + k * F);
    }
    MuonPair<c10::BFloat16>::store(work + i, uv);
  }
  for (; i < end; ++i) {
    const float gf = prescale_grad(static_cast<float>(g[i]), pre);
    if (write_grad) g[i] = static_cast<scalar_t>(gf);
    work[i] = c10::BFloat16(muon_momentum_element(gf, buf[i], c));
  }
}

// Update pass over elements [begin, end): weight decay, then the orthogonalized update read from the workspace.
template <typename scalar_t>
void muon_update_range(const TensorSlot& t, const MuonCoeffs<float>& c, const GradPrescale<float>&, int64_t begin,
                       int64_t end) {
  constexpr int64_t F = FVec::size();
  auto* p = static_cast<scalar_t*>(t.param);
  const c10::BFloat16* work = muon_workspace(t);
  const MuonCoeffs<FVec> cv = broadcast(c);
  int64_t i = begin;
  for (; i + 2 * F <= end; i += 2 * F) {
    FVec pv[2], ov[2];
    MuonPair<scalar_t>::load(p + i, pv);
    MuonPair<c10::BFloat16>::load(work + i, ov);
    for (int64_t k = 0; k < 2; ++k) muon_update_element(pv[k], ov[k], cv);
    MuonPair<scalar_t>::store(p + i, pv);
  }
  for (; i < end; ++i) {
    float pf = static_cast<float>(p[i]);
    muon_update_element(pf, static_cast<float>(work[i]), c);
    p[i] = static_cast<scalar_t>(pf);
  }
}

// TensorSlot::step holds the param's lr ratio (adjust_lr_fn) for Muon.
inline MuonCoeffs<float> muon_slot_coeffs(const TensorSlot& t) { return muon_coeffs(t.hyper, t.step); }

inline void muon_momentum_chunks(ParamType type, const TensorSlot* slots, const Chunk* chunks,
                                 const StepExtras& extras, int64_t first, int64_t last) {
  if (first >= last) return;
  dispatch_param_type(type, [&](auto tag) {
    using scalar_t = decltype(tag);
    for_each_chunk(slots, chunks, extras, first, last, muon_slot_coeffs, muon_momentum_range<scalar_t>);
  });
}

inline void muon_update_chunks(ParamType type, const TensorSlot* slots, const Chunk* chunks, const StepExtras& extras,
                               int64_t first, int64_t last) {
  if (first >= last) return;
  dispatch_param_type(type, [&](auto tag) {
    using scalar_t = decltype(tag);
    for_each_chunk(slots, chunks, extras, first, last, muon_slot_coeffs, muon_update_range<scalar_t>);
  });
}

}  // namespace fused_sched::cpu::CPU_CAPABILITY
