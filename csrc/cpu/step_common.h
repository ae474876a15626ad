// What the CPU operators of every optimizer share (step_common.cpp): StepOptions, the choice of kernels, the
// argument checks and the bucket of tensor slots cut into chunks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <optional>
#include <string>
#include <vector>

#include "fused_sched/optim_math.h"
#include "kernel_table.h"

namespace fused_sched::cpu {
// The CPU capability whose kernels run (default, avx2, avx512) and a switch for tests and benchmarks.
std::string cpu_capability();
void set_cpu_capability(const std::string& name);
const KernelTable* find_kernels(const std::string& name);

// Implementations of the operators fused_sched::adam_step_ / sgd_step_ on CPU tensors (schemas in
// fused_sched_ops.cpp). Every check runs before the first write. checked = true: the caller (OptimBucket, which
// checks every layout when it is built and in refresh_grads()) vouches for the tensors; only the element counts
// that memory safety depends on are compared again.
// schedule / schedule_step: optional device schedule programs (float64 [groups, segments, kScheduleColumns],
// schedule_math.h) and the scheduler's step counter (float64, one element); when given, each group's lr (and
// momentum / beta1) comes from its program at that step instead of from hyper.
//
// StepOptions: the large-model features, all optional.
// * master_params: empty, or one per param: a float32 tensor laid out like a low-precision param (its master
//   copy, updated in place of the param, which receives it rounded to nearest even), or an empty tensor for none.
// * grad_scale / found_inf (float32, one element; torch.amp.GradScaler's): gradients are divided by grad_scale;
//   when found_inf != 0 the call changes nothing at all (params, states, steps) and writes 0 to step_advance.
// * clip_coef (float32, one element): gradients are multiplied by it (a fused clip_grad_norm_).
// * step_advance (float64, one element): set to 1 by a step that runs, left alone by one that found_inf skips; a
//   device scheduler adds it to its step counter and clears it, so its step advances only when an optimizer step
//   ran since its last one (a skipped step holds a per-step schedule back, not a per-epoch one).
// * param_ids / sr_seed: stochastic rounding of bfloat16 params without a master copy (hyper flag
//   kStochasticRounding) draws its bits from (sr_seed, step, param id, element index); param_ids empty: the index
//   in the call.
// * formats / absmax0 / absmax1 / qmap: the low-memory state formats (docs/state_formats.md; OptimBucket passes
//   them, the registered operators never): formats empty (everything float32) or one kColFormat value per param;
//   absmax0 / absmax1 empty or one float32 tensor per param (of ceil(numel / block) elements where its moments are
//   8-bit); qmap the float32 [4, 256] code table. A param with the remainder bit has an int16 master_params entry.
struct StepOptions {
  at::TensorList master_params;
  std::optional<at::Tensor> grad_scale;
  std::optional<at::Tensor> found_inf;
  std::optional<at::Tensor> clip_coef;
  std::optional<at::Tensor> step_advance;
  at::IntArrayRef param_ids;
  int64_t sr_seed = 0;
  at::IntArrayRef formats;
  at::TensorList absmax0;
  at::TensorList absmax1;
  std::optional<at::Tensor> qmap;
};

// Every group's (lr, momentum) program value at the step in schedule_step: float64 [groups, 2], NaN where the
// program sets nothing. The kernels' own evaluation, exposed for tests and for plotting.
at::Tensor evaluate_schedule_cpu(const at::Tensor& schedule, const at::Tensor& schedule_step);

// -- shared by the operators of adam.cpp, sgd.cpp and grad_norm.cpp (defined in step_common.cpp) --

// 16384-element chunks: with 2000 tensors of 256 elements and with GPT-2's 148 tensors both chunkings keep the
// two threads within 1% of each other on this 2-core machine; larger chunks unbalance the small-model case.
constexpr int64_t kChunkElements = 16384;
// Below this many elements in all, waking the thread pool costs more than it saves (measured ~15 us per wake).
constexpr int64_t kSerialElements = 32768;

const KernelTable*& active_kernels();
ParamType param_type(at::ScalarType t);
void check_hyper(const at::Tensor& hyper, at::IntArrayRef group_index, size_t n);
at::Tensor effective_hyper(const at::Tensor& hyper, const std::optional<at::Tensor>& schedule,
                           const std::optional<at::Tensor>& schedule_step, int momentum_column);

struct Bucket {
  ParamType type;
  std::vector<TensorSlot> slots;
  std::vector<FormatSlot> formats;  // empty without formats, else one per slot (used by formatted rows only)
  std::vector<Chunk> chunks;
  int64_t total = 0;
};

Bucket make_bucket(at::TensorList params, at::TensorList grads, bool checked);
void make_chunks(Bucket& b);

template <typename Fn>
void run_chunks(const Bucket& b, Fn&& fn) {
  const int64_t n = static_cast<int64_t>(b.chunks.size());
  if (n == 0) return;
  if (b.total <= kSerialElements) {
    fn(0, n);
  } else {
    at::parallel_for(0, n, 1, fn);
  }
}

void check_float_state(const at::Tensor& p, const at::Tensor& s, const char* what, size_t i, bool checked);
StepExtras check_options(const StepOptions& o, at::TensorList params, bool checked);
bool skip_step(const StepOptions& o);
float* master_of(const StepOptions& o, size_t i);
// The kColFormat value of params[i] (0 without formats).
int64_t format_of(const StepOptions& o, size_t i);
// Checks params[i]'s format and writes its slot's format fields: master (float32) and, for a row that is not all
// float32, `formatted` (b.formats[i]: format, remainder (int16), the code table of 8-bit moments).
void set_formatted_slot(Bucket& b, const StepOptions& o, const at::Tensor& p, size_t i);
inline void set_slot_format(Bucket& b, const StepOptions& o, const at::Tensor& p, size_t i) {
  if (o.formats.empty() || o.formats[i] == 0) {  // float32: the slot as it always was (formatted stays null)
    b.slots[i].master = master_of(o, i);
  } else {
    set_formatted_slot(b, o, p, i);
  }
}
// Checks state k of params[i] (`what`[i]) against the dtype of its slot's format and points the slot at it: state0-2
// for float32 moments, formatted->narrow[k] otherwise, with the absmax of state k for 8-bit moments.
void set_narrow_state(Bucket& b, int k, const StepOptions& o, const at::Tensor& p, const at::Tensor& s,
                      const char* what, size_t i, bool checked);
inline void set_slot_state(Bucket& b, int k, const StepOptions& o, const at::Tensor& p, const at::Tensor& s,
                           const char* what, size_t i, bool checked) {
  TensorSlot& slot = b.slots[i];
  if (slot.formatted == nullptr || (slot.formatted->format & kFormatMask) == kFormatFloat32) {
    check_float_state(p, s, what, i, checked);
    (k == 0 ? slot.state0 : k == 1 ? slot.state1 : slot.state2) = s.data_ptr<float>();
  } else {
    set_narrow_state(b, k, o, p, s, what, i, checked);
  }
}
StepOptions make_options(std::optional<at::TensorList> master_params, const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef,
                         const std::optional<at::Tensor>& step_advance, at::IntArrayRef param_ids, int64_t sr_seed);
}  // namespace fused_sched::cpu
