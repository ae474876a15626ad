// CUDA implementations of fused_sched::adam_step_ and cuda_adam_tables_ (schemas in csrc/fused_sched_ops.cpp): torch
// glue around the torch-free launchers of adam.cu; common_torch.h says what the glue of every optimizer shares.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "common_torch.h"
#include "fused_sched/optim_math.h"
#include "optim_checks.h"
#include "adam.h"

namespace fused_sched::cuda {
namespace {

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList steps, const at::Tensor& hyper,
                    at::IntArrayRef group_index, const std::optional<at::Tensor>& schedule,
                    const std::optional<at::Tensor>& schedule_step, std::optional<at::TensorList> master_params,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::Tensor>& clip_coef, const std::optional<at::Tensor>& step_advance,
                    at::IntArrayRef param_ids, int64_t sr_seed) {
  const size_t n = params.size();
  // Every check runs before anything is queued: a rejected call leaves parameters and state untouched.
  const at::Device device = check_params(params, grads, hyper);
  check_hyper(hyper, group_index, n, device);
  const Schedule sched = check_schedule(hyper, schedule, schedule_step);
  TORCH_CHECK(exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n,
              "fused_sched: adam_step_ needs one exp_avg, exp_avg_sq and step per param (", n, " params, ",
              exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ", steps.size(), ")");
  TORCH_CHECK(max_exp_avg_sqs.size() == n || max_exp_avg_sqs.empty(), "fused_sched: max_exp_avg_sqs has ",
              max_exp_avg_sqs.size(), " entries for ", n, " params");
  for (size_t i = 0; i < n; ++i) {
    check_companion(params[i], exp_avgs[i], at::kFloat, "exp_avgs", i);
    check_companion(params[i], exp_avg_sqs[i], at::kFloat, "exp_avg_sqs", i);
    const at::Tensor& s = steps[i];
    TORCH_CHECK(s.device() == device && s.scalar_type() == at::kFloat && s.numel() == 1, "fused_sched: steps[", i,
                "] must be a one-element float32 tensor on ", device);
  }
  std::vector<int64_t> max_sqs(n);
  for (size_t i = 0; i < n; ++i) max_sqs[i] = optional_state(params[i], max_exp_avg_sqs, "max_exp_avg_sqs", i);
  const CheckedOptions options = check_options(params, device, master_params, grad_scale, found_inf, clip_coef,
                                               step_advance, param_ids, sr_seed);
  const c10::cuda::CUDAGuard guard(device);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  if (n == 0) {
    record_step_advance(step_advance, found_inf);
    return;
  }
  const ParamDtype dtype = param_dtype(params[0].scalar_type());
  DeviceTables d = upload_tables(params, device, [&](size_t i, int64_t* row) {
    row[kColParam] = address(params[i]);
    row[kColGrad] = address(grads[i]);
    row[kColState0] = address(exp_avgs[i]);
    row[kColState1] = address(exp_avg_sqs[i]);
    row[kColState2] = max_sqs[i];
    row[kColStep] = reinterpret_cast<int64_t>(steps[i].data_ptr());
    row[kColNumel] = params[i].numel();
    row[kColGroup] = group_index[i];
    row[kColMaster] = options.masters[i];
    row[kColParamId] = param_ids.empty() ? static_cast<int64_t>(i) : param_ids[i];
  });
  C10_CUDA_CHECK(launch_adam_tables(dtype, d.table, d.n_rows, d.chunks, d.n_chunks, kDefaultChunkElements,
                                    hyper.data_ptr<double>(), sched.program, sched.segments, sched.step,
                                    ticket_counter(stream), stream.stream(), options.launch));
}

void adam_tables_cuda(const at::Tensor& table, const at::Tensor& chunks, int64_t chunk_elements,
                      at::ScalarType param_type, const at::Tensor& hyper, const at::Tensor& counter,
                      const std::optional<at::Tensor>& schedule, const std::optional<at::Tensor>& schedule_step,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                      const std::optional<at::Tensor>& clip_coef, const std::optional<at::Tensor>& step_advance,
                      int64_t sr_seed) {
  const TableLaunch l = check_table_launch(table, chunks, chunk_elements, param_type, hyper, counter, schedule,
                                           schedule_step, grad_scale, found_inf, clip_coef, step_advance, sr_seed);
  launch_on_tables(l, step_advance, found_inf, [&](const Tables& t, cudaStream_t stream) {
    return launch_adam_tables(l.dtype, t.table, t.n_rows, t.chunks, t.n_chunks, chunk_elements, l.hyper,
                              l.schedule.program, l.schedule.segments, l.schedule.step, l.counter, stream, l.options);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_sched, CUDA, m) {
  m.impl("adam_step_", &adam_step_cuda);
  m.impl("cuda_adam_tables_", &adam_tables_cuda);
}

}  // namespace fused_sched::cuda
