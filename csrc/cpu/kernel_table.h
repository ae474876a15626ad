// Interface between the dispatcher-facing CPU ops (adam.cpp, sgd.cpp, grad_norm.cpp, compiled for the baseline ISA)
// and the vectorized kernels, compiled once per CPU capability (kernels_{default,avx2,avx512}.cpp) and picked
// at run time. Only plain data crosses it, so the capability translation units include as little as possible.
#pragma once

#include <cstdint>


namespace fused_sched::cpu {

enum class ParamType : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };

// What the kernels read of a row whose moments are not float32 or whose master is an int16 remainder (kept apart
// from TensorSlot so that a float32 row's slot stays as small as it was).
struct FormatSlot {
  int64_t format;           // the address table's kColFormat value (moment format, remainder bit, block size)
  void* narrow[3];          // state k when not float32 (bfloat16 or uint8 codes); TensorSlot's state k is then null
  float* absmax[2];         // blockwise 8-bit: float32 absmax per block of state0, state1
  const float* qmap;        // blockwise 8-bit: the float32 [4, 256] code table
  int16_t* remainder;       // int16 low halves of the float32 master of a bfloat16 param (TensorSlot's master is null)
  uint32_t state_keys[3];   // bfloat16 moments rounded stochastically: state_rounding_key of each moment
  bool state_nearest;       // bfloat16 moments rounded to nearest even (hyper flag kStateRoundNearest)
};

// Addresses of one parameter's tensors (all with the parameter's layout, dense) and its element count.
struct TensorSlot {
  void* param;
  const void* grad;
  float* state0;  // Adam: exp_avg;     SGD: momentum_buffer (may be null when momentum == 0)
  float* state1;  // Adam: exp_avg_sq;  Muon: the bfloat16 workspace of the update (typed float* here)
  float* state2;  // Adam: max_exp_avg_sq (null unless amsgrad)
  int64_t numel;
  const double* hyper;  // the row of this tensor's param group in the hyper-parameter table
  double step;          // Adam: the step count after this step's increment; Muon: the lr ratio (adjust_lr_fn)
  bool fresh;           // SGD: the momentum buffer is created by this step
  float* master;        // float32 master copy of a low-precision param (null without one): read and written
                        // in place of the param, which receives the master rounded to nearest even
  bool stochastic;      // bfloat16 param without a master: written with stochastic rounding
  uint32_t rounding_key;  // rounding_key(seed, step, param id) of optim_math.h when `stochastic`
  // The row's low-memory state formats (docs/state_formats.md); null for a float32 row (moments float32, no
  // remainder master), which the kernels update as before.
  const FormatSlot* formatted;
};

// What the whole call applies to every gradient before the update (optim_math.h GradPrescale: GradScaler's scale,
// a fused clip's coefficient). Plain data: this header must not include optim_math.h, which each capability
// translation unit compiles under its own ABI name.
struct StepExtras {
  float grad_scale = 1.0f;
  float clip_coef = 1.0f;
  bool divide = false;
  bool multiply = false;
};

// A contiguous range of one tensor's elements: the unit of work given to a thread.
struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// Runs chunks [first, last) of `chunks`, each over the tensor it names in `slots`. The per-tensor scalars are
// derived from the slot's hyper row and step inside the kernel, with the kernel's own copy of optim_math.h.
using ChunksFn = void (*)(ParamType, const TensorSlot*, const Chunk*, const StepExtras&, int64_t first,
                          int64_t last);

// The norm pass of a fused clip over elements [begin, end) of one gradient: the sum of |g / scale|^norm_type
// (finite norm_type; squares and magnitudes formed in float32, summed in float64) or the maximum of |g / scale|
// (infinite), NaN propagating. divide = false: no scale.
using NormFn = double (*)(ParamType, const void* grad, int64_t begin, int64_t end, double norm_type, float scale,
                          bool divide);

struct KernelTable {
  const char* name;
  ChunksFn adam_chunks;
  ChunksFn sgd_chunks;
  NormFn grad_norm;
  ChunksFn muon_momentum_chunks;  // Muon's two passes (muon_math.h)
  ChunksFn muon_update_chunks;
};

// One per capability; `nullptr`-returning where the capability is not compiled for this target.
const KernelTable* kernels_default();
const KernelTable* kernels_avx2();
const KernelTable* kernels_avx512();

}  // namespace fused_sched::cpu
