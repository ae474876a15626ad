// The checks and tables of the CUDA glue that every optimizer's glue file shares (common_torch.h).
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

#include "common_torch.h"
#include "fused_sched/optim_math.h"
#include "fused_sched/schedule_math.h"
#include "optim_checks.h"
#include "launch_common.h"

namespace fused_sched::cuda {

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

// effective_hyper's checks (csrc/cpu/step_common.cpp); the kernels evaluate the programs on the device.
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
    // Set to 1 by a step that ran, left as it is by a skipped one (the kernels' rule, csrc/cpu/step_common.h).
    step_advance->copy_(at::maximum(*step_advance, found_inf->eq(0).to(at::kDouble).reshape(step_advance->sizes())));
  } else {
    step_advance->fill_(1.0);
  }
}

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

}  // namespace fused_sched::cuda
