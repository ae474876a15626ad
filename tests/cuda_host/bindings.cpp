// C entry points of the host build of csrc/cuda/*.cu (tests/cuda_host_emulation.py): the launchers of adam.h,
// sgd.h, muon.h and grad_norm.h behind plain C signatures for ctypes. The launch syntax of each kernel source is
// rewritten into emu_launch calls and the result compiled beside this file (cuda_host_emulation.py,
// _emulated_source).
#include "adam.h"
#include "emu.h"
#include "grad_norm.h"
#include "muon.h"
#include "sgd.h"

using fused_sched::cuda::ParamDtype;
using fused_sched::cuda::StepOptions;

extern "C" {
void emu_set_sms(int n) { emu_sms = n; }

int emu_adam_tables(int dtype, const int64_t* table, int64_t n_rows, const int64_t* chunks, int64_t n_chunks,
                    int64_t chunk_elements, const double* hyper, const double* schedule, int64_t segments,
                    const double* schedule_step, int32_t* counter, const float* grad_scale, const float* found_inf,
                    const float* clip_coef, double* step_advance, uint64_t sr_seed) {
  StepOptions o;
  o.grad_scale = grad_scale;
  o.found_inf = found_inf;
  o.clip_coef = clip_coef;
  o.step_advance = step_advance;
  o.sr_seed = sr_seed;
  return fused_sched::cuda::launch_adam_tables(ParamDtype(dtype), table, n_rows, chunks, n_chunks, chunk_elements,
                                               hyper, schedule, segments, schedule_step, counter, nullptr, o);
}

int emu_sgd_tables(int dtype, int64_t* table, int64_t n_rows, const int64_t* chunks, int64_t n_chunks,
                   int64_t chunk_elements, const double* hyper, const double* schedule, int64_t segments,
                   const double* schedule_step, int32_t* counter, const float* grad_scale, const float* found_inf,
                   const float* clip_coef, double* step_advance, uint64_t sr_seed) {
  StepOptions o;
  o.grad_scale = grad_scale;
  o.found_inf = found_inf;
  o.clip_coef = clip_coef;
  o.step_advance = step_advance;
  o.sr_seed = sr_seed;
  return fused_sched::cuda::launch_sgd_tables(ParamDtype(dtype), table, n_rows, chunks, n_chunks, chunk_elements,
                                              hyper, schedule, segments, schedule_step, counter, nullptr, o);
}

int emu_muon_tables(int dtype, const int64_t* table, int64_t n_rows, const int64_t* chunks, int64_t n_chunks,
                    int64_t chunk_elements, const double* hyper, const double* schedule, int64_t segments,
                    const double* schedule_step, int32_t* counter, const float* grad_scale, const float* found_inf,
                    const float* clip_coef, double* step_advance, int64_t phase) {
  StepOptions o;
  o.grad_scale = grad_scale;
  o.found_inf = found_inf;
  o.clip_coef = clip_coef;
  o.step_advance = step_advance;
  return fused_sched::cuda::launch_muon_tables(ParamDtype(dtype), table, n_rows, chunks, n_chunks, chunk_elements,
                                               hyper, schedule, segments, schedule_step, counter, phase, nullptr, o);
}

int emu_grad_norm_tables(int dtype, const int64_t* table, const int64_t* chunks, int64_t n_chunks,
                         int64_t chunk_elements, double* partials, int64_t slot_offset, int32_t* counter, float* out,
                         const float* grad_scale, double norm_type, float max_norm, int finalize,
                         int64_t* slots_used) {
  return fused_sched::cuda::launch_grad_norm_tables(ParamDtype(dtype), table, chunks, n_chunks, chunk_elements,
                                                    partials, slot_offset, counter, out, grad_scale, norm_type,
                                                    max_norm, finalize != 0, slots_used, nullptr);
}
}
