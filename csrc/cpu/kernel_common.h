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
#include "kernel_table.h"

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

}  // namespace fused_sched::cpu::CPU_CAPABILITY
