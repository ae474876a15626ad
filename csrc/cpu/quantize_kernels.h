// Blockwise 8-bit codes in the CPU kernels (docs/state_formats.md): dequantization, and the code of y = x / absmax
// (the number of thresholds t[j], j < 255, with t[j] < y: quantize_code's rule) by a bucket table instead of a
// search.
//
// The bucket table. A float's bits above the low 16 (sign, exponent, top 7 mantissa bits: the "prefix") cut the
// magnitudes into buckets of relative width <= 2^-7. Magnitudes at or below the prefix `lo` (under every
// threshold's) share bucket 0 and those at or above 1.0 (prefix `hi`) the last one; each side of zero has its own
// buckets. When no bucket holds more than one threshold (the dynamic maps: their closest thresholds near 1.0 are
// 0.007 apart, the buckets there 0.0039 wide) and the two clamped buckets hold none, the count below any y is the
// count below its bucket plus one comparison with the bucket's threshold, and that threshold shares y's prefix, so
// the comparison is one of the 16 low bits. An entry is (count below the bucket) << 16 | k, where k is chosen so
// that adding y's 16 low bits (inverted on the negative side, where a larger magnitude is a smaller y) carries
// into bit 16 exactly when y is above the threshold (k = 0: no threshold, never carries):
//     code = (entry[bucket(y)] + low16(y)) >> 16
// one gathered load and a few integer operations per value, every ISA alike. A threshold table that does not fit
// (unsorted, a threshold at +-0 or a denormal or >= 1 in magnitude, two in one bucket) keeps the scalar search.
// Tables are built from the thresholds' contents the first time a thread meets them and cached per thread.
//
// Measured on the 2-core AVX-512 machine (AMD EPYC, one thread, 42.7M elements of GPT-2 shapes): the search with
// the thresholds in registers (4 + 15 permutes and compares per 16 values) and a scalar dequantization loop took
// ~60% and ~15% of an 8-bit Adam step of 3.75 ns/element; with this table and the word-permute dequantization
// the step takes 1.9, of which the gathered entries are ~40% (0.36-0.40 ns per element on this CPU, whatever the
// gather's mask; entries loaded one by one were 0.23 alone but slower in the step) and the float32 update ~25%.
// The floor, measured with the two gathers replaced by a shift (wrong codes, a timing experiment not kept;
// bench/bench_state_format_cpu.py): 2.04 -> 1.21 ns per element with one thread, 1.02 -> 0.60 with two, where
// torch's fused float32 AdamW, memory-bound, takes 0.50-0.53. Dequantization, the float32 update, the absmax and
// the divisions alone cost more than torch's whole step on this 2-core CPU, so no lookup makes 8-bit as fast here.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "fused_sched/state_format_math.h"
#include "kernel_common.h"

namespace fused_sched::cpu::CPU_CAPABILITY {

inline uint32_t float_bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

inline float bits_float(uint32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

struct QuantTable {
  static constexpr int kThresholds = 255;
  float thresholds[kThresholds];  // the key: the contents it was built from
  bool built = false;
  bool bucketed = false;  // false: quantize_code's search
  uint32_t lo = 0, hi = 0, buckets = 0;  // prefixes of the first and last bucket, buckets per side
  std::vector<uint32_t> entries;         // positive side's buckets, then negative side's

  // The code of a y (never NaN) by the table.
  uint32_t code_of_bits(uint32_t bits) const {
    const uint32_t sign = static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31);
    const uint32_t prefix = std::min(std::max((bits & 0x7FFFFFFFu) >> 16, lo), hi);
    return (entries[prefix - lo + (sign & buckets)] + ((bits ^ sign) & 0xFFFFu)) >> 16;
  }

  void build(const float* t) {
    std::memcpy(thresholds, t, sizeof thresholds);
    built = true;
    bucketed = false;
    entries.clear();
    uint32_t min_magnitude = 0x7FFFFFFFu;
    for (int j = 0; j < kThresholds; ++j) {
      if (j + 1 < kThresholds && !(t[j] <= t[j + 1])) return;  // unsorted or NaN
      min_magnitude = std::min(min_magnitude, float_bits(t[j]) & 0x7FFFFFFFu);
    }
    hi = float_bits(1.0f) >> 16;
    if ((min_magnitude >> 16) < 2 || (min_magnitude >> 16) > hi) return;
    lo = (min_magnitude >> 16) - 1;  // bucket 0: every prefix <= lo, below every threshold
    buckets = hi - lo + 1;
    entries.assign(2 * buckets, 0);
    const float* end = t + kThresholds;
    auto below = [&](float x) { return static_cast<uint32_t>(std::lower_bound(t, end, x) - t); };     // t < x
    auto at_most = [&](float x) { return static_cast<uint32_t>(std::upper_bound(t, end, x) - t); };   // t <= x
    const float inf = std::numeric_limits<float>::infinity();
    for (uint32_t b = 0; b < buckets; ++b) {
      const bool clamped = b == 0 || b == buckets - 1;
      const float a = b == 0 ? 0.0f : bits_float((lo + b) << 16);  // magnitudes [a, next) ([a, inf] last)
      const float next = b == buckets - 1 ? inf : bits_float((lo + b + 1) << 16);
      for (int side = 0; side < 2; ++side) {
        // positive: y in [a, next), count below it t < a; negative: y in (-next, -a], count t <= -next
        const uint32_t base = side == 0 ? below(a) : (b == buckets - 1 ? below(-inf) : at_most(-next));
        const uint32_t top = side == 0 ? (b == buckets - 1 ? at_most(inf) : below(next)) : at_most(-a);
        uint32_t key = 0;
        if (top - base > (clamped ? 0u : 1u)) return;
        if (top > base) {
          const uint32_t tb = float_bits(t[base]);
          if (tb >> 16 != ((side == 0 ? 0u : 0x8000u) | (lo + b))) return;
          key = side == 0 ? 0xFFFFu - (tb & 0xFFFFu) : (tb & 0xFFFFu);
        }
        entries[b + side * buckets] = base << 16 | key;
      }
    }
    bucketed = true;
  }
};

// The table of `thresholds` (255 floats), built on this thread's first meeting with these contents. Four per
// thread: a step uses two (the signed and the unsigned map), so a lookup never evicts the other one.
inline const QuantTable& quant_table(const float* thresholds) {
  thread_local QuantTable cache[4];
  thread_local int next = 0;
  for (const QuantTable& c : cache) {
    if (c.built && std::memcmp(c.thresholds, thresholds, sizeof c.thresholds) == 0) return c;
  }
  QuantTable& slot = cache[next];
  next = (next + 1) & 3;
  slot.build(thresholds);
  return slot;
}

// A code map (256 floats) as the high and the low 16 bits of each value, for AVX-512's lookups.
struct CodePlanes {
  const float* map;
  alignas(64) uint16_t high[256];
  alignas(64) uint16_t low[256];
  void build(const float* m) {
    map = m;
    for (int c = 0; c < 256; ++c) {
      high[c] = static_cast<uint16_t>(float_bits(m[c]) >> 16);
      low[c] = static_cast<uint16_t>(float_bits(m[c]) & 0xFFFFu);
    }
  }
};

// out[j] = map[codes[j]] * absmax of j's block, j < n (dequantize_code): `absmax` holds the absmax of the blocks
// of `block` elements that [0, n) covers. AVX-512 looks each half of the map's values up from 8 registers of 32
// 16-bit words, 32 codes at a time: 4 two-register word permutes (code bits 0-5) and 3 blends (bits 6-7) per half,
// then the halves interleaved. Measured alone (AMD EPYC): 0.13 ns per element; 0.23 with the floats in 16
// registers (8 permutes, 7 blends per 16 codes), 0.37 gathered.
inline void dequantize_blocks(const CodePlanes& planes, const uint8_t* codes, int64_t n, const float* absmax,
                              int64_t block, float* out) {
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512)
  __m512i high[8], low[8];
  for (int k = 0; k < 8; ++k) {
    high[k] = _mm512_load_si512(planes.high + 32 * k);
    low[k] = _mm512_load_si512(planes.low + 32 * k);
  }
  // Word 8L + w of the index vector (w < 4) holds code 4L + w and word 8L + 4 + w code 16 + 4L + w: unpacking the
  // low (high) words of each 128-bit lane then gives the values of codes 0-15 (16-31) in order.
  const __m512i order = _mm512_set_epi16(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8, 23, 22, 21, 20,
                                         7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
  // Blocks hold whole 32-code groups (32 elements at least); one absmax per block: a division per vector
  // (absmax[j / block]) took 40% of the dequantization.
  for (int64_t b = 0; j + 32 <= n; ++b) {
    const __m512 scale = _mm512_set1_ps(absmax[b]);
    for (const int64_t e = std::min(n & ~int64_t{31}, j + block); j < e; j += 32) {
      const __m512i idx = _mm512_permutexvar_epi16(
          order, _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + j))));
      const __mmask32 b6 = _mm512_test_epi16_mask(idx, _mm512_set1_epi16(64));
      const __mmask32 b7 = _mm512_test_epi16_mask(idx, _mm512_set1_epi16(128));
      __m512i h[4], l[4];
      for (int k = 0; k < 4; ++k) {
        h[k] = _mm512_permutex2var_epi16(high[2 * k], idx, high[2 * k + 1]);
        l[k] = _mm512_permutex2var_epi16(low[2 * k], idx, low[2 * k + 1]);
      }
      const __m512i hv = _mm512_mask_blend_epi16(b7, _mm512_mask_blend_epi16(b6, h[0], h[1]),
                                                 _mm512_mask_blend_epi16(b6, h[2], h[3]));
      const __m512i lv = _mm512_mask_blend_epi16(b7, _mm512_mask_blend_epi16(b6, l[0], l[1]),
                                                 _mm512_mask_blend_epi16(b6, l[2], l[3]));
      _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(lv, hv)), scale));
      _mm512_storeu_ps(out + j + 16, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(lv, hv)), scale));
    }
  }
#elif defined(CPU_CAPABILITY_AVX2)
  for (int64_t b = 0; j + 8 <= n; ++b) {  // blocks hold whole vectors
    const __m256 scale = _mm256_set1_ps(absmax[b]);
    for (const int64_t e = std::min(n & ~int64_t{7}, j + block); j < e; j += 8) {
      const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + j)));
      _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_i32gather_ps(planes.map, idx, 4), scale));
    }
  }
#endif
  for (; j < n; ++j) out[j] = dequantize_code(planes.map, codes[j], absmax[j / block]);  // the last stage's tail
}

#if defined(CPU_CAPABILITY_AVX2)
// The codes of 8 values x / absmax (QuantTable::code_of_bits) as int32.
inline __m256i avx2_codes(const QuantTable& table, const float* x, __m256 scale) {
  const __m256i bits = _mm256_castps_si256(_mm256_div_ps(_mm256_loadu_ps(x), scale));
  const __m256i sign = _mm256_srai_epi32(bits, 31);
  const __m256i lo = _mm256_set1_epi32(static_cast<int>(table.lo));
  __m256i prefix = _mm256_srli_epi32(_mm256_slli_epi32(bits, 1), 17);
  prefix = _mm256_min_epu32(_mm256_max_epu32(prefix, lo), _mm256_set1_epi32(static_cast<int>(table.hi)));
  const __m256i index = _mm256_add_epi32(_mm256_sub_epi32(prefix, lo),
                                         _mm256_and_si256(sign, _mm256_set1_epi32(static_cast<int>(table.buckets))));
  const __m256i entry = _mm256_i32gather_epi32(reinterpret_cast<const int*>(table.entries.data()), index, 4);
  const __m256i low = _mm256_and_si256(_mm256_xor_si256(bits, sign), _mm256_set1_epi32(0xFFFF));
  return _mm256_srli_epi32(_mm256_add_epi32(entry, low), 16);
}
#endif

// The codes of in[0, n) in a block of the given absmax (the block's max |x|), quantize_code's.
inline void quantize_block(const QuantTable& table, const float* in, int64_t n, float absmax, uint8_t* out) {
  if (!table.bucketed || std::isinf(absmax)) {  // an infinite x gives a NaN y; rare
    for (int64_t j = 0; j < n; ++j) out[j] = quantize_code(table.thresholds, in[j], absmax);
    return;
  }
  if (absmax != absmax) {  // every y NaN: code 0
    std::memset(out, 0, static_cast<size_t>(n));
    return;
  }
  if (absmax == 0.0f) {  // every y 0
    std::memset(out, static_cast<int>(table.code_of_bits(0)), static_cast<size_t>(n));
    return;
  }
  // From here |y| <= 1 and no y is NaN.
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 scale = _mm512_set1_ps(absmax);
  const __m512i lo = _mm512_set1_epi32(static_cast<int>(table.lo));
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(table.hi));
  const __m512i side = _mm512_set1_epi32(static_cast<int>(table.buckets));
  const __m512i low16 = _mm512_set1_epi32(0xFFFF);
  const int* entries = reinterpret_cast<const int*>(table.entries.data());
  for (; j + 16 <= n; j += 16) {
    const __m512i bits = _mm512_castps_si512(_mm512_div_ps(_mm512_loadu_ps(in + j), scale));
    const __m512i sign = _mm512_srai_epi32(bits, 31);
    __m512i prefix = _mm512_srli_epi32(_mm512_slli_epi32(bits, 1), 17);
    prefix = _mm512_sub_epi32(_mm512_min_epu32(_mm512_max_epu32(prefix, lo), hi), lo);
    // Two 8-lane gathers: 0.36 ns per element where one 16-lane gather took 0.40 (measured alone, AMD EPYC).
    const __m512i index = _mm512_add_epi32(prefix, _mm512_and_si512(sign, side));
    const __m256i low_half = _mm256_i32gather_epi32(entries, _mm512_castsi512_si256(index), 4);
    const __m256i high_half = _mm256_i32gather_epi32(entries, _mm512_extracti64x4_epi64(index, 1), 4);
    const __m512i entry = _mm512_inserti64x4(_mm512_castsi256_si512(low_half), high_half, 1);
    const __m512i low = _mm512_and_si512(_mm512_xor_si512(bits, sign), low16);
    const __m512i code = _mm512_srli_epi32(_mm512_add_epi32(entry, low), 16);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j), _mm512_cvtepi32_epi8(code));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 scale = _mm256_set1_ps(absmax);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (; j + 16 <= n; j += 16) {
    // packs of 32 -> 16 -> 8 bits work within 128-bit lanes: dwords (a0-3, b0-3, a4-7, b4-7) reordered
    const __m256i words = _mm256_packus_epi32(avx2_codes(table, in + j, scale), avx2_codes(table, in + j + 8, scale));
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(words, words), order);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j), _mm256_castsi256_si128(bytes));
  }
#endif
  for (; j < n; ++j) out[j] = static_cast<uint8_t>(table.code_of_bits(float_bits(in[j] / absmax)));
}

}  // namespace fused_sched::cpu::CPU_CAPABILITY
