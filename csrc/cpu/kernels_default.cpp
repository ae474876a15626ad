// Baseline-ISA build of the CPU kernels: runs everywhere, chosen when the CPU lacks AVX2.
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif
#include "adam_kernels.h"
#include "grad_norm_kernels.h"
#include "muon_kernels.h"
#include "sgd_kernels.h"

namespace fused_sched::cpu {
const KernelTable* kernels_default() {
  static const KernelTable table{"default", &CPU_CAPABILITY::adam_chunks, &CPU_CAPABILITY::sgd_chunks, &CPU_CAPABILITY::grad_norm,
                                 &CPU_CAPABILITY::muon_momentum_chunks, &CPU_CAPABILITY::muon_update_chunks};
  return &table;
}
}  // namespace fused_sched::cpu
