// Vectorized CPU kernels. Included once per CPU capability with CPU_CAPABILITY defined (DEFAULT, AVX2, AVX512),
// so at::vec selects that capability's Vectorized<float> inside its own inline namespace.
//
// Low-precision parameters are widened to float (two Vectorized<float> per Vectorized<scalar_t>), updated with
// the shared per-element math and narrowed back with round-to-nearest-even; states are float32.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "fused_sched/optim_math.h"
#include "optim_cpu_kernels.h"

namespace fused_sched {
// Lets the shared element functions run on vectors (at::vec::maximum propagates NaN like torch.maximum).
template <>
struct MathOps<at::vec::Vectorized<float>> {
  using V = at::vec::Vectorized<float>;
  static V sqrt(const V& x) { return x.sqrt(); }
  static V neg(const V& x) { return x.neg(); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static V fma(const V& a, const V& b, const V& c) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    return at::vec::fmadd(a, b, c);  // one vfmadd instruction
#else
    // The baseline at::vec::fmadd is a * b + c with two roundings; round once like the other builds.
    alignas(64) float x[V::size()], y[V::size()], z[V::size()];
    a.store(x);
    b.store(y);
    c.store(z);
    for (int i = 0; i < V::size(); ++i) x[i] = std::fma(x[i], y[i], z[i]);
    return V::loadu(x);
#endif
  }
};
}  // namespace fused_sched

namespace fused_sched::cpu::CPU_CAPABILITY {

using FVec = at::vec::Vectorized<float>;

inline AdamCoeffs<FVec> broadcast(const AdamCoeffs<float>& c) {
  return {FVec(c.decay),       FVec(c.weight_decay), FVec(c.lerp_weight), FVec(c.lerp_weight_minus_one),
          FVec(c.beta2),       FVec(c.one_minus_beta2), FVec(c.bc2_sqrt), FVec(c.eps),
          FVec(c.neg_step_size), c.lerp_small,     c.flags};
}

inline SgdCoeffs<FVec> broadcast(const SgdCoeffs<float>& c) {
  return {FVec(c.neg_lr), FVec(c.weight_decay), FVec(c.momentum), FVec(c.one_minus_dampening), c.flags,
          c.has_momentum};
}

// Loads and stores of `kLanes` parameter elements as float vectors: one vector for float storage, two for 16-bit.
template <typename scalar_t>
struct ParamIO {
  static constexpr int64_t kVectors = 2;
  using SVec = at::vec::Vectorized<scalar_t>;
  static constexpr int64_t kLanes = SVec::size();
  static_assert(kLanes == 2 * FVec::size(), "16-bit vectors hold two float vectors");
  static void load(const scalar_t* src, FVec (&out)[2]) {
    auto [lo, hi] = at::vec::convert_to_float<scalar_t>(SVec::loadu(src));
    out[0] = lo;
    out[1] = hi;
  }
  static void store(scalar_t* dst, const FVec (&in)[2]) {
    at::vec::convert_from_float<scalar_t>(in[0], in[1]).store(dst);
  }
};

template <>
struct ParamIO<float> {
  static constexpr int64_t kVectors = 1;
  static constexpr int64_t kLanes = FVec::size();
  static void load(const float* src, FVec (&out)[1]) { out[0] = FVec::loadu(src); }
  static void store(float* dst, const FVec (&in)[1]) { in[0].store(dst); }
};

inline GradPrescale<float> prescale_of(const StepExtras& e) {
  return {e.grad_scale, e.clip_coef, e.divide, e.multiply};
}

inline GradPrescale<FVec> broadcast(const GradPrescale<float>& s) {
  return {FVec(s.scale), FVec(s.coef), s.divide, s.multiply};
}

// Where a parameter's float32 value comes from and where the updated value goes: the param itself, or its master
// copy (read and written in float32; the param receives it rounded to nearest even), and a bfloat16 param
// without a master is written with stochastic rounding when the slot asks for it.
template <typename scalar_t>
struct ParamAccess {
  using IO = ParamIO<scalar_t>;
  static constexpr int64_t V = IO::kVectors;
  static constexpr int64_t F = FVec::size();
  static constexpr bool kCanRoundStochastically = std::is_same_v<scalar_t, c10::BFloat16>;

  scalar_t* p;
  float* master;
  bool stochastic;
  uint32_t key;

  explicit ParamAccess(const TensorSlot& t)
      : p(static_cast<scalar_t*>(t.param)), master(t.master), stochastic(kCanRoundStochastically && t.stochastic),
        key(t.rounding_key) {}

  void load(int64_t i, FVec (&out)[V]) const {
    if (master) {
      for (int64_t k = 0; k < V; ++k) out[k] = FVec::loadu(master + i + k * F);
    } else {
      IO::load(p + i, out);
    }
  }

  void store(int64_t i, const FVec (&in)[V]) const {
    if (master) {
      for (int64_t k = 0; k < V; ++k) in[k].store(master + i + k * F);
    }
    if (stochastic) {
      alignas(64) float values[IO::kLanes];
      for (int64_t k = 0; k < V; ++k) in[k].store(values + k * F);
      for (int64_t j = 0; j < IO::kLanes; ++j) store_one(i + j, values[j]);
    } else {
      IO::store(p + i, in);
    }
  }

  float load_one(int64_t i) const { return master ? master[i] : static_cast<float>(p[i]); }

  void store_one(int64_t i, float value) const {
    if (master) master[i] = value;
    if constexpr (kCanRoundStochastically) {
      if (stochastic) {
        p[i] = c10::BFloat16(bf16_bits_stochastic(value, rounding_bits(key, i)), c10::BFloat16::from_bits());
        return;
      }
    }
    p[i] = static_cast<scalar_t>(value);
  }
};

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

template <typename Fn>
inline void dispatch_param_type(ParamType type, Fn&& fn) {
  switch (type) {
    case ParamType::kFloat: fn(float{}); break;
    case ParamType::kBFloat16: fn(c10::BFloat16{}); break;
    case ParamType::kHalf: fn(c10::Half{}); break;
  }
}

// Runs chunks [first, last): `coeffs(slot)` gives a tensor's scalars, `range(slot, coeffs, begin, end)` updates
// elements. A tensor's chunks are consecutive, so its scalars (Adam: two pow() calls) are computed once per
// tensor, not once per chunk.
template <typename MakeCoeffs, typename Range>
inline void for_each_chunk(const TensorSlot* slots, const Chunk* chunks, const StepExtras& extras, int64_t first,
                           int64_t last, MakeCoeffs&& coeffs, Range&& range) {
  const GradPrescale<float> pre = prescale_of(extras);
  int64_t current = -1;
  decltype(coeffs(slots[0])) c{};
  for (int64_t k = first; k < last; ++k) {
    const Chunk& ch = chunks[k];
    if (ch.tensor != current) {
      current = ch.tensor;
      c = coeffs(slots[current]);
    }
    range(slots[ch.tensor], c, pre, ch.begin, ch.end);
  }
}

inline void adam_chunks(ParamType type, const TensorSlot* slots, const Chunk* chunks, const StepExtras& extras,
                        int64_t first, int64_t last) {
  if (first >= last) return;
  dispatch_param_type(type, [&](auto tag) {
    using scalar_t = decltype(tag);
    for_each_chunk(slots, chunks, extras, first, last, [](const TensorSlot& t) { return adam_coeffs(t.hyper, t.step); },
                   adam_range<scalar_t>);
  });
}

inline void sgd_chunks(ParamType type, const TensorSlot* slots, const Chunk* chunks, const StepExtras& extras,
                       int64_t first, int64_t last) {
  if (first >= last) return;
  dispatch_param_type(type, [&](auto tag) {
    using scalar_t = decltype(tag);
    for_each_chunk(slots, chunks, extras, first, last, [](const TensorSlot& t) { return sgd_coeffs(t.hyper); },
                   sgd_range<scalar_t>);
  });
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
