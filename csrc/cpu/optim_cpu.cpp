// CPU implementation of fused_sched::adam_step_ and fused_sched::sgd_step_: one call updates every tensor of
// one (device, dtype) bucket, whatever param group each tensor belongs to. The work is cut into equal chunks
// spread over at::parallel_for, each chunk run by the vectorized kernel of the best CPU capability.
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
#include "optim_cpu.h"
#include "optim_cpu_kernels.h"

namespace fused_sched::cpu {
namespace {

// 16384-element chunks: with 2000 tensors of 256 elements and with GPT-2's 148 tensors both chunkings keep the
// two threads within 1% of each other on this 2-core machine; larger chunks unbalance the small-model case.
constexpr int64_t kChunkElements = 16384;
// Below this many elements in all, waking the thread pool costs more than it saves (measured ~15 us per wake).
constexpr int64_t kSerialElements = 32768;

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

// The hyper table with every scheduled group's lr and momentum / beta1 replaced by its program's value at the
// scheduler's step: computed once per call, so the kernels read plain rows.
at::Tensor effective_hyper(const at::Tensor& hyper, const std::optional<at::Tensor>& schedule,
                           const std::optional<at::Tensor>& schedule_step, bool adam) {
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
      r[g * kHyperColumns + (adam ? kBeta1 : kMomentum)] = value[kTargetMomentum];
    }
  }
  return rows;
}

struct Bucket {
  ParamType type;
  std::vector<TensorSlot> slots;
  std::vector<Chunk> chunks;
  int64_t total = 0;
};

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

void check_float_state(const at::Tensor& p, const at::Tensor& s, const char* what, size_t i, bool checked) {
  if (checked) {
    TORCH_CHECK(s.numel() == p.numel(), "fused_sched: ", what, "[", i, "] does not match its parameter");
  } else {
    check_companion(p, s, at::kFloat, what, i);
  }
}


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

// Checks StepOptions (optim_cpu.h) against the call's params; returns the gradient pre-scaling.
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
  for (size_t i = 0; i < o.master_params.size(); ++i) {
    const at::Tensor& m = o.master_params[i];
    if (!m.defined() || m.numel() == 0) continue;
    if (checked) {
      TORCH_CHECK(m.numel() == params[i].numel(), "fused_sched: master_params[", i, "] does not match its parameter");
    } else {
      TORCH_CHECK(params[i].scalar_type() != at::kFloat, "fused_sched: master_params[", i,
                  "] given for a float32 parameter");
      check_companion(params[i], m, at::kFloat, "master_params", i);
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
  if (o.master_params.empty()) return nullptr;
  const at::Tensor& m = o.master_params[i];
  return m.defined() && m.numel() > 0 ? m.data_ptr<float>() : nullptr;
}

}  // namespace

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

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList max_exp_avg_sqs, at::TensorList steps, const at::Tensor& hyper_table,
                   at::IntArrayRef group_index, const std::optional<at::Tensor>& schedule,
                   const std::optional<at::Tensor>& schedule_step, const StepOptions& options, bool checked) {
  const size_t n = params.size();
  // Every check runs before anything is written: a rejected call leaves parameters and state untouched.
  check_hyper(hyper_table, group_index, n);
  const at::Tensor hyper = effective_hyper(hyper_table, schedule, schedule_step, /*adam=*/true);
  TORCH_CHECK(exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n,
              "fused_sched: adam_step_ needs one exp_avg, exp_avg_sq and step per param (", n, " params, ",
              exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ", steps.size(), ")");
  TORCH_CHECK(max_exp_avg_sqs.size() == n || max_exp_avg_sqs.empty(), "fused_sched: max_exp_avg_sqs has ",
              max_exp_avg_sqs.size(), " entries for ", n, " params");
  Bucket b = make_bucket(params, grads, checked);
  const StepExtras extras = check_options(options, params, checked);
  const double* table = hyper.data_ptr<double>();
  std::vector<float> new_steps(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const double* row = table + group_index[i] * kHyperColumns;
    const bool amsgrad = hyper_flags(row) & kAmsgrad;
    check_float_state(p, exp_avgs[i], "exp_avgs", i, checked);
    check_float_state(p, exp_avg_sqs[i], "exp_avg_sqs", i, checked);
    b.slots[i].state0 = exp_avgs[i].data_ptr<float>();
    b.slots[i].state1 = exp_avg_sqs[i].data_ptr<float>();
    b.slots[i].state2 = nullptr;
    if (amsgrad) {
      TORCH_CHECK(!max_exp_avg_sqs.empty(), "fused_sched: amsgrad needs max_exp_avg_sqs");
      check_float_state(p, max_exp_avg_sqs[i], "max_exp_avg_sqs", i, checked);
      b.slots[i].state2 = max_exp_avg_sqs[i].data_ptr<float>();
    }
    const at::Tensor& s = steps[i];
    TORCH_CHECK(checked || (s.device().is_cpu() && s.scalar_type() == at::kFloat && s.numel() == 1),
                "fused_sched: steps[", i, "] must be a one-element float32 CPU tensor");
    // torch keeps the step as float32 and adds 1 in float32 before reading it.
    new_steps[i] = *s.data_ptr<float>() + 1.0f;
    b.slots[i].hyper = row;
    b.slots[i].step = static_cast<double>(new_steps[i]);
    b.slots[i].master = master_of(options, i);
    b.slots[i].stochastic = (hyper_flags(row) & kStochasticRounding) && b.slots[i].master == nullptr &&
                            b.type == ParamType::kBFloat16;
    if (b.slots[i].stochastic) {
      const int64_t id = options.param_ids.empty() ? static_cast<int64_t>(i) : options.param_ids[i];
      b.slots[i].rounding_key = rounding_key(static_cast<uint64_t>(options.sr_seed),
                                             static_cast<uint32_t>(new_steps[i]), static_cast<uint32_t>(id));
    }
  }
  if (skip_step(options)) return;
  make_chunks(b);
  const KernelTable* k = active_kernels();
  run_chunks(b, [&](int64_t first, int64_t last) {
    k->adam_chunks(b.type, b.slots.data(), b.chunks.data(), extras, first, last);
  });
  for (size_t i = 0; i < n; ++i) *steps[i].data_ptr<float>() = new_steps[i];
}

void sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  const at::Tensor& hyper_table, at::IntArrayRef group_index, at::IntArrayRef fresh_buffers,
                  const std::optional<at::Tensor>& schedule, const std::optional<at::Tensor>& schedule_step,
                  const StepOptions& options, bool checked) {
  const size_t n = params.size();
  check_hyper(hyper_table, group_index, n);
  const at::Tensor hyper = effective_hyper(hyper_table, schedule, schedule_step, /*adam=*/false);
  TORCH_CHECK(momentum_buffers.size() == n || momentum_buffers.empty(), "fused_sched: momentum_buffers has ",
              momentum_buffers.size(), " entries for ", n, " params");
  TORCH_CHECK(fresh_buffers.size() == n, "fused_sched: fresh_buffers has ", fresh_buffers.size(), " entries for ", n,
              " params");
  Bucket b = make_bucket(params, grads, checked);
  const StepExtras extras = check_options(options, params, checked);
  const double* table = hyper.data_ptr<double>();
  for (size_t i = 0; i < n; ++i) {
    const double* row = table + group_index[i] * kHyperColumns;
    b.slots[i].hyper = row;
    b.slots[i].master = master_of(options, i);
    b.slots[i].stochastic = false;  // SGD keeps no step to draw rounding bits from
    b.slots[i].fresh = fresh_buffers[i] != 0;
    b.slots[i].state0 = nullptr;
    if (row[kMomentum] != 0.0) {
      TORCH_CHECK(!momentum_buffers.empty(), "fused_sched: momentum needs momentum_buffers");
      check_float_state(params[i], momentum_buffers[i], "momentum_buffers", i, checked);
      b.slots[i].state0 = momentum_buffers[i].data_ptr<float>();
    }
    b.slots[i].state1 = b.slots[i].state2 = nullptr;
  }
  if (skip_step(options)) return;
  make_chunks(b);
  const KernelTable* k = active_kernels();
  run_chunks(b, [&](int64_t first, int64_t last) {
    k->sgd_chunks(b.type, b.slots.data(), b.chunks.data(), extras, first, last);
  });
}

double grad_norm_accumulate_cpu(at::TensorList grads, double norm_type, double grad_scale) {
  TORCH_CHECK(norm_type > 0.0, "fused_sched: norm_type must be positive or inf, got ", norm_type);
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.device().is_cpu() && g.is_non_overlapping_and_dense(), "fused_sched: grads[", i,
                "] must be a dense CPU tensor");
    for (int64_t s = 0; s < g.numel(); s += kChunkElements) {
      chunks.push_back({static_cast<int64_t>(i), s, std::min(g.numel(), s + kChunkElements)});
    }
  }
  const float scale = static_cast<float>(grad_scale);
  const bool divide = grad_scale != 1.0;  // x / 1 == x: skipping the division changes no bit
  const KernelTable* k = active_kernels();
  // One partial per chunk, combined in chunk order: the result does not depend on the thread count.
  std::vector<double> partial(chunks.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const Chunk& ch = chunks[c];
      const at::Tensor& g = grads[ch.tensor];
      partial[c] = k->grad_norm(param_type(g.scalar_type()), g.data_ptr(), ch.begin, ch.end, norm_type, scale,
                                divide);
    }
  });
  return combine_norm_parts(partial, norm_type);
}

double combine_norm_parts(const std::vector<double>& parts, double norm_type) {
  const bool inf_norm = std::isinf(norm_type);
  double total = 0.0;
  for (double p : parts) {
    if (inf_norm) {
      total = (std::isnan(p) || std::isnan(total)) ? NAN : std::max(total, p);
    } else {
      total += p;
    }
  }
  return total;
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

namespace {
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

void adam_step_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                  at::TensorList max_exp_avg_sqs, at::TensorList steps, const at::Tensor& hyper,
                  at::IntArrayRef group_index, const std::optional<at::Tensor>& schedule,
                  const std::optional<at::Tensor>& schedule_step, std::optional<at::TensorList> master_params,
                  const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                  const std::optional<at::Tensor>& clip_coef, const std::optional<at::Tensor>& step_advance,
                  at::IntArrayRef param_ids, int64_t sr_seed) {
  adam_step_cpu(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hyper, group_index, schedule,
                schedule_step,
                make_options(master_params, grad_scale, found_inf, clip_coef, step_advance, param_ids, sr_seed),
                /*checked=*/false);
}

void sgd_step_op(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                 const at::Tensor& hyper, at::IntArrayRef group_index, at::IntArrayRef fresh_buffers,
                 const std::optional<at::Tensor>& schedule, const std::optional<at::Tensor>& schedule_step,
                 std::optional<at::TensorList> master_params, const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef,
                 const std::optional<at::Tensor>& step_advance) {
  sgd_step_cpu(params, grads, momentum_buffers, hyper, group_index, fresh_buffers, schedule, schedule_step,
               make_options(master_params, grad_scale, found_inf, clip_coef, step_advance, at::IntArrayRef(), 0),
               /*checked=*/false);
}
}  // namespace

TORCH_LIBRARY_IMPL(fused_sched, CPU, m) {
  m.impl("evaluate_schedule", &evaluate_schedule_cpu);
  m.impl("adam_step_", &adam_step_op);
  m.impl("sgd_step_", &sgd_step_op);
}

}  // namespace fused_sched::cpu
