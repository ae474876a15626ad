// CUDA implementations of fused_sched::sgd_step_ and cuda_sgd_tables_ (schemas in csrc/fused_sched_ops.cpp): torch glue
// around the torch-free launchers of sgd.cu; common_torch.h says what the glue of every optimizer shares.
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
#include "sgd.h"

namespace fused_sched::cuda {
namespace {

void sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   const at::Tensor& hyper, at::IntArrayRef group_index, at::IntArrayRef fresh_buffers,
                   const std::optional<at::Tensor>& schedule, const std::optional<at::Tensor>& schedule_step,
                   std::optional<at::TensorList> master_params, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef,
                   const std::optional<at::Tensor>& step_advance) {
  const size_t n = params.size();
  const at::Device device = check_params(params, grads, hyper);
  check_hyper(hyper, group_index, n, device);
  const Schedule sched = check_schedule(hyper, schedule, schedule_step);
  TORCH_CHECK(momentum_buffers.size() == n || momentum_buffers.empty(), "fused_sched: momentum_buffers has ",
              momentum_buffers.size(), " entries for ", n, " params");
  TORCH_CHECK(fresh_buffers.size() == n, "fused_sched: fresh_buffers has ", fresh_buffers.size(), " entries for ", n,
              " params");
  // Check every optional buffer before anything is queued.
  std::vector<int64_t> buffers(n);
  for (size_t i = 0; i < n; ++i) buffers[i] = optional_state(params[i], momentum_buffers, "momentum_buffers", i);
  // Float32 buffers and params rounded to nearest: no param ids, no seed.
  const CheckedOptions options = check_options(params, device, master_params, grad_scale, found_inf, clip_coef,
                                               step_advance, at::IntArrayRef(), 0);
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
    row[kColState0] = buffers[i];
    row[kColState1] = 0;
    row[kColState2] = 0;
    row[kColStep] = 0;  // float32 momentum buffers only (the list ops take no state format): no step
    row[kColFresh] = fresh_buffers[i] != 0 ? 1 : 0;  // cleared by the kernel's last block (unless found_inf skips)
    row[kColNumel] = params[i].numel();
    row[kColGroup] = group_index[i];
    row[kColMaster] = options.masters[i];
    row[kColParamId] = static_cast<int64_t>(i);
  });
  C10_CUDA_CHECK(launch_sgd_tables(dtype, d.table, d.n_rows, d.chunks, d.n_chunks, kDefaultChunkElements,
                                   hyper.data_ptr<double>(), sched.program, sched.segments, sched.step,
                                   ticket_counter(stream), stream.stream(), options.launch));
}

void sgd_tables_cuda(const at::Tensor& table, const at::Tensor& chunks, int64_t chunk_elements,
                     at::ScalarType param_type, const at::Tensor& hyper, const at::Tensor& counter,
                     const std::optional<at::Tensor>& schedule, const std::optional<at::Tensor>& schedule_step,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                     const std::optional<at::Tensor>& clip_coef, const std::optional<at::Tensor>& step_advance,
                     int64_t sr_seed) {
  const TableLaunch l = check_table_launch(table, chunks, chunk_elements, param_type, hyper, counter, schedule,
                                           schedule_step, grad_scale, found_inf, clip_coef, step_advance, sr_seed);
  launch_on_tables(l, step_advance, found_inf, [&](const Tables& t, cudaStream_t stream) {
    return launch_sgd_tables(l.dtype, t.table, t.n_rows, t.chunks, t.n_chunks, chunk_elements, l.hyper,
                             l.schedule.program, l.schedule.segments, l.schedule.step, l.counter, stream, l.options);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_sched, CUDA, m) {
  m.impl("sgd_step_", &sgd_step_cuda);
  m.impl("cuda_sgd_tables_", &sgd_tables_cuda);
}

}  // namespace fused_sched::cuda
