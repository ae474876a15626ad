// Operator schemas of fused_sched (the mutated tensors carry alias annotations so that torch.compile, CUDA
// graphs and functionalization see the writes) and the Python module of the compiled extension.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/optim_cpu.h"
#include "optim_bucket.h"

TORCH_LIBRARY(fused_sched, m) {
  // Adam / AdamW over one (device, dtype) bucket. schedule / schedule_step (optional): the device schedule
  // programs (float64 [groups, segments, 16], schedule_math.h) and the scheduler's step counter. hyper: float64 [groups, kHyperColumns] (optim_math.h), row
  // group_index[i] applies to tensor i. max_exp_avg_sqs may be empty when no group uses amsgrad. steps are
  // float32 one-element tensors, incremented by the call.
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, Tensor hyper, int[] group_index, "
      "Tensor? schedule=None, Tensor? schedule_step=None) -> ()");
  // SGD over one bucket. momentum_buffers may be empty when no group uses momentum; fresh_buffers[i] != 0 marks a
  // buffer created by this step (torch then copies the gradient into it).
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor hyper, "
      "int[] group_index, int[] fresh_buffers, Tensor? schedule=None, Tensor? schedule_step=None) -> ()");
  // (lr, momentum) of every group's schedule program at schedule_step (schedule_math.h); NaN where unset.
  m.def("evaluate_schedule(Tensor schedule, Tensor schedule_step) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_sched compiled kernels (operators live under torch.ops.fused_sched)";
  m.def("cpu_capability", &fused_sched::cpu::cpu_capability, "CPU kernel variant in use: default, avx2 or avx512");
  m.def("set_cpu_capability", &fused_sched::cpu::set_cpu_capability,
        "Select the CPU kernel variant (tests and benchmarks); refuses one the CPU cannot run");
  pybind11::class_<fused_sched::OptimBucket>(m, "OptimBucket")
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<std::vector<at::Tensor>>, std::vector<at::Tensor>,
                          std::vector<int64_t>>())
      .def("refresh_grads", &fused_sched::OptimBucket::refresh_grads)
      .def("adam_step", &fused_sched::OptimBucket::adam_step, pybind11::arg("hyper"),
           pybind11::arg("schedule") = std::nullopt, pybind11::arg("schedule_step") = std::nullopt)
      .def("sgd_step", &fused_sched::OptimBucket::sgd_step, pybind11::arg("hyper"), pybind11::arg("fresh_buffers"),
           pybind11::arg("schedule") = std::nullopt, pybind11::arg("schedule_step") = std::nullopt)
      .def("address_table", &fused_sched::OptimBucket::address_table)
      .def("table_changed", &fused_sched::OptimBucket::table_changed)
      .def("release_grads", &fused_sched::OptimBucket::release_grads)
      .def("__len__", &fused_sched::OptimBucket::size);
  pybind11::class_<fused_sched::NoGradWatch>(m, "NoGradWatch")
      .def(pybind11::init<std::vector<at::Tensor>>())
      .def("still_none", &fused_sched::NoGradWatch::still_none);
  m.def("cuda_compiled", []() {
#ifdef FUSED_SCHED_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
