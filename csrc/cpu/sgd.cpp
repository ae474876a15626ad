// CPU implementation of fused_sched::sgd_step_ (see adam.cpp for how the work is spread).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "fused_sched/optim_math.h"
#include "fused_sched/state_format_math.h"
#include "sgd.h"
#include "step_common.h"

namespace fused_sched::cpu {

void sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, at::TensorList steps,
                  const at::Tensor& hyper_table, at::IntArrayRef group_index, at::IntArrayRef fresh_buffers,
                  const std::optional<at::Tensor>& schedule, const std::optional<at::Tensor>& schedule_step,
                  const StepOptions& options, bool checked) {
  const size_t n = params.size();
  check_hyper(hyper_table, group_index, n);
  const at::Tensor hyper = effective_hyper(hyper_table, schedule, schedule_step, kMomentum);
  TORCH_CHECK(momentum_buffers.size() == n || momentum_buffers.empty(), "fused_sched: momentum_buffers has ",
              momentum_buffers.size(), " entries for ", n, " params");
  TORCH_CHECK(fresh_buffers.size() == n, "fused_sched: fresh_buffers has ", fresh_buffers.size(), " entries for ", n,
              " params");
  TORCH_CHECK(steps.size() == n || steps.empty(), "fused_sched: steps has ", steps.size(), " entries for ", n,
              " params");
  Bucket b = make_bucket(params, grads, checked);
  if (!options.formats.empty()) b.formats.resize(n);
  const StepExtras extras = check_options(options, params, checked);
  const double* table = hyper.data_ptr<double>();
  // The steps after this one's increment, of the params that have one.
  std::vector<float> new_steps(n, 0.0f);
  std::vector<float*> step_of(n, nullptr);
  for (size_t i = 0; i < n; ++i) {
    const double* row = table + group_index[i] * kHyperColumns;
    TensorSlot& slot = b.slots[i];
    slot.hyper = row;
    set_slot_format(b, options, params[i], i);
    slot.stochastic = false;  // SGD writes its params rounded to nearest even (or through a master)
    slot.fresh = fresh_buffers[i] != 0;
    slot.state0 = nullptr;
    if (row[kMomentum] != 0.0) {
      TORCH_CHECK(!momentum_buffers.empty(), "fused_sched: momentum needs momentum_buffers");
      set_slot_state(b, 0, options, params[i], momentum_buffers[i], "momentum_buffers", i, checked);
    }
    slot.state1 = slot.state2 = nullptr;
    if (!steps.empty() && steps[i].numel() > 0) {
      const at::Tensor& s = steps[i];
      TORCH_CHECK(checked || (s.device().is_cpu() && s.scalar_type() == at::kFloat && s.numel() == 1),
                  "fused_sched: steps[", i, "] must be a one-element float32 CPU tensor");
      step_of[i] = s.data_ptr<float>();
      new_steps[i] = *step_of[i] + 1.0f;  // float32, as Adam's step
    }
    FormatSlot* f = slot.formatted == nullptr ? nullptr : &b.formats[i];
    if (f == nullptr || state_format_of(f->format) != kFormatBFloat16) continue;
    // A bfloat16 momentum buffer: rounded to nearest even (kStateRoundNearest), else stochastically with bits
    // keyed, as Adam's moments, on (sr_seed, its step, param id): a step it needs.
    f->state_nearest = hyper_flags(row) & kStateRoundNearest;
    if (f->state_nearest || f->narrow[0] == nullptr) continue;  // nothing rounded stochastically (no momentum)
    TORCH_CHECK(step_of[i] != nullptr, "fused_sched: params[", i, "]: a bfloat16 momentum buffer rounded "
                "stochastically needs its step tensor");
    const int64_t id = options.param_ids.empty() ? static_cast<int64_t>(i) : options.param_ids[i];
    const uint32_t key = rounding_key(static_cast<uint64_t>(options.sr_seed), static_cast<uint32_t>(new_steps[i]),
                                      static_cast<uint32_t>(id));
    f->state_keys[0] = state_rounding_key(key, 0);
  }
  if (skip_step(options)) return;
  make_chunks(b);
  const KernelTable* k = active_kernels();
  run_chunks(b, [&](int64_t first, int64_t last) {
    k->sgd_chunks(b.type, b.slots.data(), b.chunks.data(), extras, first, last);
  });
  for (size_t i = 0; i < n; ++i) {
    if (step_of[i] != nullptr) *step_of[i] = new_steps[i];
  }
}

namespace {
void sgd_step_op(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                 const at::Tensor& hyper, at::IntArrayRef group_index, at::IntArrayRef fresh_buffers,
                 const std::optional<at::Tensor>& schedule, const std::optional<at::Tensor>& schedule_step,
                 std::optional<at::TensorList> master_params, const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef,
                 const std::optional<at::Tensor>& step_advance) {
  sgd_step_cpu(params, grads, momentum_buffers, at::TensorList(), hyper, group_index, fresh_buffers, schedule,
               schedule_step,
               make_options(master_params, grad_scale, found_inf, clip_coef, step_advance, at::IntArrayRef(), 0),
               /*checked=*/false);
}
}  // namespace

TORCH_LIBRARY_IMPL(fused_sched, CPU, m) {
  m.impl("sgd_step_", &sgd_step_op);
}

}  // namespace fused_sched::cpu
