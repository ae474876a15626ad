#include "optim_bucket.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <mutex>

#include <sstream>

#include "cpu/adam.h"
#include "cpu/grad_norm.h"
#include "cpu/muon.h"
#include "cpu/sgd.h"
#include "fused_sched/muon_math.h"
#include "cpu/step_common.h"
#include "fused_sched/optim_math.h"
#include "optim_checks.h"

namespace fused_sched {

namespace {
int64_t address(const at::Tensor& x) {
  return x.defined() && x.numel() > 0 ? reinterpret_cast<int64_t>(x.data_ptr()) : 0;
}

// ArrayRef's operator== calls memcmp, a library call for the two to four ints of a shape (12% of refresh_grads).
inline bool same(at::IntArrayRef a, at::IntArrayRef b) {
  if (a.size() != b.size()) return false;
  for (size_t k = 0; k < a.size(); ++k) {
    if (a[k] != b[k]) return false;
  }
  return true;
}
}  // namespace

OptimBucket::OptimBucket(std::vector<at::Tensor> params, std::vector<std::vector<at::Tensor>> states,
                         std::vector<at::Tensor> steps, std::vector<int64_t> group_index,
                         std::vector<at::Tensor> masters, std::vector<int64_t> param_ids,
                         std::vector<int64_t> formats, std::vector<std::vector<at::Tensor>> absmax,
                         std::optional<at::Tensor> qmap)
    : params_(std::move(params)),
      states_(std::move(states)),
      steps_(std::move(steps)),
      group_index_(std::move(group_index)),
      masters_(std::move(masters)),
      param_ids_(std::move(param_ids)),
      formats_(std::move(formats)),
      absmax_(std::move(absmax)),
      qmap_(std::move(qmap)),
      dtype_(params_.empty() ? at::kFloat : params_[0].scalar_type()),
      device_(params_.empty() ? at::Device(at::kCPU) : params_[0].device()) {
  TORCH_CHECK(group_index_.size() == params_.size(), "fused_sched: one group index per param");
  for (const auto& list : states_) {
    TORCH_CHECK(list.empty() || list.size() == params_.size(), "fused_sched: one state tensor per param");
  }
  TORCH_CHECK(masters_.empty() || masters_.size() == params_.size(), "fused_sched: one master (or none) per param");
  TORCH_CHECK(param_ids_.size() == params_.size(), "fused_sched: one param id per param");
  TORCH_CHECK(formats_.empty() || formats_.size() == params_.size(), "fused_sched: one format (or none) per param");
  TORCH_CHECK(absmax_.empty() || absmax_.size() == 2, "fused_sched: absmax holds two lists (state0, state1)");
  for (const auto& list : absmax_) {
    TORCH_CHECK(list.empty() || list.size() == params_.size(), "fused_sched: one absmax tensor per param");
  }
  for (size_t i = 0; i < masters_.size(); ++i) {
    const at::Tensor& m = masters_[i];
    if (m.defined() && m.numel() > 0) {
      const bool remainder = !formats_.empty() && (formats_[i] & kFormatMasterRemainder);
      check_companion(params_[i], m, remainder ? at::kShort : at::kFloat, "masters", i);
    }
  }
  for (size_t i = 0; i < formats_.size(); ++i) check_state_format(i);
  grads_.resize(params_.size());
  const int64_t n = static_cast<int64_t>(params_.size());
  table_ = at::zeros({n, kTableColumns}, at::kLong);
  // The columns that stay as built: state, step and master addresses (the bucket holds those tensors), numel
  // (with the layout checked every step), group index and param id. refresh_grads() writes param and grad.
  int64_t* t = table_.data_ptr<int64_t>();
  layouts_.resize(params_.size());
  for (size_t i = 0; i < params_.size(); ++i) {
    const at::Tensor& p = params_[i];
    TORCH_CHECK(p.is_non_overlapping_and_dense(), "fused_sched: params[", i, "] must be dense and non-overlapping");
    layouts_[i].sizes.assign(p.sizes().begin(), p.sizes().end());
    layouts_[i].strides.assign(p.strides().begin(), p.strides().end());
    int64_t* row = t + i * kTableColumns;
    for (size_t k = 0; k < 3; ++k) {
      if (k < states_.size() && !states_[k].empty()) {
        const at::Tensor& s = states_[k][i];
        if (s.defined() && s.numel() != 0) {
          TORCH_CHECK(s.sizes() == p.sizes(), "fused_sched: state ", k, " of params[", i, "] has shape ", s.sizes(),
                      ", the param ", p.sizes());
        }
        row[kColState0 + k] = address(s);
      }
    }
    row[kColStep] = steps_.empty() ? 0 : address(steps_[i]);
    row[kColNumel] = p.numel();
    row[kColGroup] = group_index_[i];
    row[kColMaster] = masters_.empty() ? 0 : address(masters_[i]);
    row[kColParamId] = param_ids_[i];
    row[kColFormat] = formats_.empty() ? 0 : formats_[i];
    if ((row[kColFormat] & kFormatMask) == kFormatBlockwise8bit) {
      row[kColAbsmax0] = address(absmax_[0][i]);
      row[kColAbsmax1] = absmax_[1].empty() ? 0 : address(absmax_[1][i]);
      row[kColQmap] = address(*qmap_);
    }
  }
}

void OptimBucket::check_state_format(size_t i) const {
  // The kernels trust the table: every tensor a format makes them read is checked here, once.
  const at::Tensor& p = params_[i];
  const int64_t format = formats_[i];
  const int64_t moments = format & kFormatMask;
  TORCH_CHECK(moments <= kFormatBlockwise8bit && (format & ~int64_t{0xFFFF}) == 0 &&
                  (format & 0xF8) == 0,
              "fused_sched: params[", i, "] has an unknown state format ", format);
  TORCH_CHECK(!(format & kFormatMasterRemainder) || p.scalar_type() == at::kBFloat16, "fused_sched: params[", i,
              "]: remainder masters need a bfloat16 param");
  const at::ScalarType state_dtype =
      moments == kFormatFloat32 ? at::kFloat : (moments == kFormatBFloat16 ? at::kBFloat16 : at::kByte);
  for (size_t k = 0; k < states_.size(); ++k) {
    if (states_[k].empty()) continue;
    const at::Tensor& s = states_[k][i];
    if (s.defined() && s.numel() > 0) check_companion(p, s, state_dtype, "states", i);
  }
  if (moments != kFormatBlockwise8bit) return;
  const int64_t shift = (format >> kFormatBlockShift) & 0xFF;
  TORCH_CHECK(shift >= 5 && shift <= 8, "fused_sched: params[", i, "]: 8-bit block size 2^", shift,
              " outside 32..256");
  TORCH_CHECK(qmap_.has_value() && qmap_->scalar_type() == at::kFloat && qmap_->numel() == 4 * 256 &&
                  qmap_->is_contiguous() && qmap_->device() == p.device(),
              "fused_sched: 8-bit states need the float32 [4, 256] code table on the param's device");
  const int64_t blocks = (p.numel() + (int64_t{1} << shift) - 1) >> shift;
  TORCH_CHECK(absmax_.size() == 2, "fused_sched: 8-bit states need their absmax tensors");
  for (size_t k = 0; k < 2; ++k) {
    const bool has_state = k < states_.size() && !states_[k].empty() && states_[k][i].defined() &&
                           states_[k][i].numel() > 0;
    if (!has_state) continue;
    // Every 8-bit state needs its scales: a missing list would leave a 0 address in kColAbsmax0/1.
    TORCH_CHECK(!absmax_[k].empty(), "fused_sched: 8-bit state ", k, " of params[", i, "] has no absmax");
    const at::Tensor& a = absmax_[k][i];
    TORCH_CHECK(a.defined() && a.scalar_type() == at::kFloat && a.numel() == blocks && a.is_contiguous() &&
                    a.device() == p.device(),
                "fused_sched: absmax of state ", k, " of params[", i, "] must be a contiguous float32 tensor of ",
                blocks, " elements on ", p.device());
  }
}

const char* OptimBucket::refresh_range(size_t begin, size_t end, size_t* failed, bool* changed) {
  int64_t* t = table_.data_ptr<int64_t>();
  // CPU kernels read the gradients through grads_; device kernels read them through the table alone, and the
  // parameters' .grad keeps them alive while the launch is queued.
  const bool keep_grads = device_.is_cpu();
  bool any_change = false;
  for (size_t i = begin; i < end; ++i) {
    const at::Tensor& p = params_[i];
    const at::Tensor& g = p.grad();
    const char* problem = nullptr;
    if (p.scalar_type() != dtype_ || p.device() != device_) {
      problem = "dtype or device changed";
    } else if (!g.defined()) {
      problem = "no grad";
    } else if (g.scalar_type() != dtype_ || g.device() != device_ || g.is_sparse()) {
      problem = "grad dtype/device/layout";
    } else if (!same(p.sizes(), layouts_[i].sizes) || !same(p.strides(), layouts_[i].strides)) {
      problem = "param layout changed";  // its states and master copy were made for the old one
    } else if (!same(g.sizes(), p.sizes()) || !same(g.strides(), p.strides())) {
      problem = "grad layout differs from param";
    }
    if (problem != nullptr) {
      *failed = i;
      *changed = any_change;
      return problem;
    }
    if (keep_grads) grads_[i] = g;
    int64_t* row = t + i * kTableColumns;
    const int64_t param_address = address(p);
    const int64_t grad_address = address(g);
    any_change |= row[kColParam] != param_address || row[kColGrad] != grad_address || row[kColFresh] != 0;
    row[kColParam] = param_address;
    row[kColGrad] = grad_address;
    row[kColFresh] = 0;  // a caller may have set SGD's fresh flags for the last upload; the kernel cleared them
  }
  *changed = any_change;
  return nullptr;
}

std::string OptimBucket::refresh_grads() {
  // Checks params and gradients only and writes the table row's two changing addresses. The state, step and
  // master tensors belong to the bucket (their addresses were written into the table when it was built; a state
  // replaced in the optimizer's state dict or loaded by load_state_dict comes with a new plan), and a parameter's
  // layout is compared with the one it had then, so a step touches no state tensor's metadata. The time goes into
  // reading two TensorImpls and an autograd meta per parameter, cache misses that several threads overlap.
  // Measured on the 2-core CI machine, 2000 Adam tensors of a CPU bucket: 107 us when a checking pass and a table
  // pass re-read every state's shape and address and ArrayRef compared shapes with memcmp; 52 us for the single
  // pass on one thread; 31-36 us on two (kRefreshGrain), with the GIL released around the call. A failed check
  // leaves the table half refreshed, which is fine because the caller then discards the bucket (the optimizers
  // rebuild their plan).
  const size_t n = params_.size();
  size_t failed = n;
  const char* problem = nullptr;
  bool changed = false;
  if (n < static_cast<size_t>(kRefreshGrain) * 2) {
    problem = refresh_range(0, n, &failed, &changed);
  } else {
    // Freeing a tensor that has a Python object takes the GIL. The Python binding releases it around this call
    // (a deadlock otherwise: seen when a .grad that grads_ still held had been replaced, and the worker that
    // dropped the last reference waited for the GIL held by the thread waiting for the workers); dropping the
    // last step's references here, on the calling thread, keeps the workers from taking it at all.
    release_grads();
    std::mutex mutex;
    at::parallel_for(0, static_cast<int64_t>(n), kRefreshGrain, [&](int64_t begin, int64_t end) {
      size_t where = n;
      bool part_changed = false;
      const char* part = refresh_range(static_cast<size_t>(begin), static_cast<size_t>(end), &where, &part_changed);
      std::lock_guard<std::mutex> lock(mutex);
      changed |= part_changed;
      if (part != nullptr && where < failed) {  // the first failing param, whichever thread saw it
        failed = where;
        problem = part;
      }
    });
  }
  if (problem != nullptr) {
    std::ostringstream os;
    os << "param " << failed << ": " << problem;
    return os.str();
  }
  table_changed_ = changed;
  return {};
}

namespace {
const std::vector<at::Tensor>& state_or_empty(const std::vector<std::vector<at::Tensor>>& states, size_t k) {
  static const std::vector<at::Tensor> empty;
  return k < states.size() ? states[k] : empty;
}
}  // namespace

cpu::StepOptions OptimBucket::options(const Amp& amp, int64_t sr_seed) const {
  cpu::StepOptions o;
  o.master_params = masters_;
  o.grad_scale = amp.grad_scale;
  o.found_inf = amp.found_inf;
  o.clip_coef = amp.clip_coef;
  o.step_advance = amp.step_advance;
  o.param_ids = param_ids_;
  o.sr_seed = sr_seed;
  o.formats = formats_;
  if (!absmax_.empty()) {
    o.absmax0 = absmax_[0];
    o.absmax1 = absmax_[1];
  }
  o.qmap = qmap_;
  return o;
}

void OptimBucket::adam_step(const at::Tensor& hyper, const std::optional<at::Tensor>& schedule,
                            const std::optional<at::Tensor>& schedule_step, const Amp& amp, int64_t sr_seed) {
  RECORD_FUNCTION("fused_sched::adam_step_", std::vector<c10::IValue>());
  TORCH_CHECK(device_.is_cpu(), "fused_sched: OptimBucket::adam_step runs CPU buckets");
  cpu::adam_step_cpu(params_, grads_, state_or_empty(states_, 0), state_or_empty(states_, 1),
                     state_or_empty(states_, 2), steps_, hyper, group_index_, schedule, schedule_step,
                     options(amp, sr_seed), /*checked=*/true);
  release_grads();
}

void OptimBucket::sgd_step(const at::Tensor& hyper, const std::vector<int64_t>& fresh_buffers,
                           const std::optional<at::Tensor>& schedule, const std::optional<at::Tensor>& schedule_step,
                           const Amp& amp, int64_t sr_seed) {
  RECORD_FUNCTION("fused_sched::sgd_step_", std::vector<c10::IValue>());
  TORCH_CHECK(device_.is_cpu(), "fused_sched: OptimBucket::sgd_step runs CPU buckets");
  cpu::sgd_step_cpu(params_, grads_, state_or_empty(states_, 0), steps_, hyper, group_index_, fresh_buffers, schedule,
                    schedule_step, options(amp, sr_seed), /*checked=*/true);
  release_grads();
}

void OptimBucket::muon_step(const at::Tensor& hyper, int64_t phase, const std::optional<at::Tensor>& schedule,
                            const std::optional<at::Tensor>& schedule_step, const Amp& amp) {
  RECORD_FUNCTION("fused_sched::muon_step_", std::vector<c10::IValue>());
  TORCH_CHECK(device_.is_cpu(), "fused_sched: OptimBucket::muon_step runs CPU buckets");
  TORCH_CHECK(states_.size() == 2 && steps_.size() == params_.size(), "fused_sched: a Muon bucket holds momentum "
              "buffers, workspaces and lr ratios");
  std::vector<double> lr_ratios(steps_.size());
  for (size_t i = 0; i < steps_.size(); ++i) lr_ratios[i] = *steps_[i].data_ptr<double>();
  cpu::muon_step_cpu(params_, grads_, states_[0], states_[1], lr_ratios, hyper, group_index_, phase, schedule,
                     schedule_step, options(amp, 0), /*checked=*/true);
  if (phase == kMuonUpdatePass) release_grads();
}

double OptimBucket::grad_norm_accumulate(double norm_type, double grad_scale) const {
  TORCH_CHECK(device_.is_cpu(), "fused_sched: OptimBucket::grad_norm_accumulate runs CPU buckets");
  return cpu::grad_norm_accumulate_cpu(grads_, norm_type, grad_scale);
}

bool NoGradWatch::still_none() const {
  for (const auto& p : params_) {
    if (p.grad().defined()) return false;
  }
  return true;
}

}  // namespace fused_sched
