// CPU implementation of fused_sched::muon_step_: one of Muon's two elementwise passes over a bucket (muon_math.h;
// the work is spread as adam.cpp describes).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "fused_sched/muon_math.h"
#include "fused_sched/optim_math.h"
#include "muon.h"
#include "optim_checks.h"
#include "step_common.h"

namespace fused_sched::cpu {

void muon_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   at::TensorList updates, const std::vector<double>& lr_ratios, const at::Tensor& hyper_table,
                   at::IntArrayRef group_index, int64_t phase, const std::optional<at::Tensor>& schedule,
                   const std::optional<at::Tensor>& schedule_step, const StepOptions& options, bool checked) {
  const size_t n = params.size();
  TORCH_CHECK(phase == kMuonMomentumPass || phase == kMuonUpdatePass, "fused_sched: Muon phase must be 0 (momentum) "
              "or 1 (update), got ", phase);
  check_hyper(hyper_table, group_index, n);
  const at::Tensor hyper = effective_hyper(hyper_table, schedule, schedule_step, kMomentum);
  TORCH_CHECK(momentum_buffers.size() == n && updates.size() == n && lr_ratios.size() == n, "fused_sched: Muon needs "
              "one momentum buffer, update and lr ratio per param; got ", momentum_buffers.size(), ", ",
              updates.size(), " and ", lr_ratios.size(), " for ", n, " params");
  TORCH_CHECK(options.master_params.empty() && options.formats.empty(), "fused_sched: Muon keeps no master copies "
              "and no low-memory state formats");
  Bucket b = make_bucket(params, grads, checked);
  const StepExtras extras = check_options(options, params, checked);
  const double* table = hyper.data_ptr<double>();
  for (size_t i = 0; i < n; ++i) {
    TensorSlot& slot = b.slots[i];
    slot.hyper = table + group_index[i] * kHyperColumns;
    check_float_state(params[i], momentum_buffers[i], "momentum_buffers", i, checked);
    if (checked) {
      TORCH_CHECK(updates[i].numel() == params[i].numel(), "fused_sched: updates[", i, "] does not match its param");
    } else {
      check_companion(params[i], updates[i], at::kBFloat16, "updates", i);
    }
    slot.state0 = momentum_buffers[i].data_ptr<float>();
    slot.state1 = reinterpret_cast<float*>(updates[i].data_ptr<at::BFloat16>());  // muon_kernels.h muon_workspace
    slot.state2 = nullptr;
    slot.step = lr_ratios[i];
    slot.fresh = false;
    slot.master = nullptr;
    slot.stochastic = false;
    slot.formatted = nullptr;
  }
  // The momentum pass never reports a step to the scheduler: the update pass does, once per step.
  StepOptions pass = options;
  if (phase == kMuonMomentumPass) pass.step_advance.reset();
  if (skip_step(pass)) return;
  make_chunks(b);
  const KernelTable* k = active_kernels();
  const ChunksFn chunks_fn = phase == kMuonMomentumPass ? k->muon_momentum_chunks : k->muon_update_chunks;
  run_chunks(b, [&](int64_t first, int64_t last) {
    chunks_fn(b.type, b.slots.data(), b.chunks.data(), extras, first, last);
  });
}

namespace {
void muon_step_op(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, at::TensorList updates,
                  const at::Tensor& lr_ratios, const at::Tensor& hyper, at::IntArrayRef group_index, int64_t phase,
                  const std::optional<at::Tensor>& schedule, const std::optional<at::Tensor>& schedule_step,
                  const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                  const std::optional<at::Tensor>& clip_coef, const std::optional<at::Tensor>& step_advance) {
  TORCH_CHECK(lr_ratios.device().is_cpu() && lr_ratios.scalar_type() == at::kDouble && lr_ratios.dim() == 1 &&
                  lr_ratios.numel() == static_cast<int64_t>(params.size()),
              "fused_sched: lr_ratios must be a float64 CPU tensor of one element per param, got ",
              lr_ratios.scalar_type(), " ", lr_ratios.sizes(), " on ", lr_ratios.device());
  const at::Tensor ratios = lr_ratios.contiguous();
  const std::vector<double> values(ratios.data_ptr<double>(), ratios.data_ptr<double>() + ratios.numel());
  muon_step_cpu(params, grads, momentum_buffers, updates, values, hyper, group_index, phase, schedule, schedule_step,
                make_options(std::nullopt, grad_scale, found_inf, clip_coef, step_advance, at::IntArrayRef(), 0),
                /*checked=*/false);
}
}  // namespace

TORCH_LIBRARY_IMPL(fused_sched, CPU, m) {
  m.impl("muon_step_", &muon_step_op);
}

}  // namespace fused_sched::cpu
