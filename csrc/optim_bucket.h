// OptimBucket: the tensors of one (device, dtype) bucket held on the C++ side between steps.
//
// Passing tensor lists through the dispatcher from Python costs about 110 ns per tensor (measured: 1.37 ms for the
// six lists of a 2000-tensor Adam call on this 2-core machine, more than the update itself). The optimizers
// therefore build a bucket once, and each step only asks it to collect the current gradients from the
// parameters (in C++) and run. Buckets are rebuilt when the parameter set, a dtype, a device or the state
// changes; refresh_grads() reports any such change so that the Python side can rebuild.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace fused_sched {

class OptimBucket {
 public:
  // states[k][i]: the k-th state tensor of param i (Adam: exp_avg, exp_avg_sq, max_exp_avg_sq; SGD:
  // momentum_buffer); a list may be empty when no tensor needs it. steps: Adam's step tensors (may be empty).
  OptimBucket(std::vector<at::Tensor> params, std::vector<std::vector<at::Tensor>> states,
              std::vector<at::Tensor> steps, std::vector<int64_t> group_index);

  // Reads every parameter's .grad. Returns an empty string when all gradients are present and laid out like
  // their parameters and no parameter changed dtype, device or shape; otherwise a description of the first
  // difference (nothing is modified). On success it also refreshes the address table and records whether any
  // address in it changed (table_changed()).
  std::string refresh_grads();

  void adam_step(const at::Tensor& hyper, const std::optional<at::Tensor>& schedule,
                 const std::optional<at::Tensor>& schedule_step);
  void sgd_step(const at::Tensor& hyper, const std::vector<int64_t>& fresh_buffers,
                const std::optional<at::Tensor>& schedule, const std::optional<at::Tensor>& schedule_step);

  // int64 [n, 8] table of (param, grad, state0, state1, state2, step) addresses, numel and group index, on the
  // CPU; rows of absent states hold 0. Valid after refresh_grads(); the same tensor every time (the caller may
  // write column 5, which the next refresh_grads() overwrites with the step addresses, or 0).
  at::Tensor address_table() const { return table_; }
  // Whether the last refresh_grads() changed any entry of the address table.
  bool table_changed() const { return table_changed_; }

  int64_t size() const { return static_cast<int64_t>(params_.size()); }

  // Drops the bucket's references to the gradients once a step is launched, so that zero_grad(set_to_none=True)
  // frees them as it does with torch.optim (a held reference would keep a model's worth of gradients alive
  // through the next forward pass). The address table keeps only integers.
  void release_grads() {
    for (auto& g : grads_) g.reset();
  }

 private:
  std::vector<at::Tensor> params_;
  std::vector<at::Tensor> grads_;
  std::vector<std::vector<at::Tensor>> states_;
  std::vector<at::Tensor> steps_;
  std::vector<int64_t> group_index_;
  at::ScalarType dtype_;
  at::Device device_;
  at::Tensor table_;
  bool table_changed_ = true;
};

// True when no tensor in `params` has a gradient (the parameters that a plan skipped must still have none).
class NoGradWatch {
 public:
  explicit NoGradWatch(std::vector<at::Tensor> params) : params_(std::move(params)) {}
  bool still_none() const;

 private:
  std::vector<at::Tensor> params_;
};

}  // namespace fused_sched
