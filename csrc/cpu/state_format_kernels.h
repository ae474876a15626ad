// Low-memory state formats in the CPU kernels (docs/state_formats.md). A row whose moments are not float32, or
// whose master is an int16 remainder, is updated in stages of kStageElements elements (whole 8-bit blocks): its
// states and its joined float32 master are widened into float32 arrays on the stack, the optimizer's unchanged
// float32 range function runs on a copy of the slot that points at them, and the results are narrowed back with
// the rules of state_format_math.h. The copy's pointers are offset so that element i of the tensor is still
// addressed by i: the stochastic rounding of a bfloat16 param keys its bits on that index, and the gradient and
// the param are read and written in place. float32 rows never come here (row_range).
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "fused_sched/state_format_math.h"
#include "kernel_common.h"
#include "quantize_kernels.h"

namespace fused_sched::cpu::CPU_CAPABILITY {

// The stage: the largest 8-bit block (so a stage holds whole blocks: stages start at multiples of it, since chunks
// start at multiples of kChunkElements), and a multiple of every vector width.
constexpr int64_t kStageElements = 256;

// float32 stand-ins of one stage's states and master.
struct Stage {
  alignas(64) float state[3][kStageElements];
  alignas(64) float master[kStageElements];
};

// A pointer p such that p + s addresses stage[0]: element s of the tensor is the stage's first. Formed through an
// integer so that no out-of-bounds pointer arithmetic is involved; only [s, s + stage length) is dereferenced.
inline float* indexed_from(float* stage, int64_t s) {
  return reinterpret_cast<float*>(reinterpret_cast<uintptr_t>(stage) - static_cast<uintptr_t>(s) * sizeof(float));
}

inline int block_shift_of(int64_t format) { return static_cast<int>((format >> kFormatBlockShift) & 0xFF); }

// State k of elements [s, s + n) as float32: a bfloat16 widened exactly, an 8-bit code times its block's absmax
// (exp_avg / momentum: signed map; exp_avg_sq: unsigned).
inline void widen_state(const FormatSlot& t, int k, const CodePlanes* map, int64_t s, int64_t n, float* out) {
  if (state_format_of(t.format) == kFormatBFloat16) {
    const auto* h = static_cast<const c10::BFloat16*>(t.narrow[k]) + s;
    for (int64_t j = 0; j < n; ++j) out[j] = bf16_bits_to_float(h[j].x);
    return;
  }
  const uint8_t* codes = static_cast<const uint8_t*>(t.narrow[k]) + s;
  const int64_t block = block_size_of(t.format);
  dequantize_blocks(*map, codes, n, t.absmax[k] + (s >> block_shift_of(t.format)), block, out);
}

// absmax_step over in[0, n) from 0: the largest |value|, or a NaN of the block. Taken as the largest of the bits
// with the sign cleared (non-negative floats order like their bits, and a NaN's bits exceed +inf's): an integer
// maximum, four independent chains; the NaN-propagating float maximum in one chain took ~8% of an Adam step. A
// block holding a NaN is taken again by the scalar rule, whose NaN every backend returns.
inline float block_absmax(const float* in, int64_t n) {
  int64_t j = 0;
  int32_t top = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
  __m512i m[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
  for (; j + 64 <= n; j += 64) {
    for (int u = 0; u < 4; ++u) {
      m[u] = _mm512_max_epi32(m[u], _mm512_and_si512(_mm512_loadu_si512(in + j + 16 * u), magnitude));
    }
  }
  for (; j + 16 <= n; j += 16) m[0] = _mm512_max_epi32(m[0], _mm512_and_si512(_mm512_loadu_si512(in + j), magnitude));
  top = _mm512_reduce_max_epi32(_mm512_max_epi32(_mm512_max_epi32(m[0], m[1]), _mm512_max_epi32(m[2], m[3])));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF);
  __m256i m[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
  for (; j + 16 <= n; j += 16) {
    for (int u = 0; u < 2; ++u) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + j + 8 * u));
      m[u] = _mm256_max_epi32(m[u], _mm256_and_si256(x, magnitude));
    }
  }
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm256_max_epi32(m[0], m[1]));
  for (int32_t lane : lanes) top = std::max(top, lane);
#endif
  for (; j < n; ++j) top = std::max(top, static_cast<int32_t>(float_bits(in[j]) & 0x7FFFFFFFu));
  float absmax = bits_float(static_cast<uint32_t>(top));
  if (absmax != absmax) {
    absmax = 0.0f;
    for (j = 0; j < n; ++j) absmax = absmax_step(absmax, in[j]);
  }
  return absmax;
}

// The updated values of state k, elements [s, s + n), written in the state's format: bfloat16 rounded
// stochastically (bits of the element's index under the moment's key) or to nearest even; 8-bit, per block: the
// block's new absmax (NaN if a value is NaN), then each value's code (`table`: the state's thresholds).
inline void narrow_state(const FormatSlot& t, int k, const QuantTable* table, int64_t s, int64_t n,
                         const float* in) {
  if (state_format_of(t.format) == kFormatBFloat16) {
    auto* h = static_cast<c10::BFloat16*>(t.narrow[k]) + s;
    for (int64_t j = 0; j < n; ++j) h[j].x = bf16_state_bits(in[j], t.state_nearest, t.state_keys[k], s + j);
    return;
  }
  uint8_t* codes = static_cast<uint8_t*>(t.narrow[k]) + s;
  const int64_t block = block_size_of(t.format);
  for (int64_t b = 0; b < n; b += block) {
    const int64_t m = std::min(n - b, block);
    const float absmax = block_absmax(in + b, m);
    t.absmax[k][(s + b) >> block_shift_of(t.format)] = absmax;  // a shift: a division per block cost ~3%
    quantize_block(*table, in + b, m, absmax, codes + b);
  }
}

// Elements [begin, end) of a formatted row by
// `range`, the float32 range function of the optimizer. A fresh SGD buffer is not read (the update sets it to the
// gradient): its stage starts as zeros.
template <typename scalar_t, typename Coeffs, typename Range>
void staged_range(const TensorSlot& t, const Coeffs& c, const GradPrescale<float>& pre, int64_t begin, int64_t end,
                  Range&& range) {
  const FormatSlot& f = *t.formatted;
  const int64_t span = kStageElements;
  // Only a bfloat16 param has a remainder (set_slot_format checks it).
  int16_t* remainder = std::is_same_v<scalar_t, c10::BFloat16> ? f.remainder : nullptr;
  Stage stage;
  const QuantTable* tables[3] = {};  // of the 8-bit states (0: signed map, 1: unsigned); unused otherwise
  CodePlanes maps[3];
  if (state_format_of(f.format) == kFormatBlockwise8bit) {
    for (int k = 0; k < 2; ++k) {
      if (f.narrow[k] == nullptr) continue;
      tables[k] = &quant_table(f.qmap + (k == 0 ? kQmapSignedThresholds : kQmapUnsignedThresholds) * kQmapEntries);
      if (!t.fresh) maps[k].build(f.qmap + (k == 0 ? kQmapSignedCodes : kQmapUnsignedCodes) * kQmapEntries);
    }
  }
  TensorSlot w = t;
  float** wide[3] = {&w.state0, &w.state1, &w.state2};
  for (int64_t s = begin; s < end; s += span) {
    const int64_t n = std::min(end, s + span) - s;
    for (int k = 0; k < 3; ++k) {
      if (f.narrow[k] == nullptr) continue;
      if (t.fresh) {
        std::fill(stage.state[k], stage.state[k] + n, 0.0f);
      } else {
        widen_state(f, k, &maps[k], s, n, stage.state[k]);
      }
      *wide[k] = indexed_from(stage.state[k], s);
    }
    if (remainder != nullptr) {
      const auto* p = static_cast<const c10::BFloat16*>(t.param) + s;
      for (int64_t j = 0; j < n; ++j) stage.master[j] = join_remainder(p[j].x, remainder[s + j]);
      w.master = indexed_from(stage.master, s);
    }
    range(w, c, pre, s, s + n);
    for (int k = 0; k < 3; ++k) {
      if (f.narrow[k] != nullptr) narrow_state(f, k, tables[k], s, n, stage.state[k]);
    }
    if (remainder != nullptr) {
      // The range wrote the param rounded to nearest even; the split's param replaces it.
      auto* p = static_cast<c10::BFloat16*>(t.param) + s;
      for (int64_t j = 0; j < n; ++j) split_remainder(stage.master[j], &p[j].x, &remainder[s + j]);
    }
  }
}

// The range function of a chunk: the float32 one itself for a float32 row, staged for any other format.
template <typename scalar_t, typename Coeffs, typename Range>
inline void row_range(const TensorSlot& t, const Coeffs& c, const GradPrescale<float>& pre, int64_t begin,
                      int64_t end, Range&& range) {
  if (__builtin_expect(t.formatted == nullptr, 1)) {
    range(t, c, pre, begin, end);
  } else {
    staged_range<scalar_t>(t, c, pre, begin, end, range);
  }
}

}  // namespace fused_sched::cpu::CPU_CAPABILITY
