// AVX2 + FMA build of the CPU kernels. The ISA is enabled with a target pragma (setuptools has no per-file
// flags) after the headers whose inline functions other translation units share, so only code inside at::vec's
// AVX2 inline namespace and our own AVX2 namespace is compiled for AVX2. It is picked at run time only when
// the CPU reports AVX2 and FMA (step_common.cpp).
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
#pragma GCC target("avx2,fma,f16c")

// SLEEF declares its vector functions only under the ISA macros that -m flags would define; at::vec's AVX2
// Vectorized<float> names them, so the declarations are pulled in with those macros set for this one include.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#include <sleef.h>
#undef __AVX__
#undef __AVX2__
#undef __FMA__

#define CPU_CAPABILITY AVX2
#define FS_MATH_ABI math_avx2
#define CPU_CAPABILITY_AVX2
#include "adam_kernels.h"
#include "grad_norm_kernels.h"
#include "muon_kernels.h"
#include "sgd_kernels.h"
#pragma GCC pop_options

namespace fused_sched::cpu {
const KernelTable* kernels_avx2() {
  static const KernelTable table{"avx2", &AVX2::adam_chunks, &AVX2::sgd_chunks, &AVX2::grad_norm,
                                 &AVX2::muon_momentum_chunks, &AVX2::muon_update_chunks};
  return &table;
}
}  // namespace fused_sched::cpu
#else
namespace fused_sched::cpu {
const KernelTable* kernels_avx2() { return nullptr; }
}  // namespace fused_sched::cpu
#endif
