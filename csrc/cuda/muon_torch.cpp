// CUDA implementations of fused_sched::muon_step_ and cuda_muon_tables_ (schemas in csrc/fused_sched_ops.cpp): torch
// glue around the torch-free launcher of muon.cu; common_torch.h says what the glue of every optimizer shares.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "common_torch.h"
#include "fused_sched/muon_math.h"
#include "fused_sched/optim_math.h"
#include "muon.h"
#include "optim_checks.h"

namespace fused_sched::cuda {
namespace {

void check_phase(int64_t phase) {
  TORCH_CHECK(phase == kMuonMomentumPass || phase == kMuonUpdatePass, "fused_sched: Muon's phase is 0 (momentum) or ",
              "1 (update), got ", phase);
}

// Only the update pass completes a step: the momentum pass neither checks nor writes step_advance's value.
std::optional<at::Tensor> pass_step_advance(int64_t phase, const std::optional<at::Tensor>& step_advance) {
  return phase == kMuonUpdatePass ? step_advance : std::nullopt;
}

void muon_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    at::TensorList updates, const at::Tensor& lr_ratios, const at::Tensor& hyper,
                    at::IntArrayRef group_index, int64_t phase, const std::optional<at::Tensor>& schedule,
                    const std::optional<at::Tensor>& schedule_step, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef,
                    const std::optional<at::Tensor>& step_advance) {
  const size_t n = params.size();
  // Every check runs before anything is queued: a rejected call leaves parameters and state untouched.
  check_phase(phase);
  const at::Device device = check_params(params, grads, hyper);
  check_hyper(hyper, group_index, n, device);
  const Schedule sched = check_schedule(hyper, schedule, schedule_step);
  TORCH_CHECK(momentum_buffers.size() == n && updates.size() == n, "fused_sched: muon_step_ needs one momentum_buffer ",
              "and one update per param (", n, " params, ", momentum_buffers.size(), ", ", updates.size(), ")");
  for (size_t i = 0; i < n; ++i) {
    check_companion(params[i], momentum_buffers[i], at::kFloat, "momentum_buffers", i);
    check_companion(params[i], updates[i], at::kBFloat16, "updates", i);
  }
  // The kernels read each ratio at its address (the table's column 5), so the float64 values must be packed.
  TORCH_CHECK(lr_ratios.device() == device && lr_ratios.scalar_type() == at::kDouble && lr_ratios.dim() == 1 &&
                  lr_ratios.numel() == static_cast<int64_t>(n) && lr_ratios.is_contiguous(),
              "fused_sched: lr_ratios must be a contiguous float64 tensor [", n, "] on ", device, ", got ",
              lr_ratios.scalar_type(), " ", lr_ratios.sizes(), " on ", lr_ratios.device());
  const std::optional<at::Tensor> advance = pass_step_advance(phase, step_advance);
  // No master weights, no stochastic rounding: no masters, no param ids, no seed.
  const CheckedOptions options = check_options(params, device, std::nullopt, grad_scale, found_inf, clip_coef,
                                               advance, at::IntArrayRef(), 0);
  const c10::cuda::CUDAGuard guard(device);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  if (n == 0) {
    record_step_advance(advance, found_inf);
    return;
  }
  const ParamDtype dtype = param_dtype(params[0].scalar_type());
  const double* const ratios = lr_ratios.data_ptr<double>();
  DeviceTables d = upload_tables(params, device, [&](size_t i, int64_t* row) {
    row[kColParam] = address(params[i]);
    row[kColGrad] = address(grads[i]);
    row[kColState0] = address(momentum_buffers[i]);
    row[kColState1] = address(updates[i]);
    row[kColState2] = 0;
    row[kColStep] = reinterpret_cast<int64_t>(ratios + i);
    row[kColNumel] = params[i].numel();
    row[kColGroup] = group_index[i];
    row[kColMaster] = 0;
    row[kColParamId] = static_cast<int64_t>(i);
  });
  C10_CUDA_CHECK(launch_muon_tables(dtype, d.table, d.n_rows, d.chunks, d.n_chunks, kDefaultChunkElements,
                                    hyper.data_ptr<double>(), sched.program, sched.segments, sched.step,
                                    ticket_counter(stream), phase, stream.stream(), options.launch));
}

void muon_tables_cuda(const at::Tensor& table, const at::Tensor& chunks, int64_t chunk_elements,
                      at::ScalarType param_type, const at::Tensor& hyper, const at::Tensor& counter,
                      const std::optional<at::Tensor>& schedule, const std::optional<at::Tensor>& schedule_step,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                      const std::optional<at::Tensor>& clip_coef, const std::optional<at::Tensor>& step_advance,
                      int64_t phase) {
  check_phase(phase);
  const std::optional<at::Tensor> advance = pass_step_advance(phase, step_advance);
  const TableLaunch l = check_table_launch(table, chunks, chunk_elements, param_type, hyper, counter, schedule,
                                           schedule_step, grad_scale, found_inf, clip_coef, advance, 0);
  launch_on_tables(l, advance, found_inf, [&](const Tables& t, cudaStream_t stream) {
    return launch_muon_tables(l.dtype, t.table, t.n_rows, t.chunks, t.n_chunks, chunk_elements, l.hyper,
                              l.schedule.program, l.schedule.segments, l.schedule.step, l.counter, phase, stream,
                              l.options);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_sched, CUDA, m) {
  m.impl("muon_step_", &muon_step_cuda);
  m.impl("cuda_muon_tables_", &muon_tables_cuda);
}

}  // namespace fused_sched::cuda
