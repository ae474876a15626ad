// Per-element rules of the low-memory state formats (docs/state_formats.md), shared by the CPU and CUDA kernels
// like optim_math.h; the Triton mirror is fused_sched/backends/triton/state_format.py and the torch mirror
// fused_sched/optim/state_format.py. Scalar functions: the kernels stage a block of states as float32, run the
// optimizer's unchanged element update on it, and narrow the results with these.
//
// This header includes no torch header: the CUDA sources must compile without torch's CUDA headers.
#pragma once

#include <cstdint>
#include <cstring>

#include "fused_sched/optim_math.h"

namespace fused_sched {
inline namespace FS_MATH_ABI {

// Rows of the float32 [4, 256] code table (state_format.qmap).
constexpr int kQmapSignedCodes = 0;
constexpr int kQmapSignedThresholds = 1;
constexpr int kQmapUnsignedCodes = 2;
constexpr int kQmapUnsignedThresholds = 3;
constexpr int kQmapEntries = 256;

FS_HOST_DEVICE int64_t state_format_of(int64_t column) { return column & kFormatMask; }
FS_HOST_DEVICE bool has_master_remainder(int64_t column) { return (column & kFormatMasterRemainder) != 0; }
FS_HOST_DEVICE int64_t block_size_of(int64_t column) { return int64_t{1} << ((column >> kFormatBlockShift) & 0xFF); }

// -- blockwise 8-bit --

FS_HOST_DEVICE float dequantize_code(const float* codes, uint8_t code, float absmax) { return codes[code] * absmax; }

// The code of value x in a block whose absmax is `absmax`: the number of thresholds t[j] (j < 255) below
// y = x / absmax (0 where absmax is 0), by a branchless binary search over the sorted thresholds. A NaN y
// compares false everywhere and gives 0 (its block's absmax is NaN, so the block reads back as NaN).
FS_HOST_DEVICE uint8_t quantize_code(const float* thresholds, float x, float absmax) {
  const float y = absmax == 0.0f ? 0.0f : x / absmax;
  int q = 0;
#if defined(__CUDACC__) || defined(__HIPCC__)
#pragma unroll
#endif
  for (int s = 128; s >= 1; s >>= 1) {
    if (thresholds[q + s - 1] < y) q += s;
  }
  return static_cast<uint8_t>(q);
}

// max(|a|, |b|) propagating NaN (the block absmax: torch.amax semantics).
FS_HOST_DEVICE float absmax_step(float a, float x) {
  const float ax = fabsf(x);
  return (a != a || ax != ax) ? (a != a ? a : ax) : (ax > a ? ax : a);
}

// -- bfloat16 moments --

FS_HOST_DEVICE float bf16_bits_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float x;
  memcpy(&x, &bits, sizeof x);
  return x;
}

// float32 -> bfloat16 bits rounded to nearest even; a NaN becomes a quiet NaN.
FS_HOST_DEVICE uint16_t bf16_bits_nearest(float x) {
  uint32_t bits;
  memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// The key of moment k (0 exp_avg, 1 exp_avg_sq, 2 max_exp_avg_sq) from the tensor's step key (rounding_key).
FS_HOST_DEVICE uint32_t state_rounding_key(uint32_t param_key, int k) {
  return mix32(param_key ^ (0x9E3779B9u * static_cast<uint32_t>(k + 1)));
}

// A moment's bfloat16 bits: stochastic (bits of element `index` under `key`) unless `nearest`.
FS_HOST_DEVICE uint16_t bf16_state_bits(float x, bool nearest, uint32_t key, int64_t index) {
  return nearest ? bf16_bits_nearest(x) : bf16_bits_stochastic(x, rounding_bits(key, index));
}

// -- 16-bit master remainders of bfloat16 params --

// The float32 master of a bfloat16 param (bits) and its int16 remainder: (param << 16) + remainder mod 2^32.
FS_HOST_DEVICE float join_remainder(uint16_t param_bits, int16_t remainder) {
  const uint32_t bits = (static_cast<uint32_t>(param_bits) << 16) + static_cast<uint32_t>(static_cast<int32_t>(remainder));
  float x;
  memcpy(&x, &bits, sizeof x);
  return x;
}

// Splits an updated float32 master into the bfloat16 param (high half rounded half up in magnitude) and the int16
// remainder that join_remainder turns back into the master exactly. A NaN gives the quiet NaN (sign kept) and 0.
FS_HOST_DEVICE void split_remainder(float master, uint16_t* param_bits, int16_t* remainder) {
  uint32_t bits;
  memcpy(&bits, &master, sizeof bits);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) {
    *param_bits = static_cast<uint16_t>(((bits >> 16) & 0x8000u) | 0x7FC0u);
    *remainder = 0;
    return;
  }
  const uint32_t low = bits & 0xFFFFu;
  uint32_t high = bits >> 16;
  if (low >= 0x8000u) {
    high = (high + 1u) & 0xFFFFu;
    *remainder = static_cast<int16_t>(static_cast<int32_t>(low) - 0x10000);
  } else {
    *remainder = static_cast<int16_t>(low);
  }
  *param_bits = static_cast<uint16_t>(high);
}

}  // namespace FS_MATH_ABI
}  // namespace fused_sched
