#include "optim_bucket.h"

#include <ATen/record_function.h>

#include <sstream>

#include "cpu/optim_cpu.h"
#include "fused_sched/optim_math.h"
#include "optim_checks.h"

namespace fused_sched {

OptimBucket::OptimBucket(std::vector<at::Tensor> params, std::vector<std::vector<at::Tensor>> states,
                         std::vector<at::Tensor> steps, std::vector<int64_t> group_index,
                         std::vector<at::Tensor> masters, std::vector<int64_t> param_ids)
    : params_(std::move(params)),
      states_(std::move(states)),
      steps_(std::move(steps)),
      group_index_(std::move(group_index)),
      masters_(std::move(masters)),
      param_ids_(std::move(param_ids)),
      dtype_(params_.empty() ? at::kFloat : params_[0].scalar_type()),
      device_(params_.empty() ? at::Device(at::kCPU) : params_[0].device()) {
  TORCH_CHECK(group_index_.size() == params_.size(), "fused_sched: one group index per param");
  for (const auto& list : states_) {
    TORCH_CHECK(list.empty() || list.size() == params_.size(), "fused_sched: one state tensor per param");
  }
  TORCH_CHECK(masters_.empty() || masters_.size() == params_.size(), "fused_sched: one master (or none) per param");
  TORCH_CHECK(param_ids_.size() == params_.size(), "fused_sched: one param id per param");
  for (size_t i = 0; i < masters_.size(); ++i) {
    const at::Tensor& m = masters_[i];
    if (m.defined() && m.numel() > 0) check_companion(params_[i], m, at::kFloat, "masters", i);
  }
  grads_.resize(params_.size());
  table_ = at::zeros({static_cast<int64_t>(params_.size()), kTableColumns}, at::kLong);
}

std::string OptimBucket::refresh_grads() {
  for (size_t i = 0; i < params_.size(); ++i) {
    const at::Tensor& p = params_[i];
    const at::Tensor& g = p.grad();
    auto fail = [&](const char* what) {
      std::ostringstream os;
      os << "param " << i << ": " << what;
      return os.str();
    };
    if (p.scalar_type() != dtype_ || p.device() != device_) return fail("dtype or device changed");
    if (!g.defined()) return fail("no grad");
    if (g.scalar_type() != dtype_ || g.device() != device_ || g.is_sparse()) return fail("grad dtype/device/layout");
    if (g.sizes() != p.sizes() || g.strides() != p.strides() || !p.is_non_overlapping_and_dense()) {
      return fail("grad layout differs from param");
    }
    for (const auto& list : states_) {
      if (!list.empty() && list[i].defined() && list[i].numel() != 0 && list[i].sizes() != p.sizes()) {
        return fail("param shape changed");
      }
    }
    if (!masters_.empty() && masters_[i].defined() && masters_[i].numel() != 0 &&
        (masters_[i].sizes() != p.sizes() || masters_[i].strides() != p.strides())) {
      return fail("param layout changed");
    }
  }
  // Every check passed: adopt the gradients and refresh the address table in the same pass.
  int64_t* t = table_.data_ptr<int64_t>();
  auto addr = [](const at::Tensor& x) -> int64_t {
    return x.defined() && x.numel() > 0 ? reinterpret_cast<int64_t>(x.data_ptr()) : 0;
  };
  bool changed = false;
  for (size_t i = 0; i < params_.size(); ++i) {
    grads_[i] = params_[i].grad();
    int64_t row[kTableColumns];
    row[kColParam] = addr(params_[i]);
    row[kColGrad] = addr(grads_[i]);
    for (size_t k = 0; k < 3; ++k) {
      row[kColState0 + k] = k < states_.size() && !states_[k].empty() ? addr(states_[k][i]) : 0;
    }
    row[kColStep] = steps_.empty() ? 0 : addr(steps_[i]);
    row[kColNumel] = params_[i].numel();
    row[kColGroup] = group_index_[i];
    row[kColMaster] = masters_.empty() ? 0 : addr(masters_[i]);
    row[kColParamId] = param_ids_[i];
    int64_t* dst = t + i * kTableColumns;
    for (int c = 0; c < kTableColumns; ++c) {
      changed |= dst[c] != row[c];
      dst[c] = row[c];
    }
  }
  table_changed_ = changed;
  return {};
}

namespace {
const std::vector<at::Tensor>& state_or_empty(const std::vector<std::vector<at::Tensor>>& states, size_t k) {
  static const std::vector<at::Tensor> empty;
  return k < states.size() ? states[k] : empty;
}
}  // namespace

cpu::StepOptions OptimBucket::options(const Amp& amp, int64_t sr_seed) const {
  cpu::StepOptions o;
  o.master_params = masters_;
  o.grad_scale = amp.grad_scale;
  o.found_inf = amp.found_inf;
  o.clip_coef = amp.clip_coef;
  o.step_advance = amp.step_advance;
  o.param_ids = param_ids_;
  o.sr_seed = sr_seed;
  return o;
}

void OptimBucket::adam_step(const at::Tensor& hyper, const std::optional<at::Tensor>& schedule,
                            const std::optional<at::Tensor>& schedule_step, const Amp& amp, int64_t sr_seed) {
  RECORD_FUNCTION("fused_sched::adam_step_", std::vector<c10::IValue>());
  TORCH_CHECK(device_.is_cpu(), "fused_sched: OptimBucket::adam_step runs CPU buckets");
  cpu::adam_step_cpu(params_, grads_, state_or_empty(states_, 0), state_or_empty(states_, 1),
                     state_or_empty(states_, 2), steps_, hyper, group_index_, schedule, schedule_step,
                     options(amp, sr_seed), /*checked=*/true);
  release_grads();
}

void OptimBucket::sgd_step(const at::Tensor& hyper, const std::vector<int64_t>& fresh_buffers,
                           const std::optional<at::Tensor>& schedule, const std::optional<at::Tensor>& schedule_step,
                           const Amp& amp) {
  RECORD_FUNCTION("fused_sched::sgd_step_", std::vector<c10::IValue>());
  TORCH_CHECK(device_.is_cpu(), "fused_sched: OptimBucket::sgd_step runs CPU buckets");
  cpu::sgd_step_cpu(params_, grads_, state_or_empty(states_, 0), hyper, group_index_, fresh_buffers, schedule,
                    schedule_step, options(amp, 0), /*checked=*/true);
  release_grads();
}

double OptimBucket::grad_norm_accumulate(double norm_type, double grad_scale) const {
  TORCH_CHECK(device_.is_cpu(), "fused_sched: OptimBucket::grad_norm_accumulate runs CPU buckets");
  return cpu::grad_norm_accumulate_cpu(grads_, norm_type, grad_scale);
}

bool NoGradWatch::still_none() const {
  for (const auto& p : params_) {
    if (p.grad().defined()) return false;
  }
  return true;
}

}  // namespace fused_sched
