// AVX-512 build of the CPU kernels (see kernels_avx2.cpp for why a target pragma is used). Picked at
// run time only when the CPU reports AVX512F, BW, VL and DQ (step_common.cpp).
#include "kernel_table.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <tuple>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

// SLEEF declares its vector functions only under the ISA macros that -m flags would define; at::vec's AVX512
// Vectorized<float> names them, so the declarations are pulled in with those macros set for this one include.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __AVX512F__ 1
#define __AVX512DQ__ 1
#include <sleef.h>
#undef __AVX__
#undef __AVX2__
#undef __FMA__
#undef __AVX512F__
#undef __AVX512DQ__

#define CPU_CAPABILITY AVX512
#define FS_MATH_ABI math_avx512
#define CPU_CAPABILITY_AVX512
#include "adam_kernels.h"
#include "grad_norm_kernels.h"
#include "muon_kernels.h"
#include "sgd_kernels.h"
#pragma GCC pop_options

namespace fused_sched::cpu {
const KernelTable* kernels_avx512() {
  static const KernelTable table{"avx512", &AVX512::adam_chunks, &AVX512::sgd_chunks, &AVX512::grad_norm,
                                 &AVX512::muon_momentum_chunks, &AVX512::muon_update_chunks};
  return &table;
}
}  // namespace fused_sched::cpu
#else
namespace fused_sched::cpu {
const KernelTable* kernels_avx512() { return nullptr; }
}  // namespace fused_sched::cpu
#endif
