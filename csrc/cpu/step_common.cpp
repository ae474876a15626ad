#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "fused_sched/optim_math.h"
#include "optim_checks.h"
#include "fused_sched/schedule_math.h"
#include "fused_sched/state_format_math.h"
#include "step_common.h"

namespace fused_sched::cpu {
namespace {

const KernelTable* best_kernels() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (kernels_avx512() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return kernels_avx512();
  }
  if (kernels_avx2() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kernels_avx2();
#endif
  return kernels_default();
}

}  // namespace

const KernelTable*& active_kernels() {
  static const KernelTable* table = [] {
    const KernelTable* best = best_kernels();
    if (const char* env = std::getenv("FUSED_SCHED_CPU_CAPABILITY")) {
      const KernelTable* chosen = find_kernels(env);
      TORCH_CHECK(chosen, "FUSED_SCHED_CPU_CAPABILITY=", env, " is not one of default, avx2, avx512 or is not ",
                  "supported by this CPU");
      return chosen;
    }
    return best;
  }();
  return table;
}

ParamType param_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ParamType::kFloat;
    case at::kBFloat16: return ParamType::kBFloat16;
    case at::kHalf: return ParamType::kHalf;
    default: TORCH_CHECK(false, "fused_sched: parameters must be float32, bfloat16 or float16, got ", t);
  }
  return ParamType::kFloat;
}

void check_hyper(const at::Tensor& hyper, at::IntArrayRef group_index, size_t n) {
  TORCH_CHECK(hyper.device().is_cpu() && hyper.scalar_type() == at::kDouble && hyper.dim() == 2 &&
                  hyper.size(1) == kHyperColumns && hyper.is_contiguous(),
              "fused_sched: hyper must be a contiguous CPU float64 tensor of shape [groups, ", int(kHyperColumns),
              "], got ", hyper.scalar_type(), " ", hyper.sizes(), " on ", hyper.device());
  TORCH_CHECK(group_index.size() == n, "fused_sched: group_index has ", group_index.size(), " entries for ", n,
              " tensors");
  for (int64_t g : group_index) {
    TORCH_CHECK(g >= 0 && g < hyper.size(0), "fused_sched: group index ", g, " out of range [0, ", hyper.size(0),
                ")");
  }
}

// The hyper table with every scheduled group's lr and momentum column (the caller's: Adam kBeta1, SGD kMomentum)
// replaced by its program's value at the scheduler's step: computed once per call, so the kernels read plain rows.
at::Tensor effective_hyper(const at::Tensor& hyper, const std::optional<at::Tensor>& schedule,
                           const std::optional<at::Tensor>& schedule_step, int momentum_column) {
  TORCH_CHECK(momentum_column >= 0 && momentum_column < kHyperColumns, "fused_sched: momentum_column ",
              momentum_column, " is not a column of the hyper table");
  if (!schedule.has_value() || !schedule->defined()) return hyper;
  const at::Tensor& table = *schedule;
  TORCH_CHECK(schedule_step.has_value() && schedule_step->defined(), "fused_sched: a schedule needs its step");
  const at::Tensor& step = *schedule_step;
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kDouble && table.dim() == 3 &&
                  table.size(0) == hyper.size(0) && table.size(2) == kScheduleColumns && table.is_contiguous(),
              "fused_sched: schedule must be a contiguous CPU float64 tensor [groups, segments, ",
              int(kScheduleColumns), "] with one program per hyper row");
  TORCH_CHECK(step.device().is_cpu() && step.scalar_type() == at::kDouble && step.numel() == 1,
              "fused_sched: schedule_step must be a one-element CPU float64 tensor");
  at::Tensor rows = hyper.clone();
  double* r = rows.data_ptr<double>();
  const double* programs = table.data_ptr<double>();
  const double t = *step.data_ptr<double>();
  const int64_t segments = table.size(1);
  for (int64_t g = 0; g < hyper.size(0); ++g) {
    double value[2] = {0.0, 0.0};
    const uint32_t set = evaluate_schedule(programs + g * segments * kScheduleColumns, segments, t, value);
    const uint32_t flags = hyper_flags(r + g * kHyperColumns);
    if ((set & (1u << kTargetLr)) && !(flags & kLrFromTable)) r[g * kHyperColumns + kLr] = value[kTargetLr];
    if ((set & (1u << kTargetMomentum)) && !(flags & kMomentumFromTable)) {
      r[g * kHyperColumns + momentum_column] = value[kTargetMomentum];
    }
  }
  return rows;
}

// checked: the caller (OptimBucket) has already checked every layout; the per-tensor comparisons are skipped and
// only what memory safety needs (element counts) is kept.
Bucket make_bucket(at::TensorList params, at::TensorList grads, bool checked) {
  TORCH_CHECK(grads.size() == params.size(), "fused_sched: ", grads.size(), " grads for ", params.size(), " params");
  Bucket b;
  b.type = params.empty() ? ParamType::kFloat : param_type(params[0].scalar_type());
  b.slots.resize(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    if (checked) {
      TORCH_CHECK(grads[i].numel() == p.numel(), "fused_sched: grads[", i, "] does not match its parameter");
      b.slots[i].param = p.data_ptr();
      b.slots[i].grad = grads[i].data_ptr();
      b.slots[i].numel = p.numel();
      continue;
    }
    TORCH_CHECK(p.device().is_cpu(), "fused_sched: params[", i, "] is on ", p.device(), ", expected cpu");
    TORCH_CHECK(p.scalar_type() == params[0].scalar_type(), "fused_sched: params[", i, "] is ", p.scalar_type(),
                " but params[0] is ", params[0].scalar_type(), "; one call takes one dtype");
    TORCH_CHECK(!p.is_sparse() && p.is_non_overlapping_and_dense(), "fused_sched: params[", i,
                "] must be dense and non-overlapping");
    check_companion(p, grads[i], p.scalar_type(), "grads", i);
    b.slots[i].param = p.data_ptr();
    b.slots[i].grad = grads[i].data_ptr();
    b.slots[i].numel = p.numel();
  }
  return b;
}

void make_chunks(Bucket& b) {
  for (size_t i = 0; i < b.slots.size(); ++i) {
    const int64_t n = b.slots[i].numel;
    for (int64_t s = 0; s < n; s += kChunkElements) {
      b.chunks.push_back({static_cast<int64_t>(i), s, std::min(n, s + kChunkElements)});
    }
    b.total += n;
  }
}

void check_float_state(const at::Tensor& p, const at::Tensor& s, const char* what, size_t i, bool checked) {
  if (checked) {
    TORCH_CHECK(s.numel() == p.numel(), "fused_sched: ", what, "[", i, "] does not match its parameter");
  } else {
    check_companion(p, s, at::kFloat, what, i);
  }
}

namespace {

void check_scalar(const std::optional<at::Tensor>& t, at::ScalarType dtype, const char* what) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == dtype && t->numel() == 1, "fused_sched: ", what,
              " must be a one-element ", dtype, " tensor on the CPU, got ", t->scalar_type(), " ", t->sizes(), " on ",
              t->device());
}

template <typename T>
T scalar_or(const std::optional<at::Tensor>& t, T fallback) {
  return t.has_value() && t->defined() ? *t->data_ptr<T>() : fallback;
}

}  // namespace

// Checks StepOptions (step_common.h) against the call's params; returns the gradient pre-scaling.
StepExtras check_options(const StepOptions& o, at::TensorList params, bool checked) {
  const size_t n = params.size();
  check_scalar(o.grad_scale, at::kFloat, "grad_scale");
  check_scalar(o.found_inf, at::kFloat, "found_inf");
  check_scalar(o.clip_coef, at::kFloat, "clip_coef");
  check_scalar(o.step_advance, at::kDouble, "step_advance");
  TORCH_CHECK(o.master_params.empty() || o.master_params.size() == n, "fused_sched: master_params has ",
              o.master_params.size(), " entries for ", n, " params");
  TORCH_CHECK(o.param_ids.empty() || o.param_ids.size() == n, "fused_sched: param_ids has ", o.param_ids.size(),
              " entries for ", n, " params");
  TORCH_CHECK(o.formats.empty() || o.formats.size() == n, "fused_sched: formats has ", o.formats.size(),
              " entries for ", n, " params");
  for (size_t i = 0; i < o.master_params.size(); ++i) {
    const at::Tensor& m = o.master_params[i];
    if (!m.defined() || m.numel() == 0) continue;
    const at::ScalarType dtype = has_master_remainder(format_of(o, i)) ? at::kShort : at::kFloat;
    if (checked) {
      TORCH_CHECK(m.numel() == params[i].numel() && m.scalar_type() == dtype, "fused_sched: master_params[", i,
                  "] does not match its parameter");
    } else {
      TORCH_CHECK(params[i].scalar_type() != at::kFloat, "fused_sched: master_params[", i,
                  "] given for a float32 parameter");
      check_companion(params[i], m, dtype, "master_params", i);
    }
  }
  StepExtras e;
  if (o.grad_scale.has_value() && o.grad_scale->defined()) {
    e.divide = true;
    e.grad_scale = *o.grad_scale->data_ptr<float>();
  }
  if (o.clip_coef.has_value() && o.clip_coef->defined()) {
    e.multiply = true;
    e.clip_coef = *o.clip_coef->data_ptr<float>();
  }
  return e;
}

// After every check: a step that found_inf skips changes nothing; a step that runs sets step_advance to 1 ("a step
// ran since the bound scheduler last cleared it").
bool skip_step(const StepOptions& o) {
  const bool skip = scalar_or<float>(o.found_inf, 0.0f) != 0.0f;
  if (!skip && o.step_advance.has_value() && o.step_advance->defined()) *o.step_advance->data_ptr<double>() = 1.0;
  return skip;
}

float* master_of(const StepOptions& o, size_t i) {
  if (o.master_params.empty() || has_master_remainder(format_of(o, i))) return nullptr;
  const at::Tensor& m = o.master_params[i];
  return m.defined() && m.numel() > 0 ? m.data_ptr<float>() : nullptr;
}

int64_t format_of(const StepOptions& o, size_t i) { return o.formats.empty() ? 0 : o.formats[i]; }

void set_formatted_slot(Bucket& b, const StepOptions& o, const at::Tensor& p, size_t i) {
  TensorSlot& slot = b.slots[i];
  const int64_t format = format_of(o, i);
  slot.master = master_of(o, i);  // null with the remainder bit: the int16 master is the FormatSlot's
  TORCH_CHECK(b.formats.size() == b.slots.size(), "fused_sched: the bucket holds no format slots");
  FormatSlot& f = b.formats[i];
  f = FormatSlot{};
  f.format = format;
  slot.formatted = &f;
  const int64_t moments = state_format_of(format);
  TORCH_CHECK(moments <= kFormatBlockwise8bit && (format & ~int64_t{0xFFFF}) == 0 && (format & 0xF8) == 0,
              "fused_sched: params[", i, "] has an unknown state format ", format);
  if (has_master_remainder(format)) {
    TORCH_CHECK(p.scalar_type() == at::kBFloat16 && !o.master_params.empty() && o.master_params[i].defined() &&
                    o.master_params[i].scalar_type() == at::kShort && o.master_params[i].numel() == p.numel(),
                "fused_sched: params[", i, "]: a remainder master is an int16 tensor laid out like a bfloat16 param");
    f.remainder = p.numel() > 0 ? o.master_params[i].data_ptr<int16_t>() : nullptr;
  }
  if (moments == kFormatBlockwise8bit) {
    const int64_t shift = (format >> kFormatBlockShift) & 0xFF;
    TORCH_CHECK(shift >= 5 && shift <= 8, "fused_sched: params[", i, "]: 8-bit block size 2^", shift,
                " outside 32..256");
    TORCH_CHECK(o.qmap.has_value() && o.qmap->defined() && o.qmap->device().is_cpu() &&
                    o.qmap->scalar_type() == at::kFloat && o.qmap->numel() == 4 * 256 && o.qmap->is_contiguous(),
                "fused_sched: 8-bit states need the contiguous float32 [4, 256] code table on the CPU");
    f.qmap = o.qmap->data_ptr<float>();
  }
}

void set_narrow_state(Bucket& b, int k, const StepOptions& o, const at::Tensor& p, const at::Tensor& s,
                      const char* what, size_t i, bool checked) {
  TensorSlot& slot = b.slots[i];
  FormatSlot& f = b.formats[i];
  const int64_t moments = state_format_of(f.format);
  TORCH_CHECK(k < 2 || moments != kFormatBlockwise8bit, "fused_sched: ", what, "[", i,
              "]: 8-bit moments are not combined with amsgrad");
  const at::ScalarType dtype = moments == kFormatBFloat16 ? at::kBFloat16 : at::kByte;
  if (checked) {
    TORCH_CHECK(s.numel() == p.numel() && s.scalar_type() == dtype, "fused_sched: ", what, "[", i,
                "] does not match its parameter and format");
  } else {
    check_companion(p, s, dtype, what, i);
  }
  (k == 0 ? slot.state0 : k == 1 ? slot.state1 : slot.state2) = nullptr;
  f.narrow[k] = p.numel() > 0 ? s.data_ptr() : nullptr;
  if (moments != kFormatBlockwise8bit) return;
  const at::TensorList absmax = k == 0 ? o.absmax0 : o.absmax1;
  const int64_t block = block_size_of(f.format);
  const int64_t blocks = (p.numel() + block - 1) / block;
  TORCH_CHECK(absmax.size() > i && absmax[i].defined() && absmax[i].device().is_cpu() &&
                  absmax[i].scalar_type() == at::kFloat && absmax[i].numel() == blocks && absmax[i].is_contiguous(),
              "fused_sched: ", what, "[", i, "] is 8-bit and needs a contiguous float32 CPU absmax of ", blocks,
              " elements");
  f.absmax[k] = blocks > 0 ? absmax[i].data_ptr<float>() : nullptr;
}

const KernelTable* find_kernels(const std::string& name) {
  const KernelTable* best = best_kernels();
  const KernelTable* candidates[] = {kernels_default(), kernels_avx2(), kernels_avx512()};
  for (const KernelTable* t : candidates) {
    if (t && name == t->name) {
      // Never hand out a capability the CPU lacks: it would die on an illegal instruction.
      if (t == kernels_avx512() && best != kernels_avx512()) return nullptr;
      if (t == kernels_avx2() && best == kernels_default()) return nullptr;
      return t;
    }
  }
  return nullptr;
}

std::string cpu_capability() { return active_kernels()->name; }

void set_cpu_capability(const std::string& name) {
  const KernelTable* t = find_kernels(name);
  TORCH_CHECK(t, "fused_sched: CPU capability '", name, "' is unknown or unsupported on this CPU (best: ",
              best_kernels()->name, ")");
  active_kernels() = t;
}

at::Tensor evaluate_schedule_cpu(const at::Tensor& schedule, const at::Tensor& schedule_step) {
  TORCH_CHECK(schedule.device().is_cpu() && schedule.scalar_type() == at::kDouble && schedule.dim() == 3 &&
                  schedule.size(2) == kScheduleColumns,
              "fused_sched: schedule must be a CPU float64 tensor [groups, segments, ", int(kScheduleColumns), "]");
  TORCH_CHECK(schedule_step.scalar_type() == at::kDouble && schedule_step.numel() == 1,
              "fused_sched: schedule_step must be a one-element float64 tensor");
  const at::Tensor table = schedule.contiguous();
  const double t = schedule_step.item<double>();
  at::Tensor out = at::full({table.size(0), 2}, NAN, at::kDouble);
  double* o = out.data_ptr<double>();
  for (int64_t g = 0; g < table.size(0); ++g) {
    evaluate_schedule(table.data_ptr<double>() + g * table.size(1) * kScheduleColumns, table.size(1), t, o + 2 * g);
  }
  return out;
}

// The registered operators check everything; OptimBucket calls the same functions with checked = true.
StepOptions make_options(std::optional<at::TensorList> master_params, const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef,
                         const std::optional<at::Tensor>& step_advance, at::IntArrayRef param_ids, int64_t sr_seed) {
  StepOptions o;
  if (master_params.has_value()) o.master_params = *master_params;
  o.grad_scale = grad_scale;
  o.found_inf = found_inf;
  o.clip_coef = clip_coef;
  o.step_advance = step_advance;
  o.param_ids = param_ids;
  o.sr_seed = sr_seed;
  return o;
}

TORCH_LIBRARY_IMPL(fused_sched, CPU, m) {
  m.impl("evaluate_schedule", &evaluate_schedule_cpu);
}

}  // namespace fused_sched::cpu
