// Host emulation of the CUDA features csrc/cuda/*.cu use, so that their kernels run on a machine without
// a GPU (tests/cuda_host_emulation.py builds them with g++ and compares them with the CPU and Triton backends).
//
// Model: a launch runs its blocks one after another; a block runs one std::thread per CUDA thread, so
// __syncthreads (a std::barrier), warp shuffles (a barrier per warp) and the last-block ticket (atomics) behave as
// on a GPU, with the blocks' interleaving reduced to one order. __shared__ variables are function statics, which is
// right for blocks that never overlap. Conversions round as the PTX instructions do (cvt.rn: nearest even, NaN to
// the canonical NaN). What this cannot show: device-library accuracy (CUDA's double pow and cos are not correctly
// rounded, the host's are), memory-model races between blocks, and speed.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
inline int emu_sms = 2;
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) { *v = emu_sms; return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

struct dim3 { unsigned x = 0, y = 0, z = 0; };
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
template <typename T> inline T __ldca(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline void __stwb(T* p, T v) { *p = v; }

inline float __uint_as_float(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }

struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };
inline __half __ushort_as_half(uint16_t b) { return {b}; }
inline uint16_t __half_as_ushort(__half h) { return h.bits; }
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.bits, 2); return static_cast<float>(f); }
inline __half __float2half_rn(float x) {
  _Float16 f = static_cast<_Float16>(x);  // RNE (libgcc)
  __half h; std::memcpy(&h.bits, &f, 2);
  if (x != x) h.bits = 0x7FFF;  // cvt.rn.f16.f32 canonical NaN
  return h;
}
inline __nv_bfloat16 __ushort_as_bfloat16(uint16_t b) { return {b}; }
inline uint16_t __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float(static_cast<uint32_t>(h.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t b = __float_as_uint(x);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return {0x7FFF};  // cvt.rn.bf16.f32 canonical NaN
  return {static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16)};
}

inline std::barrier<>* emu_block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> emu_warp_barriers;
// Warp exchanges: each lane writes its value's bits to its slot, the warp meets at a barrier, each lane reads its
// source lane's slot, and the warp meets again before any slot is reused. Every lane of the warp must take part
// (the kernels use full masks only), as a real shuffle with a full mask requires.
inline std::vector<uint64_t> emu_shfl;
inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xFFFFFFFFu) { emu_warp_barriers[threadIdx.x >> 5]->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
template <typename T>
inline T emu_exchange(T v, unsigned source_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "a register value");
  const unsigned t = threadIdx.x, warp = t >> 5;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof v);  // bits, not values: a NaN's payload travels unchanged
  emu_shfl[t] = bits;
  emu_warp_barriers[warp]->arrive_and_wait();
  T r;
  std::memcpy(&r, &emu_shfl[(warp << 5) | source_lane], sizeof r);
  emu_warp_barriers[warp]->arrive_and_wait();
  return r;
}
template <typename T>
inline T __shfl_down_sync(unsigned, T v, int offset) {
  const unsigned lane = threadIdx.x & 31;
  return emu_exchange(v, lane + offset < 32 ? lane + offset : lane);  // out of range: the lane's own value
}
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int mask) {
  return emu_exchange(v, (threadIdx.x & 31) ^ static_cast<unsigned>(mask & 31));
}

template <typename Kernel, typename Args>
void emu_launch(unsigned grid, unsigned threads, Kernel kernel, const Args& args) {
  gridDim.x = grid;
  blockDim.x = threads;
  emu_shfl.assign(threads, 0);
  for (unsigned b = 0; b < grid; ++b) {
    std::barrier<> block(threads);
    emu_block_barrier = &block;
    emu_warp_barriers.clear();
    for (unsigned w = 0; w < threads / 32; ++w) emu_warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, t, b] {
        threadIdx.x = t;
        blockIdx.x = b;
        kernel(args);
        // a thread that returns early must not hold back the others' barriers
        emu_block_barrier->arrive_and_drop();
      });
    }
    for (auto& th : pool) th.join();
  }
}
