// CUDA implementations of the fused_sched operators (schemas in csrc/fused_sched_ops.cpp): torch glue around the
// torch-free launchers of csrc/cuda/*.cu, one glue file per kernel (adam_torch.cpp, sgd_torch.cpp, grad_norm_torch.cpp)
// and what they share here (common_torch.cpp). Built only against a CUDA build of torch, with -DFUSED_SCHED_WITH_CUDA
// (setup.py). Nothing here synchronizes or reads a device value on the host.
//
// Two kinds of entry point:
// * cuda_adam_tables_ / cuda_sgd_tables_ / cuda_grad_norm_tables_: the optimizers' eager step. The runner
//   (fused_sched/backends/cuda_backend.py) keeps each bucket's address table, chunk map and ticket counter on the
//   device and re-uploads the table only when an address changes, so a step is one launch and a CUDA graph can
//   capture it.
// * adam_step_ / sgd_step_ / grad_norm_clip on tensor lists: the torch.compile path (their schemas name every
//   written tensor). They build the address table and chunk map on the host for every call (in pinned memory) and
//   copy them to the device asynchronously on the current stream. Because that pinned memory is recycled after the
//   copy, a CUDA-graph capture of these ops would replay stale host addresses: captured steps use the table ops.
//
// Differences from the CPU ops (csrc/cpu/adam.cpp, sgd.cpp), all because the host reads no device value:
// * hyper, schedule and schedule_step live on the parameters' device (like the Triton backend's tables), and so
//   do grad_scale, found_inf, clip_coef and step_advance, which the kernels read and write on the device;
// * the checks that need the hyper rows' values (amsgrad needs max_exp_avg_sqs, momentum needs momentum_buffers)
//   cannot run: an optional state given as an undefined or empty tensor has address 0, and the kernels then run
//   amsgrad as plain Adam / momentum without a kept buffer. The Python side always passes them when needed.
#pragma once

#include <algorithm>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "fused_sched/optim_math.h"
#include "launch_common.h"

namespace fused_sched::cuda {

// The checks and tables every optimizer's glue shares (common_torch.cpp).
ParamDtype param_dtype(at::ScalarType t);
void check_hyper(const at::Tensor& hyper, at::IntArrayRef group_index, size_t n, const at::Device& device);

struct Schedule {
  const double* program = nullptr;
  int64_t segments = 0;
  const double* step = nullptr;
};

Schedule check_schedule(const at::Tensor& hyper, const std::optional<at::Tensor>& schedule,
                        const std::optional<at::Tensor>& schedule_step);
int64_t address(const at::Tensor& t);
at::Device check_params(at::TensorList params, at::TensorList grads, const at::Tensor& hyper);
int64_t optional_state(const at::Tensor& p, at::TensorList states, const char* what, size_t i);

// The address table (rows of kTableColumns, optim_math.h TableColumn, filled by `fill_row`) and the chunk map,
// built in one pinned host buffer and copied to the device in one asynchronous copy on the current stream.
struct DeviceTables {
  at::Tensor storage;  // keeps the device buffer alive until the launch is queued (stream-ordered reuse)
  int64_t* table = nullptr;
  const int64_t* chunks = nullptr;
  int64_t n_rows = 0;
  int64_t n_chunks = 0;
};

template <typename RowFn>
DeviceTables upload_tables(at::TensorList params, const at::Device& device, RowFn&& fill_row) {
  const int64_t n = static_cast<int64_t>(params.size());
  int64_t n_chunks = 0;
  for (const at::Tensor& p : params) n_chunks += (p.numel() + kDefaultChunkElements - 1) / kDefaultChunkElements;
  at::Tensor host =
      at::empty({n * kTableColumns + n_chunks * 2}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* t = host.data_ptr<int64_t>();
  int64_t* c = t + n * kTableColumns;
  for (int64_t i = 0; i < n; ++i) {
    // Columns a row function leaves alone are 0: the list ops run float32 states (kColFormat 0, no 8-bit columns).
    std::fill(t + i * kTableColumns, t + (i + 1) * kTableColumns, int64_t{0});
    fill_row(static_cast<size_t>(i), t + i * kTableColumns);
    const int64_t numel = params[i].numel();
    for (int64_t start = 0; start < numel; start += kDefaultChunkElements) {
      *c++ = i;
      *c++ = start;
    }
  }
  DeviceTables d;
  // Pinned source + non_blocking: cudaMemcpyAsync on the current stream; the caching host allocator records an
  // event so the pinned block is not reused before the copy has run.
  d.storage = host.to(device, at::kLong, /*non_blocking=*/true, /*copy=*/true);
  d.table = d.storage.data_ptr<int64_t>();
  d.chunks = d.table + n * kTableColumns;
  d.n_rows = n;
  d.n_chunks = n_chunks;
  return d;
}

int32_t* ticket_counter(const c10::cuda::CUDAStream& stream);

// A one-element input of the step (grad_scale, found_inf, clip_coef: float32; step_advance: float64) on the
// bucket's device: its address, or nullptr when absent.
template <typename T>
T* step_scalar(const std::optional<at::Tensor>& t, at::ScalarType dtype, const at::Device& device, const char* what) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->device() == device && t->scalar_type() == dtype && t->numel() == 1, "fused_sched: ", what,
              " must be a one-element ", dtype, " tensor on ", device, ", got ", t->scalar_type(), " ", t->sizes(),
              " on ", t->device());
  return t->data_ptr<T>();
}

StepOptions check_step_options(const at::Device& device, const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef,
                          const std::optional<at::Tensor>& step_advance, int64_t sr_seed);

// The large-model options of a call (csrc/cpu/step_common.h StepOptions), checked like check_options in
// csrc/cpu/step_common.cpp: the launchers' pointers and each param's master-copy address (0 for none).
struct CheckedOptions {
  StepOptions launch;
  std::vector<int64_t> masters;
};

CheckedOptions check_options(at::TensorList params, const at::Device& device,
                             const std::optional<at::TensorList>& master_params,
                             const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                             const std::optional<at::Tensor>& clip_coef, const std::optional<at::Tensor>& step_advance,
                             at::IntArrayRef param_ids, int64_t sr_seed);
void record_step_advance(const std::optional<at::Tensor>& step_advance, const std::optional<at::Tensor>& found_inf);

struct Tables {
  int64_t* table = nullptr;
  int64_t n_rows = 0;
  const int64_t* chunks = nullptr;
  int64_t n_chunks = 0;
};

Tables check_tables(const at::Tensor& table, const at::Tensor& chunks, int64_t chunk_elements);
int32_t* check_counter(const at::Tensor& counter, const at::Device& device);
void check_table_hyper(const at::Tensor& hyper, const at::Device& device);

// The checked arguments of a table op's launch (adam_tables_cuda / sgd_tables_cuda).
struct TableLaunch {
  Tables tables;
  at::Device device = at::Device(at::kCUDA);
  Schedule schedule;
  int32_t* counter = nullptr;
  StepOptions options;
  ParamDtype dtype = ParamDtype::kFloat;
  const double* hyper = nullptr;
};

TableLaunch check_table_launch(const at::Tensor& table, const at::Tensor& chunks, int64_t chunk_elements,
                               at::ScalarType param_type, const at::Tensor& hyper, const at::Tensor& counter,
                               const std::optional<at::Tensor>& schedule,
                               const std::optional<at::Tensor>& schedule_step,
                               const std::optional<at::Tensor>& grad_scale,
                               const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef,
                               const std::optional<at::Tensor>& step_advance, int64_t sr_seed);

// What every table op (cuda_<optimizer>_tables_) does once its arguments are checked: an empty table only records
// step_advance (the launcher would refuse the empty table's null address); otherwise `launch(tables, stream)`, the
// optimizer's launcher, runs on the current stream of the tables' device.
template <typename Launch>
void launch_on_tables(const TableLaunch& l, const std::optional<at::Tensor>& step_advance,
                      const std::optional<at::Tensor>& found_inf, Launch&& launch) {
  const c10::cuda::CUDAGuard guard(l.device);
  if (l.tables.n_rows == 0) {
    record_step_advance(step_advance, found_inf);
    return;
  }
  C10_CUDA_CHECK(launch(l.tables, c10::cuda::getCurrentCUDAStream(l.device.index()).stream()));
}

}  // namespace fused_sched::cuda
