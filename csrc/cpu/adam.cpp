// CPU implementation of fused_sched::adam_step_: one call updates every tensor of one (device, dtype) bucket, whatever
// param group each tensor belongs to. The work is cut into equal chunks spread over at::parallel_for, each chunk run by
// the vectorized kernel of the best CPU capability.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "adam.h"
#include "fused_sched/optim_math.h"
#include "fused_sched/state_format_math.h"
#include "optim_checks.h"
#include "step_common.h"

namespace fused_sched::cpu {

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList max_exp_avg_sqs, at::TensorList steps, const at::Tensor& hyper_table,
                   at::IntArrayRef group_index, const std::optional<at::Tensor>& schedule,
                   const std::optional<at::Tensor>& schedule_step, const StepOptions& options, bool checked) {
  const size_t n = params.size();
  // Every check runs before anything is written: a rejected call leaves parameters and state untouched.
  check_hyper(hyper_table, group_index, n);
  const at::Tensor hyper = effective_hyper(hyper_table, schedule, schedule_step, kBeta1);
  TORCH_CHECK(exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n,
              "fused_sched: adam_step_ needs one exp_avg, exp_avg_sq and step per param (", n, " params, ",
              exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ", steps.size(), ")");
  TORCH_CHECK(max_exp_avg_sqs.size() == n || max_exp_avg_sqs.empty(), "fused_sched: max_exp_avg_sqs has ",
              max_exp_avg_sqs.size(), " entries for ", n, " params");
  Bucket b = make_bucket(params, grads, checked);
  if (!options.formats.empty()) b.formats.resize(n);
  const StepExtras extras = check_options(options, params, checked);
  const double* table = hyper.data_ptr<double>();
  std::vector<float> new_steps(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const double* row = table + group_index[i] * kHyperColumns;
    const bool amsgrad = hyper_flags(row) & kAmsgrad;
    TensorSlot& slot = b.slots[i];
    set_slot_format(b, options, p, i);
    set_slot_state(b, 0, options, p, exp_avgs[i], "exp_avgs", i, checked);
    set_slot_state(b, 1, options, p, exp_avg_sqs[i], "exp_avg_sqs", i, checked);
    slot.state2 = nullptr;
    if (amsgrad) {
      TORCH_CHECK(!max_exp_avg_sqs.empty(), "fused_sched: amsgrad needs max_exp_avg_sqs");
      set_slot_state(b, 2, options, p, max_exp_avg_sqs[i], "max_exp_avg_sqs", i, checked);
    }
    const at::Tensor& s = steps[i];
    TORCH_CHECK(checked || (s.device().is_cpu() && s.scalar_type() == at::kFloat && s.numel() == 1),
                "fused_sched: steps[", i, "] must be a one-element float32 CPU tensor");
    // torch keeps the step as float32 and adds 1 in float32 before reading it.
    new_steps[i] = *s.data_ptr<float>() + 1.0f;
    b.slots[i].hyper = row;
    b.slots[i].step = static_cast<double>(new_steps[i]);
    // A remainder master decides the param as a float32 master does: no stochastic rounding of the param.
    FormatSlot* f = slot.formatted == nullptr ? nullptr : &b.formats[i];
    slot.stochastic = (hyper_flags(row) & kStochasticRounding) && slot.master == nullptr &&
                      (f == nullptr || f->remainder == nullptr) && b.type == ParamType::kBFloat16;
    bool state_keys = false;
    if (f != nullptr) {
      f->state_nearest = hyper_flags(row) & kStateRoundNearest;
      state_keys = state_format_of(f->format) == kFormatBFloat16 && !f->state_nearest;
    }
    if (slot.stochastic || state_keys) {
      const int64_t id = options.param_ids.empty() ? static_cast<int64_t>(i) : options.param_ids[i];
      slot.rounding_key = rounding_key(static_cast<uint64_t>(options.sr_seed), static_cast<uint32_t>(new_steps[i]),
                                       static_cast<uint32_t>(id));
      for (int k = 0; k < 3 && state_keys; ++k) f->state_keys[k] = state_rounding_key(slot.rounding_key, k);
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

namespace {
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

}  // namespace

TORCH_LIBRARY_IMPL(fused_sched, CPU, m) {
  m.impl("adam_step_", &adam_step_op);
}

}  // namespace fused_sched::cpu
