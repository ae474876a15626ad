// Per-element optimizer math shared by every C++ backend (CPU kernels include it with float and
// at::vec::Vectorized<float>; the CUDA kernels include it with float): what every optimizer uses (the tables'
// columns and flags, MathOps, gradient prescaling, rounding, the norm of a fused clip). Each optimizer's own update
// is in its own header beside this one (adam_math.h, sgd_math.h). The Triton kernels mirror them once in
// fused_sched/backends/triton/. The operation order follows torch.optim's single-tensor
// implementations (torch/optim/adam.py, sgd.py) so that fp32 results agree with torch to a few ulps.
//
// This header includes no torch header: the CUDA sources must compile without torch's CUDA headers.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FS_HOST_DEVICE inline
#endif

// Each CPU capability translation unit (csrc/cpu/kernels_avx2.cpp, ...) compiles this header for its own ISA
// and sets FS_MATH_ABI to a name of its own, so its inline functions never merge with the baseline copies
// (the linker keeps one copy of an inline function: an AVX-512 one must not serve a CPU without AVX-512).
#ifndef FS_MATH_ABI
#define FS_MATH_ABI math_base
#endif

namespace fused_sched {
inline namespace FS_MATH_ABI {

// Columns of the per-param-group hyper-parameter table (float64, one row per param group). The Python mirror is
// fused_sched/_hyper.py; both must change together.
enum HyperColumn : int {
  kLr = 0,
  kBeta1 = 1,
  kBeta2 = 2,
  kEps = 3,
  kWeightDecay = 4,
  kMomentum = 5,
  kDampening = 6,
  kFlags = 7,
  kHyperColumns = 8,
};

// Bits of the kFlags column (stored as an exact small integer in float64).
enum HyperFlag : uint32_t {
  kAmsgrad = 1u,
  kMaximize = 2u,
  kNesterov = 4u,
  kDecoupledWeightDecay = 8u,  // AdamW: param *= 1 - lr * wd; Adam: grad += wd * param
  kStochasticRounding = 16u,   // bfloat16 params without a master copy are written with stochastic rounding
  kMasterWeights = 32u,        // informational: the group keeps float32 master copies (found by address)
  kLrFromTable = 64u,          // the row's lr holds even where a schedule program sets one (an lr written into the
                               // param group by hand since the scheduler's last step, or a tensor lr)
  kMomentumFromTable = 128u,   // the same for the momentum target (Adam: beta1, SGD: momentum) written by hand
  kStateRoundNearest = 256u,   // bfloat16 moments are written rounded to nearest even instead of stochastically
};

// Columns of the int64 address table that the device kernels (Triton, CUDA) read, one row per tensor of a bucket
// (built by OptimBucket, csrc/optim_bucket.cpp). Addresses are 0 where a tensor is absent or empty. The Python
// mirror is fused_sched/backends/device_tables.py (TABLE_COLUMNS and the column constants).
enum TableColumn : int {
  kColParam = 0,
  kColGrad = 1,
  kColState0 = 2,   // Adam: exp_avg; SGD, Muon: momentum_buffer
  kColState1 = 3,   // Adam: exp_avg_sq; Muon: the bfloat16 workspace of the update (muon_math.h)
  kColState2 = 4,   // Adam: max_exp_avg_sq
  kColStep = 5,     // Adam: address of the float32 step; SGD: address of the float32 step that keys the
                    // stochastic rounding of a bfloat16 momentum, 0 without one; Muon: address of the float64 lr
                    // ratio (adjust_lr_fn)
  kColNumel = 6,
  kColGroup = 7,
  kColMaster = 8,   // float32 master copy of a low-precision param (master_weights), 0 without one
  kColParamId = 9,  // the param's index in the optimizer (stochastic rounding draws its bits from it)
  kColFormat = 10,  // the state format bit field (StateFormat below; docs/state_formats.md)
  kColAbsmax0 = 11, // blockwise 8-bit: float32 absmax per block of state0, 0 otherwise
  kColAbsmax1 = 12, // blockwise 8-bit: float32 absmax per block of state1, 0 otherwise
  kColQmap = 13,    // blockwise 8-bit: the float32 [4, 256] code table (state_format.qmap), 0 otherwise
  kColFresh = 14,   // SGD: the "fresh buffer" flag (the step creating a momentum buffer sets it to the gradient),
                    // cleared by the kernel that ran the step
  kTableColumns = 15,
};

// Bits of the kColFormat column (fused_sched/optim/state_format.py mirrors them).
enum StateFormat : int64_t {
  kFormatFloat32 = 0,          // moments float32
  kFormatBFloat16 = 1,         // moments bfloat16 (stochastic rounding unless kStateRoundNearest)
  kFormatBlockwise8bit = 2,    // moments uint8 codes with a float32 absmax per block
  kFormatMask = 3,
  kFormatMasterRemainder = 4,  // kColMaster holds int16 low halves of float32 masters of a bfloat16 param
  kFormatBlockShift = 8,       // bits 8-15: log2 of the 8-bit block size
};

// Set by adam_coeffs / sgd_coeffs when weight_decay == 0: torch skips the L2 add then, and AdamW's multiply by
// exactly 1.0 changes nothing, so both are skipped.
constexpr uint32_t kNoWeightDecay = 0x80000000u;

FS_HOST_DEVICE uint32_t hyper_flags(const double* row) { return static_cast<uint32_t>(row[kFlags]); }

// Rounding: every operation rounds on its own (the build turns off FMA contraction), except where torch's
// vectorized CPU kernels round a multiply-add once, which MathOps::fma reproduces: `add(a, b, alpha=s)` is
// fma(b, s, a) and `lerp` is fma(weight or weight - 1, end - start, start or end). Matching torch there matters
// where the sum nearly cancels (grad + wd * param for a parameter about to cross zero).
//
// The few operations that are not plain arithmetic operators. The CPU kernels specialize MathOps for
// at::vec::Vectorized<float>, so the same element functions run on scalars and on vectors.
template <typename T>
struct MathOps;

template <>
struct MathOps<float> {
  static FS_HOST_DEVICE float sqrt(float x) { return sqrtf(x); }
  static FS_HOST_DEVICE float neg(float x) { return -x; }
  // torch.maximum propagates NaN from either side.
  static FS_HOST_DEVICE float max(float a, float b) { return (a != a || a > b) ? a : b; }
  // a * b + c rounded once.
  static FS_HOST_DEVICE float fma(float a, float b, float c) { return fmaf(a, b, c); }
};

// What the step does to every gradient before the update: torch's fused optimizers divide by the GradScaler's scale
// (grad_scale), and a pending fused clip multiplies by clip_grad_norm_'s coefficient. Both are skipped when absent
// (x / 1 and x * 1 are exact anyway; skipping saves the work).
template <typename T>
struct GradPrescale {
  T scale;
  T coef;
  bool divide;
  bool multiply;
};

template <typename T>
FS_HOST_DEVICE T prescale_grad(T g, const GradPrescale<T>& s) {
  if (s.divide) g = g / s.scale;
  if (s.multiply) g = g * s.coef;
  return g;
}

// Stochastic rounding: counter-based random bits, the same on every backend for a given (seed, step, param id,
// element index), so a run is reproducible and a resumed run continues the same stream. mix32 is Chris Wellons'
// "lowbias32" integer hash (a bijection with good avalanche); one call per key word.
FS_HOST_DEVICE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The per-tensor key of one step: computed once per chunk.
FS_HOST_DEVICE uint32_t rounding_key(uint64_t seed, uint32_t step, uint32_t param_id) {
  uint32_t k = mix32(static_cast<uint32_t>(seed) ^ mix32(static_cast<uint32_t>(seed >> 32)));
  k = mix32(k ^ step);
  return mix32(k ^ param_id);
}

// 16 random bits for element `index` of the tensor with key `key`.
FS_HOST_DEVICE uint32_t rounding_bits(uint32_t key, int64_t index) {
  const uint64_t i = static_cast<uint64_t>(index);
  return mix32(mix32(key ^ static_cast<uint32_t>(i >> 32)) ^ static_cast<uint32_t>(i)) & 0xFFFFu;
}

// float32 -> bfloat16 bits, rounded up with probability (dropped bits) / 2^16: unbiased, E[result] = x. NaN stays
// a quiet NaN; infinities stay; a finite value above the largest bfloat16 may round up to infinity as it should.
FS_HOST_DEVICE uint16_t bf16_bits_stochastic(float x, uint32_t random16) {
  uint32_t bits;
  memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  return static_cast<uint16_t>((bits + random16) >> 16);
}

// torch.nn.utils.clip_grad_norm_'s coefficient from the total norm, in its float32 operations:
// clip_coef = max_norm / (total_norm + 1e-6), i.e. reciprocal(total_norm + 1e-6) * max_norm (Tensor.__rtruediv__),
// then clamp(max=1.0), which keeps a NaN.
FS_HOST_DEVICE float clip_coefficient(float total_norm, float max_norm) {
  const float coef = (1.0f / (total_norm + 1e-6f)) * max_norm;
  return coef > 1.0f ? 1.0f : coef;
}

// The total norm from the sum of |g|^p (p finite) or the maximum of |g| (p infinite) over every gradient, in float64,
// rounded to float32 once.
FS_HOST_DEVICE float total_norm_from(double accumulated, double norm_type) {
  if (norm_type == HUGE_VAL) return static_cast<float>(accumulated);
  if (norm_type == 2.0) return static_cast<float>(sqrt(accumulated));
  if (norm_type == 1.0) return static_cast<float>(accumulated);
  return static_cast<float>(pow(accumulated, 1.0 / norm_type));
}

}  // namespace FS_MATH_ABI
}  // namespace fused_sched
