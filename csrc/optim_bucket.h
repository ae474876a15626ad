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

#include "cpu/step_common.h"

namespace fused_sched {

class OptimBucket {
 public:
  // states[k][i]: the k-th state tensor of param i (Adam: exp_avg, exp_avg_sq, max_exp_avg_sq; SGD:
  // momentum_buffer); a list may be empty when no tensor needs it. steps: Adam's step tensors; SGD's, one per
  // param (an empty tensor for none) where a bfloat16 momentum is rounded stochastically; may be empty.
  // masters: empty, or one per param: its float32 master copy (master_weights) or an undefined / empty tensor.
  // param_ids: each param's index in the optimizer (stochastic rounding keys its random bits on it).
  // State formats (docs/state_formats.md): formats: empty (all float32) or one kColFormat value per param; a state
  // and a master are then of the dtype the format says (uint8 codes, bfloat16, float32; an int16 remainder
  // master). absmax: empty, or two lists (of state0, of state1), each empty or one float32 tensor per param of
  // ceil(numel / block) elements where the param's states are 8-bit (an empty tensor elsewhere). qmap: the float32
  // [4, 256] code table, needed when a param is 8-bit.
  OptimBucket(std::vector<at::Tensor> params, std::vector<std::vector<at::Tensor>> states,
              std::vector<at::Tensor> steps, std::vector<int64_t> group_index, std::vector<at::Tensor> masters,
              std::vector<int64_t> param_ids, std::vector<int64_t> formats = {},
              std::vector<std::vector<at::Tensor>> absmax = {}, std::optional<at::Tensor> qmap = std::nullopt);

  // Reads every parameter's .grad. Returns an empty string when all gradients are present and laid out like
  // their parameters and no parameter changed dtype, device or shape; otherwise a description of the first
  // difference, after which the bucket must not be used again (its table is half refreshed: the optimizers
  // rebuild their plan). On success it has refreshed the address table and recorded whether any address in it
  // changed (table_changed()); a CPU bucket also holds the gradients for its kernels until release_grads().
  std::string refresh_grads();

  // The step on a CPU bucket; `amp` holds the optional per-step tensors (grad_scale, found_inf, clip_coef,
  // step_advance) of cpu::StepOptions.
  struct Amp {
    std::optional<at::Tensor> grad_scale, found_inf, clip_coef, step_advance;
  };
  void adam_step(const at::Tensor& hyper, const std::optional<at::Tensor>& schedule,
                 const std::optional<at::Tensor>& schedule_step, const Amp& amp, int64_t sr_seed);
  // SGD: steps, where given, are the float32 steps of bfloat16 momentum buffers (an empty tensor elsewhere).
  void sgd_step(const at::Tensor& hyper, const std::vector<int64_t>& fresh_buffers,
                const std::optional<at::Tensor>& schedule, const std::optional<at::Tensor>& schedule_step,
                const Amp& amp, int64_t sr_seed);
  // One of Muon's two passes (muon_math.h MuonPass) on a CPU bucket built with states [momentum_buffers, bfloat16
  // workspaces] and steps = one-element float64 lr ratios. The gradients are held until the update pass.
  void muon_step(const at::Tensor& hyper, int64_t phase, const std::optional<at::Tensor>& schedule,
                 const std::optional<at::Tensor>& schedule_step, const Amp& amp);
  // The bucket's share of a fused clip's norm (cpu::grad_norm_accumulate_cpu) over the gradients of the last
  // refresh_grads(); CPU buckets.
  double grad_norm_accumulate(double norm_type, double grad_scale) const;

  // int64 [n, kTableColumns] address table (optim_math.h TableColumn): param, grad, state0-2, step addresses,
  // numel, group index, master address, param id, state format, absmax0/1 and code table addresses, on the CPU; absent tensors hold 0. Valid after
  // refresh_grads(); the same tensor every time (the caller may set SGD's fresh flags, column kColFresh, for
  // one upload: the next refresh_grads() clears them).
  at::Tensor address_table() const { return table_; }
  // Whether the last refresh_grads() changed any entry of the address table.
  bool table_changed() const { return table_changed_; }
  // The device copy of the table now matches the host table: table_changed() is false until the next
  // refresh_grads() changes an entry (a norm pass and the update of one step upload a changed table once).
  void mark_table_uploaded() { table_changed_ = false; }

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
  std::vector<at::Tensor> masters_;
  std::vector<int64_t> param_ids_;
  std::vector<int64_t> formats_;
  std::vector<std::vector<at::Tensor>> absmax_;
  std::optional<at::Tensor> qmap_;
  at::ScalarType dtype_;
  at::Device device_;
  at::Tensor table_;
  bool table_changed_ = true;
  // Each param's sizes and strides when the bucket was built (its states and master copy have that layout).
  struct Layout {
    std::vector<int64_t> sizes, strides;
  };
  std::vector<Layout> layouts_;

  cpu::StepOptions options(const Amp& amp, int64_t sr_seed) const;
  // The checks of params[i]'s state format, its states', absmax and code table dtypes and sizes.
  void check_state_format(size_t i) const;
  // refresh_grads() over params [begin, end): nullptr, or the problem found first and its index in *failed;
  // *changed: whether a table entry changed.
  const char* refresh_range(size_t begin, size_t end, size_t* failed, bool* changed);
  // Params per thread of refresh_grads (at::parallel_for's grain); fewer than twice this run on the caller's thread.
  // Measured on the 2-core CI machine, 2000 Adam tensors: one thread 52 us; grain 256: 32-69 us (thread start-up
  // dominates some calls); 512: 27-30 us; 1000: 25-26 us. 512 lets a 2000-tensor bucket use 4 threads on a larger
  // host while a GPT-2-sized bucket (148 tensors) stays on the caller's thread.
  static constexpr int64_t kRefreshGrain = 512;
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
