// Operator schemas of fused_sched (the mutated tensors carry alias annotations so that torch.compile, CUDA
// graphs and functionalization see the writes) and the Python module of the compiled extension.
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "cpu/grad_norm.h"
#include "cpu/step_common.h"
#include "fused_sched/optim_math.h"
#include "optim_bucket.h"
#include "optim_checks.h"

TORCH_LIBRARY(fused_sched, m) {
  // Adam / AdamW over one (device, dtype) bucket. schedule / schedule_step (optional): the device schedule
  // programs (float64 [groups, segments, 16], schedule_math.h) and the scheduler's step counter. hyper: float64
  // [groups, kHyperColumns] (optim_math.h), row group_index[i] applies to tensor i. max_exp_avg_sqs may be empty
  // when no group uses amsgrad. steps are float32 one-element tensors, incremented by the call. grads are written
  // (unscaled / clipped) when grad_scale or clip_coef is given, as torch's fused kernels do.
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor(h!)[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, Tensor hyper, int[] group_index, "
      "Tensor? schedule=None, Tensor? schedule_step=None, Tensor(f!)[]? master_params=None, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? clip_coef=None, Tensor(g!)? step_advance=None, "
      "int[] param_ids=[], int sr_seed=0) -> ()");
  // master_params .. sr_seed: the large-model options (csrc/cpu/step_common.h StepOptions): float32 master copies (an
  // empty tensor where a param has none), GradScaler's grad_scale / found_inf (a found_inf != 0 skips the whole step),
  // a fused clip's coefficient, the step_advance flag written for the device schedulers, and the stochastic rounding
  // stream's param ids and seed.
  // SGD over one bucket. momentum_buffers may be empty when no group uses momentum; fresh_buffers[i] != 0 marks a
  // buffer created by this step (torch then copies the gradient into it).
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor(e!)[] grads, Tensor(b!)[] momentum_buffers, Tensor hyper, "
      "int[] group_index, int[] fresh_buffers, Tensor? schedule=None, Tensor? schedule_step=None, "
      "Tensor(c!)[]? master_params=None, Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? clip_coef=None, "
      "Tensor(d!)? step_advance=None) -> ()");
  // Muon over one bucket, one pass of two (muon_math.h MuonPass): phase 0 updates the momentum buffers and writes
  // the (Nesterov) update to orthogonalize into `updates` (bfloat16, laid out like the params); phase 1 reads the
  // orthogonalized update back from `updates` and applies weight decay and the update. lr_ratios: float64 [n] on
  // the params' device, each param's adjust_lr_fn factor. found_inf != 0 skips both phases; phase 1 writes
  // step_advance. grads are written (unscaled / clipped) by phase 0 when grad_scale or clip_coef is given.
  m.def(
      "muon_step_(Tensor(a!)[] params, Tensor(e!)[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] updates, "
      "Tensor lr_ratios, Tensor hyper, int[] group_index, int phase, Tensor? schedule=None, "
      "Tensor? schedule_step=None, Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? clip_coef=None, "
      "Tensor(d!)? step_advance=None) -> ()");
  // (lr, momentum) of every group's schedule program at schedule_step (schedule_math.h); NaN where unset.
  m.def("evaluate_schedule(Tensor schedule, Tensor schedule_step) -> Tensor");
  // A fused clip's norm pass over the gradients of one or more buckets (bucket_sizes: how many of `grads` each
  // bucket holds, in order): float32 [total_norm, clip_coef] (optim_math.h total_norm_from, clip_coefficient),
  // computed exactly as the optimizers' eager CPU path does (each bucket accumulated on its own, the buckets
  // combined in order). grad_scale (optional float32, one element): the gradients are divided by it first. Used by
  // the optimizers' torch.compile path; the fake implementation is registered from Python (fused_sched/_extension.py).
  m.def(
      "grad_norm_clip(Tensor[] grads, int[] bucket_sizes, float norm_type, float max_norm, "
      "Tensor? grad_scale=None) -> Tensor");
  // The CUDA kernels on a bucket's device-resident tables (csrc/cuda/launch_common.h: the Triton backend's address
  // table, chunk map and ticket counter), for the optimizers' eager step (fused_sched/backends/cuda_backend.py).
  // Implemented for CUDA tensors only (csrc/cuda/*_torch.cpp). The parameters, gradients, states, steps
  // and master copies they write are reached through the table's addresses, which the dispatcher cannot see:
  // these ops are for eager calls (and CUDA-graph capture) only; torch.compile traces adam_step_ / sgd_step_,
  // whose schemas name every written tensor. param_dtype: the dtype of the bucket's parameters.
  m.def(
      "cuda_adam_tables_(Tensor table, Tensor chunks, int chunk_elements, ScalarType param_dtype, Tensor hyper, "
      "Tensor(a!) counter, Tensor? schedule=None, Tensor? schedule_step=None, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor? clip_coef=None, Tensor(b!)? step_advance=None, int sr_seed=0) -> ()");
  // SGD: the kernel also clears the table's fresh-buffer flags (column 14), hence table(c!); sr_seed keys the
  // stochastic rounding of bfloat16 momentum buffers (with the steps that column 5 points to).
  m.def(
      "cuda_sgd_tables_(Tensor(c!) table, Tensor chunks, int chunk_elements, ScalarType param_dtype, Tensor hyper, "
      "Tensor(a!) counter, Tensor? schedule=None, Tensor? schedule_step=None, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor? clip_coef=None, Tensor(b!)? step_advance=None, int sr_seed=0) -> ()");
  // Muon: one pass (phase, as muon_step_) on the tables; column 5 holds the address of each row's float64 lr ratio and
  // state1 the address of its bfloat16 workspace.
  m.def(
      "cuda_muon_tables_(Tensor table, Tensor chunks, int chunk_elements, ScalarType param_dtype, Tensor hyper, "
      "Tensor(a!) counter, Tensor? schedule=None, Tensor? schedule_step=None, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor? clip_coef=None, Tensor(b!)? step_advance=None, int phase=0) -> ()");
  // A fused clip's norm pass over one bucket's tables (csrc/cuda/grad_norm.h launch_grad_norm_tables): writes its
  // partial sums at partials[slot_offset ...] and returns how many slots it used (a host value: the grid size, no
  // sync); the launch with finalize=True writes out = float32 [total_norm, clip_coef]. partials must hold slot_offset +
  // max(1, n_chunks) float64s.
  m.def(
      "cuda_grad_norm_tables_(Tensor table, Tensor chunks, int chunk_elements, ScalarType grad_dtype, "
      "Tensor(a!) partials, int slot_offset, Tensor(b!) counter, Tensor(c!) out, Tensor? grad_scale, "
      "float norm_type, float max_norm, bool finalize) -> int");
}

namespace {
at::Tensor grad_norm_clip_cpu(at::TensorList grads, at::IntArrayRef bucket_sizes, double norm_type, double max_norm,
                              const std::optional<at::Tensor>& grad_scale) {
  fused_sched::check_norm_clip_args(bucket_sizes, grads.size(), norm_type);
  double divide = 1.0;
  if (grad_scale.has_value() && grad_scale->defined()) {
    const at::Tensor& s = *grad_scale;
    TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.numel() == 1,
                "fused_sched: grad_scale must be a one-element float32 CPU tensor");
    divide = static_cast<double>(*s.data_ptr<float>());
  }
  // Each bucket accumulated on its own, then combined as FusedOptimizer._clip_pass combines them.
  std::vector<double> parts;
  int64_t offset = 0;
  for (int64_t n : bucket_sizes) {
    parts.push_back(fused_sched::cpu::grad_norm_accumulate_cpu(grads.slice(offset, n), norm_type, divide));
    offset += n;
  }
  const double accumulated = fused_sched::cpu::combine_norm_parts(parts, norm_type);
  const float total = fused_sched::total_norm_from(accumulated, norm_type);
  const float coef = fused_sched::clip_coefficient(total, static_cast<float>(max_norm));
  at::Tensor out = at::empty({2}, at::kFloat);
  out.data_ptr<float>()[0] = total;
  out.data_ptr<float>()[1] = coef;
  return out;
}
}  // namespace

TORCH_LIBRARY_IMPL(fused_sched, CPU, m) { m.impl("grad_norm_clip", &grad_norm_clip_cpu); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_sched compiled kernels (operators live under torch.ops.fused_sched)";
  m.def("cpu_capability", &fused_sched::cpu::cpu_capability, "CPU kernel variant in use: default, avx2 or avx512");
  m.def("set_cpu_capability", &fused_sched::cpu::set_cpu_capability,
        "Select the CPU kernel variant (tests and benchmarks); refuses one the CPU cannot run");
  pybind11::class_<fused_sched::OptimBucket>(m, "OptimBucket")
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<std::vector<at::Tensor>>, std::vector<at::Tensor>,
                          std::vector<int64_t>, std::vector<at::Tensor>, std::vector<int64_t>, std::vector<int64_t>,
                          std::vector<std::vector<at::Tensor>>, std::optional<at::Tensor>>(),
           pybind11::arg("params"), pybind11::arg("states"), pybind11::arg("steps"), pybind11::arg("group_index"),
           pybind11::arg("masters"), pybind11::arg("param_ids"), pybind11::arg("formats") = std::vector<int64_t>{},
           pybind11::arg("absmax") = std::vector<std::vector<at::Tensor>>{}, pybind11::arg("qmap") = std::nullopt)
      // Without the GIL: refresh_grads may run on several threads, and any of them may need the GIL (a tensor
      // subclass whose sizes come from Python, the last reference to a tensor with a Python object).
      .def("refresh_grads", &fused_sched::OptimBucket::refresh_grads, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def(
          "adam_step",
          [](fused_sched::OptimBucket& b, const at::Tensor& hyper, const std::optional<at::Tensor>& schedule,
             const std::optional<at::Tensor>& schedule_step, const std::optional<at::Tensor>& grad_scale,
             const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef,
             const std::optional<at::Tensor>& step_advance, int64_t sr_seed) {
            b.adam_step(hyper, schedule, schedule_step, {grad_scale, found_inf, clip_coef, step_advance}, sr_seed);
          },
          pybind11::arg("hyper"), pybind11::arg("schedule") = std::nullopt,
          pybind11::arg("schedule_step") = std::nullopt, pybind11::arg("grad_scale") = std::nullopt,
          pybind11::arg("found_inf") = std::nullopt, pybind11::arg("clip_coef") = std::nullopt,
          pybind11::arg("step_advance") = std::nullopt, pybind11::arg("sr_seed") = 0)
      .def(
          "sgd_step",
          [](fused_sched::OptimBucket& b, const at::Tensor& hyper, const std::vector<int64_t>& fresh_buffers,
             const std::optional<at::Tensor>& schedule, const std::optional<at::Tensor>& schedule_step,
             const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
             const std::optional<at::Tensor>& clip_coef, const std::optional<at::Tensor>& step_advance,
             int64_t sr_seed) {
            b.sgd_step(hyper, fresh_buffers, schedule, schedule_step, {grad_scale, found_inf, clip_coef, step_advance},
                       sr_seed);
          },
          pybind11::arg("hyper"), pybind11::arg("fresh_buffers"), pybind11::arg("schedule") = std::nullopt,
          pybind11::arg("schedule_step") = std::nullopt, pybind11::arg("grad_scale") = std::nullopt,
          pybind11::arg("found_inf") = std::nullopt, pybind11::arg("clip_coef") = std::nullopt,
          pybind11::arg("step_advance") = std::nullopt, pybind11::arg("sr_seed") = 0)
      .def(
          "muon_step",
          [](fused_sched::OptimBucket& b, const at::Tensor& hyper, int64_t phase,
             const std::optional<at::Tensor>& schedule, const std::optional<at::Tensor>& schedule_step,
             const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
             const std::optional<at::Tensor>& clip_coef, const std::optional<at::Tensor>& step_advance) {
            b.muon_step(hyper, phase, schedule, schedule_step, {grad_scale, found_inf, clip_coef, step_advance});
          },
          pybind11::arg("hyper"), pybind11::arg("phase"), pybind11::arg("schedule") = std::nullopt,
          pybind11::arg("schedule_step") = std::nullopt, pybind11::arg("grad_scale") = std::nullopt,
          pybind11::arg("found_inf") = std::nullopt, pybind11::arg("clip_coef") = std::nullopt,
          pybind11::arg("step_advance") = std::nullopt)
      .def("grad_norm_accumulate", &fused_sched::OptimBucket::grad_norm_accumulate, pybind11::arg("norm_type"),
           pybind11::arg("grad_scale") = 1.0)
      .def("address_table", &fused_sched::OptimBucket::address_table)
      .def("table_changed", &fused_sched::OptimBucket::table_changed)
      .def("mark_table_uploaded", &fused_sched::OptimBucket::mark_table_uploaded)
      .def("release_grads", &fused_sched::OptimBucket::release_grads)
      .def("__len__", &fused_sched::OptimBucket::size);
  pybind11::class_<fused_sched::NoGradWatch>(m, "NoGradWatch")
      .def(pybind11::init<std::vector<at::Tensor>>())
      .def("still_none", &fused_sched::NoGradWatch::still_none);
  m.def(
      "clip_coefficients",
      [](double accumulated, double norm_type, double max_norm) {
        const float total = fused_sched::total_norm_from(accumulated, norm_type);
        return std::make_tuple(total, fused_sched::clip_coefficient(total, static_cast<float>(max_norm)));
      },
      "(total_norm, clip_coef) in float32 from a fused clip's accumulated norm (optim_math.h)");
  m.def("combine_norm_parts", &fused_sched::cpu::combine_norm_parts, pybind11::arg("parts"),
        pybind11::arg("norm_type"), "A fused clip's accumulation of several buckets from theirs (cpu/grad_norm.h)");
  m.def("rounding_key", &fused_sched::rounding_key, "optim_math.h rounding_key (tests)");
  m.def("rounding_bits", &fused_sched::rounding_bits, "optim_math.h rounding_bits (tests)");
  m.def("cuda_compiled", []() {
#ifdef FUSED_SCHED_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
