// CUDA implementations of the fused_sched operators (schemas in csrc/fused_sched_ops.cpp): torch glue around the
// torch-free launchers of optim_cuda.cu. Built only against a CUDA build of torch, with -DFUSED_SCHED_WITH_CUDA
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
// Differences from the CPU op (csrc/cpu/optim_cpu.cpp), all because the host reads no device value:
// * hyper, schedule and schedule_step live on the parameters' device (like the Triton backend's tables), and so
//   do grad_scale, found_inf, clip_coef and step_advance, which the kernels read and write on the device;
// * the checks that need the hyper rows' values (amsgrad needs max_exp_avg_sqs, momentum needs momentum_buffers)
//   cannot run: an optional state given as an undefined or empty tensor has address 0, and the kernels then run
//   amsgrad as plain Adam / momentum without a kept buffer. The Python side always passes them when needed.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <utility>
#include <optional>
#include <vector>

#include "fused_sched/optim_math.h"
#include "fused_sched/schedule_math.h"
#include "optim_checks.h"
#include "optim_cuda.h"

namespace fused_sched::cuda {
namespace {

ParamDtype param_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ParamDtype::kFloat;
    case at::kBFloat16: return ParamDtype::kBFloat16;
    case at::kHalf: return ParamDtype::kHalf;
    default: TORCH_CHECK(false, "fused_sched: parameters must be float32, bfloat16 or float16, got ", t);
  }
  return ParamDtype::kFloat;
}

void check_hyper(const at::Tensor& hyper, at::IntArrayRef group_index, size_t n, const at::Device& device) {
  TORCH_CHECK(hyper.device() == device && hyper.scalar_type() == at::kDouble && hyper.dim() == 2 &&
                  hyper.size(1) == kHyperColumns && hyper.is_contiguous(),
              "fused_sched: hyper must be a contiguous float64 tensor of shape [groups, ", int(kHyperColumns),
              "] on ", device, ", got ", hyper.scalar_type(), " ", hyper.sizes(), " on ", hyper.device());
  TORCH_CHECK(group_index.size() == n, "fused_sched: group_index has ", group_index.size(), " entries for ", n,
              " tensors");
  for (int64_t g : group_index) {
    TORCH_CHECK(g >= 0 && g < hyper.size(0), "fused_sched: group index ", g, " out of range [0, ", hyper.size(0),
                ")");
  }
}

struct Schedule {
  const double* program = nullptr;
  int64_t segments = 0;
  const double* step = nullptr;
};

// effective_hyper's checks (optim_cpu.cpp); the kernels evaluate the programs on the device.
Schedule check_schedule(const at::Tensor& hyper, const std::optional<at::Tensor>& schedule,
                        const std::optional<at::Tensor>& schedule_step) {
  Schedule s;
  if (!schedule.has_value() || !schedule->defined()) return s;
  const at::Tensor& table = *schedule;
  TORCH_CHECK(schedule_step.has_value() && schedule_step->defined(), "fused_sched: a schedule needs its step");
  const at::Tensor& step = *schedule_step;
  TORCH_CHECK(table.device() == hyper.device() && table.scalar_type() == at::kDouble && table.dim() == 3 &&
                  table.size(0) == hyper.size(0) && table.size(2) == kScheduleColumns && table.is_contiguous(),
              "fused_sched: schedule must be a contiguous float64 tensor [groups, segments, ", int(kScheduleColumns),
              "] on ", hyper.device(), " with one program per hyper row");
  TORCH_CHECK(step.device() == hyper.device() && step.scalar_type() == at::kDouble && step.numel() == 1,
              "fused_sched: schedule_step must be a one-element float64 tensor on ", hyper.device());
  if (table.size(1) > 0) {
    s.program = table.data_ptr<double>();
    s.segments = table.size(1);
    s.step = step.data_ptr<double>();
  }
  return s;
}

int64_t address(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? reinterpret_cast<int64_t>(t.data_ptr()) : 0;
}

// Checks params and grads; returns the bucket's device.
at::Device check_params(at::TensorList params, at::TensorList grads, const at::Tensor& hyper) {
  TORCH_CHECK(grads.size() == params.size(), "fused_sched: ", grads.size(), " grads for ", params.size(), " params");
  const at::Device device = params.empty() ? hyper.device() : params[0].device();
  TORCH_CHECK(device.is_cuda(), "fused_sched: the CUDA op got tensors on ", device);
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device() == device, "fused_sched: params[", i, "] is on ", p.device(), ", expected ", device);
    TORCH_CHECK(p.scalar_type() == params[0].scalar_type(), "fused_sched: params[", i, "] is ", p.scalar_type(),
                " but params[0] is ", params[0].scalar_type(), "; one call takes one dtype");
    TORCH_CHECK(!p.is_sparse() && p.is_non_overlapping_and_dense(), "fused_sched: params[", i,
                "] must be dense and non-overlapping");
    check_companion(p, grads[i], p.scalar_type(), "grads", i);
  }
  return device;
}

// An optional float32 state (max_exp_avg_sq, momentum_buffer): its address, or 0 where the list is empty or the
// entry is undefined / empty (a placeholder for a group that does not use it).
int64_t optional_state(const at::Tensor& p, at::TensorList states, const char* what, size_t i) {
  if (states.empty() || !states[i].defined() || (states[i].numel() == 0 && p.numel() != 0)) return 0;
  check_companion(p, states[i], at::kFloat, what, i);
  return address(states[i]);
}

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

// The ticket counter of the list-taking ops on one stream: int32 [1], zeroed when created (on that stream, before
// the first launch that uses it) and left zero by every launch. Launches sharing a counter must not overlap, so
// there is one per (device, stream): launches on one stream run in order, and two streams never share one.
int32_t* ticket_counter(const c10::cuda::CUDAStream& stream) {
  static std::mutex mutex;
  // Leaked on purpose: destroying CUDA tensors during static destruction can outlive the CUDA runtime.
  static auto* counters = new std::map<std::pair<int, int64_t>, at::Tensor>();
  std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& counter = (*counters)[{static_cast<int>(stream.device_index()), static_cast<int64_t>(stream.id())}];
  if (!counter.defined()) {
    counter = at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(at::Device(at::kCUDA, stream.device_index())));
  }
  return counter.data_ptr<int32_t>();
}

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

// The one-element step inputs of a launch, checked: on `device`, float32 (step_advance: float64), one element.
StepOptions check_step_options(const at::Device& device, const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef,
                          const std::optional<at::Tensor>& step_advance, int64_t sr_seed) {
  StepOptions o;
  o.grad_scale = step_scalar<float>(grad_scale, at::kFloat, device, "grad_scale");
  o.found_inf = step_scalar<float>(found_inf, at::kFloat, device, "found_inf");
  o.clip_coef = step_scalar<float>(clip_coef, at::kFloat, device, "clip_coef");
  o.step_advance = step_scalar<double>(step_advance, at::kDouble, device, "step_advance");
  o.sr_seed = static_cast<uint64_t>(sr_seed);
  return o;
}

// The large-model options of a call (csrc/cpu/optim_cpu.h StepOptions), checked like check_options in
// optim_cpu.cpp: the launchers' pointers and each param's master-copy address (0 for none).
struct CheckedOptions {
  StepOptions launch;
  std::vector<int64_t> masters;
};

CheckedOptions check_options(at::TensorList params, const at::Device& device,
                             const std::optional<at::TensorList>& master_params,
                             const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                             const std::optional<at::Tensor>& clip_coef, const std::optional<at::Tensor>& step_advance,
                             at::IntArrayRef param_ids, int64_t sr_seed) {
  const size_t n = params.size();
  CheckedOptions o;
  o.launch = check_step_options(device, grad_scale, found_inf, clip_coef, step_advance, sr_seed);
  TORCH_CHECK(param_ids.empty() || param_ids.size() == n, "fused_sched: param_ids has ", param_ids.size(),
              " entries for ", n, " params");
  o.masters.assign(n, 0);
  if (master_params.has_value() && !master_params->empty()) {
    const at::TensorList masters = *master_params;
    TORCH_CHECK(masters.size() == n, "fused_sched: master_params has ", masters.size(), " entries for ", n,
                " params");
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& m = masters[i];
      if (!m.defined() || m.numel() == 0) continue;  // no master copy for this param
      TORCH_CHECK(params[i].scalar_type() != at::kFloat, "fused_sched: master_params[", i,
                  "] given for a float32 parameter");
      check_companion(params[i], m, at::kFloat, "master_params", i);
      o.masters[i] = address(m);
    }
  }
  return o;
}

// A call without params launches nothing; like the CPU op it still records in step_advance whether found_inf
// skipped the step (on the device: the host reads no device value).
void record_step_advance(const std::optional<at::Tensor>& step_advance, const std::optional<at::Tensor>& found_inf) {
  if (!step_advance.has_value() || !step_advance->defined()) return;
  if (found_inf.has_value() && found_inf->defined()) {
    // Set to 1 by a step that ran, left as it is by a skipped one (the kernels' rule, csrc/cpu/optim_cpu.h).
    step_advance->copy_(at::maximum(*step_advance, found_inf->eq(0).to(at::kDouble).reshape(step_advance->sizes())));
  } else {
    step_advance->fill_(1.0);
  }
}

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
  // SGD never rounds stochastically: no param ids, no seed.
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
    row[kColStep] = fresh_buffers[i] != 0 ? 1 : 0;  // cleared by the kernel's last block (unless found_inf skips)
    row[kColNumel] = params[i].numel();
    row[kColGroup] = group_index[i];
    row[kColMaster] = options.masters[i];
    row[kColParamId] = static_cast<int64_t>(i);
  });
  C10_CUDA_CHECK(launch_sgd_tables(dtype, d.table, d.n_rows, d.chunks, d.n_chunks, kDefaultChunkElements,
                                   hyper.data_ptr<double>(), sched.program, sched.segments, sched.step,
                                   ticket_counter(stream), stream.stream(), options.launch));
}

// -- the ops on device-resident tables (the optimizers' eager runner, fused_sched/backends/cuda_backend.py) --------

struct Tables {
  int64_t* table = nullptr;
  int64_t n_rows = 0;
  const int64_t* chunks = nullptr;
  int64_t n_chunks = 0;
};

// The address table and chunk map a runner keeps on the device. Their contents (addresses, group indices, chunk
// bounds) are the C++ bucket's, checked when it was built and at every refresh (csrc/optim_bucket.cpp): reading
// them here would need a device-to-host copy.
Tables check_tables(const at::Tensor& table, const at::Tensor& chunks, int64_t chunk_elements) {
  const at::Device device = table.device();
  TORCH_CHECK(device.is_cuda(), "fused_sched: the CUDA table ops got a table on ", device);
  TORCH_CHECK(table.scalar_type() == at::kLong && table.dim() == 2 && table.size(1) == kTableColumns &&
                  table.is_contiguous(),
              "fused_sched: table must be a contiguous int64 tensor [rows, ", int(kTableColumns), "], got ",
              table.scalar_type(), " ", table.sizes());
  TORCH_CHECK(chunks.device() == device && chunks.scalar_type() == at::kLong && chunks.dim() == 2 &&
                  chunks.size(1) == 2 && chunks.is_contiguous(),
              "fused_sched: chunks must be a contiguous int64 tensor [n_chunks, 2] on ", device, ", got ",
              chunks.scalar_type(), " ", chunks.sizes(), " on ", chunks.device());
  TORCH_CHECK(chunk_elements > 0, "fused_sched: chunk_elements must be positive, got ", chunk_elements);
  Tables t;
  t.table = table.data_ptr<int64_t>();
  t.n_rows = table.size(0);
  t.chunks = chunks.numel() > 0 ? chunks.data_ptr<int64_t>() : nullptr;
  t.n_chunks = chunks.size(0);
  return t;
}

int32_t* check_counter(const at::Tensor& counter, const at::Device& device) {
  TORCH_CHECK(counter.device() == device && counter.scalar_type() == at::kInt && counter.numel() == 1,
              "fused_sched: counter must be a one-element int32 tensor on ", device, ", got ", counter.scalar_type(),
              " ", counter.sizes(), " on ", counter.device());
  return counter.data_ptr<int32_t>();
}

void check_table_hyper(const at::Tensor& hyper, const at::Device& device) {
  TORCH_CHECK(hyper.device() == device && hyper.scalar_type() == at::kDouble && hyper.dim() == 2 &&
                  hyper.size(1) == kHyperColumns && hyper.is_contiguous(),
              "fused_sched: hyper must be a contiguous float64 tensor of shape [groups, ", int(kHyperColumns),
              "] on ", device, ", got ", hyper.scalar_type(), " ", hyper.sizes(), " on ", hyper.device());
}


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
                               const std::optional<at::Tensor>& step_advance, int64_t sr_seed) {
  TableLaunch l;
  l.tables = check_tables(table, chunks, chunk_elements);
  l.device = table.device();
  check_table_hyper(hyper, l.device);
  l.schedule = check_schedule(hyper, schedule, schedule_step);
  l.counter = check_counter(counter, l.device);
  l.options = check_step_options(l.device, grad_scale, found_inf, clip_coef, step_advance, sr_seed);
  l.dtype = param_dtype(param_type);
  l.hyper = hyper.data_ptr<double>();
  return l;
}

void adam_tables_cuda(const at::Tensor& table, const at::Tensor& chunks, int64_t chunk_elements,
                      at::ScalarType param_type, const at::Tensor& hyper, const at::Tensor& counter,
                      const std::optional<at::Tensor>& schedule, const std::optional<at::Tensor>& schedule_step,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                      const std::optional<at::Tensor>& clip_coef, const std::optional<at::Tensor>& step_advance,
                      int64_t sr_seed) {
  const TableLaunch l = check_table_launch(table, chunks, chunk_elements, param_type, hyper, counter, schedule,
                                           schedule_step, grad_scale, found_inf, clip_coef, step_advance, sr_seed);
  const c10::cuda::CUDAGuard guard(l.device);
  if (l.tables.n_rows == 0) {  // nothing to update (the launcher would refuse the empty table's null address)
    record_step_advance(step_advance, found_inf);
    return;
  }
  const Tables& t = l.tables;
  C10_CUDA_CHECK(launch_adam_tables(l.dtype, t.table, t.n_rows, t.chunks, t.n_chunks, chunk_elements, l.hyper,
                                    l.schedule.program, l.schedule.segments, l.schedule.step, l.counter,
                                    c10::cuda::getCurrentCUDAStream(l.device.index()).stream(), l.options));
}

void sgd_tables_cuda(const at::Tensor& table, const at::Tensor& chunks, int64_t chunk_elements,
                     at::ScalarType param_type, const at::Tensor& hyper, const at::Tensor& counter,
                     const std::optional<at::Tensor>& schedule, const std::optional<at::Tensor>& schedule_step,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                     const std::optional<at::Tensor>& clip_coef, const std::optional<at::Tensor>& step_advance) {
  const TableLaunch l = check_table_launch(table, chunks, chunk_elements, param_type, hyper, counter, schedule,
                                           schedule_step, grad_scale, found_inf, clip_coef, step_advance, 0);
  const c10::cuda::CUDAGuard guard(l.device);
  if (l.tables.n_rows == 0) {
    record_step_advance(step_advance, found_inf);
    return;
  }
  const Tables& t = l.tables;
  C10_CUDA_CHECK(launch_sgd_tables(l.dtype, t.table, t.n_rows, t.chunks, t.n_chunks, chunk_elements, l.hyper,
                                   l.schedule.program, l.schedule.segments, l.schedule.step, l.counter,
                                   c10::cuda::getCurrentCUDAStream(l.device.index()).stream(), l.options));
}

int64_t grad_norm_tables_cuda(const at::Tensor& table, const at::Tensor& chunks, int64_t chunk_elements,
                              at::ScalarType grad_type, const at::Tensor& partials, int64_t slot_offset,
                              const at::Tensor& counter, const at::Tensor& out,
                              const std::optional<at::Tensor>& grad_scale, double norm_type, double max_norm,
                              bool finalize) {
  const Tables t = check_tables(table, chunks, chunk_elements);
  const at::Device device = table.device();
  TORCH_CHECK(norm_type > 0.0, "fused_sched: norm_type must be positive or inf, got ", norm_type);
  TORCH_CHECK(slot_offset >= 0, "fused_sched: slot_offset must not be negative, got ", slot_offset);
  // The launch uses at most max(1, n_chunks) slots (its grid, grad_norm_slots).
  TORCH_CHECK(partials.device() == device && partials.scalar_type() == at::kDouble && partials.is_contiguous() &&
                  partials.numel() >= slot_offset + std::max<int64_t>(1, t.n_chunks),
              "fused_sched: partials must be a contiguous float64 tensor on ", device, " of at least ",
              slot_offset + std::max<int64_t>(1, t.n_chunks), " elements, got ", partials.scalar_type(), " ",
              partials.sizes(), " on ", partials.device());
  TORCH_CHECK(out.device() == device && out.scalar_type() == at::kFloat && out.numel() == 2 && out.is_contiguous(),
              "fused_sched: out must be a contiguous two-element float32 tensor on ", device);
  int32_t* ticket = check_counter(counter, device);
  const float* scale = step_scalar<float>(grad_scale, at::kFloat, device, "grad_scale");
  const ParamDtype dtype = param_dtype(grad_type);
  const c10::cuda::CUDAGuard guard(device);
  int64_t slots = 0;
  C10_CUDA_CHECK(launch_grad_norm_tables(dtype, t.table, t.chunks, t.n_chunks, chunk_elements,
                                         partials.data_ptr<double>(), slot_offset, ticket, out.data_ptr<float>(),
                                         scale, norm_type, static_cast<float>(max_norm), finalize, &slots,
                                         c10::cuda::getCurrentCUDAStream(device.index()).stream()));
  return slots;
}

// fused_sched::grad_norm_clip for CUDA gradients (the optimizers' torch.compile path): the norm kernel over tables
// built for this call, one launch per non-empty bucket, the last finalizing, as the eager runner's norm pass does
// (the same chunk size and grid, so the same bits). bucket_sizes as in the CPU operator (an empty bucket adds
// nothing).
at::Tensor grad_norm_clip_cuda(at::TensorList grads, at::IntArrayRef bucket_sizes, double norm_type,
                               double max_norm, const std::optional<at::Tensor>& grad_scale) {
  check_norm_clip_args(bucket_sizes, grads.size(), norm_type);
  TORCH_CHECK(!grads.empty(), "fused_sched: the CUDA grad_norm_clip needs at least one gradient");
  const at::Device device = grads[0].device();
  TORCH_CHECK(device.is_cuda(), "fused_sched: the CUDA op got tensors on ", device);
  // Every check before anything is queued.
  std::vector<std::pair<int64_t, int64_t>> buckets;  // (first, count) of the non-empty buckets
  int64_t offset = 0;
  for (int64_t n : bucket_sizes) {
    if (n > 0) {
      const at::Tensor& first = grads[static_cast<size_t>(offset)];
      param_dtype(first.scalar_type());  // float32, bfloat16 or float16
      for (int64_t i = offset; i < offset + n; ++i) {
        const at::Tensor& g = grads[static_cast<size_t>(i)];
        TORCH_CHECK(g.device() == device && g.scalar_type() == first.scalar_type() &&
                        g.is_non_overlapping_and_dense(),
                    "fused_sched: grads[", i, "] must be a dense ", first.scalar_type(), " tensor on ", device);
      }
      buckets.emplace_back(offset, n);
    }
    offset += n;
  }
  const float* scale = step_scalar<float>(grad_scale, at::kFloat, device, "grad_scale");
  const c10::cuda::CUDAGuard guard(device);
  std::vector<DeviceTables> tables;
  int64_t slots = 0;
  for (const auto& [first, count] : buckets) {
    const at::TensorList members = grads.slice(static_cast<size_t>(first), static_cast<size_t>(count));
    tables.push_back(upload_tables(members, device, [&](size_t i, int64_t* row) {
      std::fill(row, row + kTableColumns, 0);
      row[kColGrad] = address(members[i]);
      row[kColNumel] = members[i].numel();
    }));
    slots += std::max<int64_t>(1, tables.back().n_chunks);  // a launch's grid is at most max(1, n_chunks)
  }
  at::Tensor partials = at::empty({slots}, at::TensorOptions().dtype(at::kDouble).device(device));
  at::Tensor counter = at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(device));
  at::Tensor out = at::empty({2}, at::TensorOptions().dtype(at::kFloat).device(device));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  int64_t slot_offset = 0;
  for (size_t k = 0; k < tables.size(); ++k) {
    const DeviceTables& d = tables[k];
    int64_t used = 0;
    C10_CUDA_CHECK(launch_grad_norm_tables(
        param_dtype(grads[static_cast<size_t>(buckets[k].first)].scalar_type()), d.table, d.chunks, d.n_chunks,
        kDefaultChunkElements, partials.data_ptr<double>(), slot_offset, counter.data_ptr<int32_t>(),
        out.data_ptr<float>(), scale, norm_type, static_cast<float>(max_norm), k + 1 == tables.size(), &used,
        stream));
    slot_offset += used;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_sched, CUDA, m) {
  m.impl("adam_step_", &adam_step_cuda);
  m.impl("sgd_step_", &sgd_step_cuda);
  m.impl("cuda_adam_tables_", &adam_tables_cuda);
  m.impl("cuda_sgd_tables_", &sgd_tables_cuda);
  m.impl("cuda_grad_norm_tables_", &grad_norm_tables_cuda);
  m.impl("grad_norm_clip", &grad_norm_clip_cuda);
}

}  // namespace fused_sched::cuda
