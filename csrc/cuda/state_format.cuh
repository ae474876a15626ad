// Device code of the low-memory state formats (docs/state_formats.md) shared by the CUDA step kernels (adam.cu,
// sgd.cu): the rows whose kColFormat is not 0. The per-element rules are those of
// csrc/include/fused_sched/state_format_math.h; the float32 element update is the unchanged one of adam_math.h /
// sgd_math.h. No torch header (kernel_common.cuh).
//
// Layout of a formatted chunk: each thread ("lane") owns kLaneElements consecutive elements and the block walks the
// chunk kThreads * kLaneElements elements at a time, every thread taking the same number of trips (the 8-bit rows
// shuffle between lanes). A chunk starts at a multiple of the chunk size, itself a multiple of 256, so an 8-bit
// block of B elements (32..256) is owned by B / kLaneElements consecutive lanes of one warp (a whole warp for 256),
// which find its absmax with __shfl_xor_sync.
//
// Each lane loads its elements with one or two 8- or 16-byte vector loads when the chunk's tensors are 16-byte
// aligned and the lane's elements all exist, else one element at a time (the tail).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "fused_sched/state_format_math.h"
#include "kernel_common.cuh"

namespace fused_sched::cuda {

constexpr int kLaneElements = 8;
constexpr unsigned kFullWarp = 0xFFFFFFFFu;

// The raw bits of the kLaneElements consecutive elements of one lane, for storage of 1, 2 or 4 bytes (T: uint8_t,
// uint16_t or uint32_t), zero-extended to 32 bits. `vec`: the 8 elements exist and `p` is 8-byte (1-byte T) or
// 16-byte aligned; otherwise the first n (n may be <= 0) are read one by one and the rest are 0.
template <typename T>
struct LaneBits {
  static_assert(std::is_unsigned<T>::value && sizeof(T) <= 4, "raw storage bits");
  static constexpr int kBits = 8 * static_cast<int>(sizeof(T));
  static constexpr int kPerWord = 4 / static_cast<int>(sizeof(T));
  static constexpr int kWords = kLaneElements / kPerWord;  // 2, 4 or 8 words
  static constexpr uint32_t kMask = kBits == 32 ? 0xFFFFFFFFu : (1u << kBits) - 1u;

  static __device__ __forceinline__ void load(const T* p, int n, bool vec, uint32_t (&out)[kLaneElements]) {
    if (vec) {
      uint32_t w[kWords];
      if constexpr (kWords == 2) {
        const uint2 r = __ldca(reinterpret_cast<const uint2*>(p));
        w[0] = r.x;
        w[1] = r.y;
      } else {
#pragma unroll
        for (int q = 0; q < kWords / 4; ++q) {
          const uint4 r = __ldca(reinterpret_cast<const uint4*>(p) + q);
          w[4 * q] = r.x;
          w[4 * q + 1] = r.y;
          w[4 * q + 2] = r.z;
          w[4 * q + 3] = r.w;
        }
      }
#pragma unroll
      for (int k = 0; k < kLaneElements; ++k) {
        out[k] = kPerWord == 1 ? w[k] : (w[k / kPerWord] >> (kBits * (k % kPerWord))) & kMask;  // little endian
      }
    } else {
#pragma unroll
      for (int k = 0; k < kLaneElements; ++k) out[k] = k < n ? static_cast<uint32_t>(p[k]) : 0u;
    }
  }

  static __device__ __forceinline__ void store(T* p, int n, bool vec, const uint32_t (&in)[kLaneElements]) {
    if (vec) {
      uint32_t w[kWords];
#pragma unroll
      for (int q = 0; q < kWords; ++q) w[q] = 0u;
#pragma unroll
      for (int k = 0; k < kLaneElements; ++k) {
        w[k / kPerWord] |= kPerWord == 1 ? in[k] : (in[k] & kMask) << (kBits * (k % kPerWord));
      }
      if constexpr (kWords == 2) {
        __stwb(reinterpret_cast<uint2*>(p), make_uint2(w[0], w[1]));
      } else {
#pragma unroll
        for (int q = 0; q < kWords / 4; ++q) {
          __stwb(reinterpret_cast<uint4*>(p) + q, make_uint4(w[4 * q], w[4 * q + 1], w[4 * q + 2], w[4 * q + 3]));
        }
      }
    } else {
#pragma unroll
      for (int k = 0; k < kLaneElements; ++k) {
        if (k < n) p[k] = static_cast<T>(in[k]);
      }
    }
  }
};

// Where one lane's elements start in a chunk, how many exist, and whether they move as vectors.
struct LaneSpan {
  int64_t i;  // element index of the first
  int n;      // elements that exist (< numel): kLaneElements, fewer at the end, or <= 0
  bool vec;
};

__device__ __forceinline__ LaneSpan lane_span(int64_t base, int64_t end, bool aligned) {
  LaneSpan s;
  s.i = base + static_cast<int64_t>(threadIdx.x) * kLaneElements;
  const int64_t left = end - s.i;
  s.n = left >= kLaneElements ? kLaneElements : (left > 0 ? static_cast<int>(left) : 0);
  s.vec = aligned && s.n == kLaneElements;
  return s;
}

// Parameter values of a formatted row: as ParamAccess (kernel_common.cuh), plus the int16 remainders of a bfloat16
// param (format bit kFormatMasterRemainder: the float32 master is join_remainder(param, remainder), and the
// updated master is written back as split_remainder's param and remainder; no stochastic rounding then).
template <typename P, bool kAllowStochastic>
struct FormattedParam {
  using Bits = typename ParamTraits<P>::Bits;
  static constexpr bool kBf16 = std::is_same<P, __nv_bfloat16>::value;

  Bits* param;
  float* master;        // float32 master, nullptr without one (or with remainders)
  uint16_t* remainder;  // int16 remainders (bfloat16 params only), nullptr without
  bool stochastic;      // bfloat16 param without a master and kStochasticRounding (Adam only)
  uint32_t key;         // rounding_key(seed, step, param id) when stochastic

  static __device__ __forceinline__ FormattedParam make(const int64_t* entry, bool stochastic, uint32_t key) {
    FormattedParam f;
    f.param = as_ptr<Bits>(entry[kColParam]);
    const bool rem = kBf16 && has_master_remainder(entry[kColFormat]);
    f.master = rem ? nullptr : as_ptr<float>(entry[kColMaster]);
    f.remainder = rem ? as_ptr<uint16_t>(entry[kColMaster]) : nullptr;
    f.stochastic = kAllowStochastic && kBf16 && stochastic && entry[kColMaster] == 0;
    f.key = key;
    return f;
  }

  __device__ __forceinline__ bool aligned(int64_t start) const {
    return aligned16(param + start) && (master == nullptr || aligned16(master + start)) &&
           (remainder == nullptr || aligned16(remainder + start));
  }

  __device__ __forceinline__ void load(const LaneSpan& s, float (&p)[kLaneElements]) const {
    uint32_t b[kLaneElements];
    if (master != nullptr) {
      LaneBits<uint32_t>::load(reinterpret_cast<const uint32_t*>(master) + s.i, s.n, s.vec, b);
#pragma unroll
      for (int k = 0; k < kLaneElements; ++k) p[k] = __uint_as_float(b[k]);
      return;
    }
    LaneBits<Bits>::load(param + s.i, s.n, s.vec, b);
    if constexpr (kBf16) {
      if (remainder != nullptr) {
        uint32_t r[kLaneElements];
        LaneBits<uint16_t>::load(remainder + s.i, s.n, s.vec, r);
#pragma unroll
        for (int k = 0; k < kLaneElements; ++k) {
          p[k] = join_remainder(static_cast<uint16_t>(b[k]), static_cast<int16_t>(static_cast<uint16_t>(r[k])));
        }
        return;
      }
    }
#pragma unroll
    for (int k = 0; k < kLaneElements; ++k) p[k] = ParamTraits<P>::to_float(static_cast<Bits>(b[k]));
  }

  __device__ __forceinline__ void store(const LaneSpan& s, const float (&p)[kLaneElements]) const {
    uint32_t b[kLaneElements];
    if constexpr (kBf16) {
      if (remainder != nullptr) {
        uint32_t r[kLaneElements];
#pragma unroll
        for (int k = 0; k < kLaneElements; ++k) {
          uint16_t high;
          int16_t low;
          split_remainder(p[k], &high, &low);
          b[k] = high;
          r[k] = static_cast<uint16_t>(low);
        }
        LaneBits<uint16_t>::store(remainder + s.i, s.n, s.vec, r);
        LaneBits<Bits>::store(param + s.i, s.n, s.vec, b);
        return;
      }
    }
    if (master != nullptr) {
#pragma unroll
      for (int k = 0; k < kLaneElements; ++k) b[k] = __float_as_uint(p[k]);
      LaneBits<uint32_t>::store(reinterpret_cast<uint32_t*>(master) + s.i, s.n, s.vec, b);
    }
    if (kAllowStochastic && kBf16 && stochastic) {
#pragma unroll
      for (int k = 0; k < kLaneElements; ++k) b[k] = bf16_bits_stochastic(p[k], rounding_bits(key, s.i + k));
    } else {
#pragma unroll
      for (int k = 0; k < kLaneElements; ++k) b[k] = ParamTraits<P>::from_float(p[k]);
    }
    LaneBits<Bits>::store(param + s.i, s.n, s.vec, b);
  }
};

// Gradients of a lane (prescaled, and written back when prescaled, as the float32 path does).
template <typename P>
__device__ __forceinline__ void load_grads(typename ParamTraits<P>::Bits* grad, const LaneSpan& s,
                                           const GradPrescale<float>& pre, float (&g)[kLaneElements]) {
  using Bits = typename ParamTraits<P>::Bits;
  uint32_t b[kLaneElements];
  LaneBits<Bits>::load(grad + s.i, s.n, s.vec, b);
#pragma unroll
  for (int k = 0; k < kLaneElements; ++k) g[k] = prescale_grad(ParamTraits<P>::to_float(static_cast<Bits>(b[k])), pre);
  if (pre.divide || pre.multiply) {
#pragma unroll
    for (int k = 0; k < kLaneElements; ++k) b[k] = ParamTraits<P>::from_float(g[k]);
    LaneBits<Bits>::store(grad + s.i, s.n, s.vec, b);
  }
}

// One moment of a formatted row, by its format (kFormatFloat32, kFormatBFloat16, kFormatBlockwise8bit).
template <int64_t kFormat>
struct MomentLane;

template <>
struct MomentLane<kFormatFloat32> {
  uint32_t* ptr;
  __device__ __forceinline__ bool aligned(int64_t start) const { return ptr == nullptr || aligned16(ptr + start); }
  __device__ __forceinline__ void load(const LaneSpan& s, float (&x)[kLaneElements]) const {
    uint32_t b[kLaneElements];
    LaneBits<uint32_t>::load(ptr + s.i, s.n, s.vec, b);
#pragma unroll
    for (int k = 0; k < kLaneElements; ++k) x[k] = __uint_as_float(b[k]);
  }
  __device__ __forceinline__ void store(const LaneSpan& s, const float (&x)[kLaneElements]) const {
    uint32_t b[kLaneElements];
#pragma unroll
    for (int k = 0; k < kLaneElements; ++k) b[k] = __float_as_uint(x[k]);
    LaneBits<uint32_t>::store(ptr + s.i, s.n, s.vec, b);
  }
};

// bfloat16 moments: widened exactly; narrowed to nearest even or stochastically (bits of element i under `key`,
// state_rounding_key).
template <>
struct MomentLane<kFormatBFloat16> {
  uint16_t* ptr;
  bool nearest;
  uint32_t key;
  __device__ __forceinline__ bool aligned(int64_t start) const { return ptr == nullptr || aligned16(ptr + start); }
  __device__ __forceinline__ void load(const LaneSpan& s, float (&x)[kLaneElements]) const {
    uint32_t b[kLaneElements];
    LaneBits<uint16_t>::load(ptr + s.i, s.n, s.vec, b);
#pragma unroll
    for (int k = 0; k < kLaneElements; ++k) x[k] = bf16_bits_to_float(static_cast<uint16_t>(b[k]));
  }
  __device__ __forceinline__ void store(const LaneSpan& s, const float (&x)[kLaneElements]) const {
    uint32_t b[kLaneElements];
#pragma unroll
    for (int k = 0; k < kLaneElements; ++k) b[k] = bf16_state_bits(x[k], nearest, key, s.i + k);
    LaneBits<uint16_t>::store(ptr + s.i, s.n, s.vec, b);
  }
};

// Blockwise 8-bit moments: codes with a float32 absmax per block of 2^shift elements. `codes` and `thresholds`
// point at the block's shared-memory copy of the code table's rows for this moment (signed or unsigned map).
// A store is in two halves: lane_absmax / group_absmax (every lane of the warp), then quantize_store.
template <>
struct MomentLane<kFormatBlockwise8bit> {
  uint8_t* ptr;
  float* absmax;
  const float* codes;
  const float* thresholds;
  int shift;
  __device__ __forceinline__ bool aligned(int64_t start) const { return ptr == nullptr || aligned16(ptr + start); }
  __device__ __forceinline__ void load(const LaneSpan& s, float (&x)[kLaneElements]) const {
    uint32_t b[kLaneElements];
    LaneBits<uint8_t>::load(ptr + s.i, s.n, s.vec, b);
    const float scale = s.n > 0 ? absmax[s.i >> shift] : 0.0f;
#pragma unroll
    for (int k = 0; k < kLaneElements; ++k) x[k] = dequantize_code(codes, static_cast<uint8_t>(b[k]), scale);
  }
  // The block absmax (NaN as the canonical 0x7FC00000, torch's NaN, whatever NaN the elements hold) is written
  // by the block's first lane; the codes by each lane.
  __device__ __forceinline__ void quantize_store(const LaneSpan& s, const float (&x)[kLaneElements], float a,
                                                 int lanes) const {
    if (a != a) a = __uint_as_float(0x7FC00000u);
    if (s.n > 0 && (threadIdx.x & static_cast<unsigned>(lanes - 1)) == 0) absmax[s.i >> shift] = a;
    uint32_t b[kLaneElements];
#pragma unroll
    for (int k = 0; k < kLaneElements; ++k) b[k] = quantize_code(thresholds, x[k], a);
    LaneBits<uint8_t>::store(ptr + s.i, s.n, s.vec, b);
  }
};

// Lanes per 8-bit block of a row (its format column's block size / kLaneElements: 4 to 32).
__device__ __forceinline__ int lanes_per_block(const int64_t* entry) {
  return static_cast<int>(block_size_of(entry[kColFormat]) / kLaneElements);
}

// max |x| over the lane's existing elements (NaN-propagating; 0 for none).
__device__ __forceinline__ float lane_absmax(const LaneSpan& s, const float (&x)[kLaneElements]) {
  float a = 0.0f;
#pragma unroll
  for (int k = 0; k < kLaneElements; ++k) {
    if (k < s.n) a = absmax_step(a, x[k]);
  }
  return a;
}

// The absmax of each group of `lanes` consecutive lanes (a power of two, at most 32), in every lane of the group.
// Every lane of the warp must call it with the same `lanes`.
__device__ __forceinline__ float group_absmax(float a, int lanes) {
  for (int offset = lanes >> 1; offset > 0; offset >>= 1) a = absmax_step(a, __shfl_xor_sync(kFullWarp, a, offset));
  return a;
}

// Two moments' absmax at once (Adam), so that the two shuffle chains overlap.
__device__ __forceinline__ void group_absmax2(float& a, float& b, int lanes) {
  for (int offset = lanes >> 1; offset > 0; offset >>= 1) {
    const float oa = __shfl_xor_sync(kFullWarp, a, offset);
    const float ob = __shfl_xor_sync(kFullWarp, b, offset);
    a = absmax_step(a, oa);
    b = absmax_step(b, ob);
  }
}

// The code table (state_format.qmap, float32 [4, 256]) of an 8-bit chunk, copied to shared memory by the whole
// block. The block's threads must all call it (the format is the chunk's row's, the same for the block).
__device__ __forceinline__ const float* stage_qmap(const float* qmap) {
  __shared__ float table[4 * kQmapEntries];
  __syncthreads();  // the previous chunk's lookups are done
  for (int k = threadIdx.x; k < 4 * kQmapEntries; k += blockDim.x) table[k] = qmap[k];
  __syncthreads();
  return table;
}

template <int64_t kFormat>
__device__ __forceinline__ MomentLane<kFormat> moment_lane(const int64_t* entry, int state, const float* table,
                                                           bool nearest, uint32_t key) {
  MomentLane<kFormat> m;
  if constexpr (kFormat == kFormatFloat32) {
    m.ptr = as_ptr<uint32_t>(entry[kColState0 + state]);
  } else if constexpr (kFormat == kFormatBFloat16) {
    m.ptr = as_ptr<uint16_t>(entry[kColState0 + state]);
    m.nearest = nearest;
    m.key = key;
  } else {
    static_assert(kFormat == kFormatBlockwise8bit, "a moment format");
    const bool is_signed = state == 0;  // exp_avg and the momentum: signed map; exp_avg_sq: unsigned
    m.ptr = as_ptr<uint8_t>(entry[kColState0 + state]);
    m.absmax = as_ptr<float>(entry[state == 0 ? kColAbsmax0 : kColAbsmax1]);
    m.codes = table + (is_signed ? kQmapSignedCodes : kQmapUnsignedCodes) * kQmapEntries;
    m.thresholds = table + (is_signed ? kQmapSignedThresholds : kQmapUnsignedThresholds) * kQmapEntries;
    m.shift = static_cast<int>((entry[kColFormat] >> kFormatBlockShift) & 0xFF);
  }
  return m;
}

}  // namespace fused_sched::cuda
