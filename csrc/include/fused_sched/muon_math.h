// Per-element Muon math (torch/optim/_muon.py), shared by every C++ backend like optim_math.h, whose MathOps,
// hyper columns and flags it uses. The Triton kernels mirror it in fused_sched/backends/triton/muon.py.
//
// A Muon step is two elementwise passes around the Newton-Schulz orthogonalization, which runs in between as batched
// bfloat16 matmuls over the matrices of one shape (fused_sched/optim/muon.py):
//
// 1. momentum pass (kMuonMomentumPass): g = prescale(grad) (written back when prescaled, as the Adam / SGD kernels
//    do); momentum_buffer.lerp_(g, 1 - momentum); update = g.lerp(momentum_buffer, momentum) if nesterov else
//    momentum_buffer; the update is stored as bfloat16 (round to nearest even: torch's grad.bfloat16()) into the
//    param's workspace, the table's state1 (laid out like the param).
// 2. update pass (kMuonUpdatePass): the workspace now holds the orthogonalized update O (bfloat16);
//    param.mul_(1 - lr * weight_decay); param.add_(O, alpha=-lr * lr_ratio), lr_ratio being the param's
//    adjust_lr_fn factor (torch's _adjust_lr), a float64 the table's column 5 points to.
//
// The hyper row is SGD's layout: lr, weight_decay, momentum and the kNesterov flag; a schedule may drive lr and
// momentum (the momentum column of effective_hyper / load_effective_row is kMomentum). GradScaler's found_inf skips
// both passes (nothing written); the update pass writes step_advance.
#pragma once

#include "fused_sched/optim_math.h"

namespace fused_sched {
inline namespace FS_MATH_ABI {

enum MuonPass : int64_t {
  kMuonMomentumPass = 0,
  kMuonUpdatePass = 1,
};

// Scalars of one Muon tensor: float64 as torch computes them in Python, rounded to float once.
template <typename T>
struct MuonCoeffs {
  T buffer_weight;              // 1 - momentum: momentum_buffer.lerp_(grad, 1 - momentum)
  T buffer_weight_minus_one;    // (1 - momentum) - 1, torch.lerp's large-weight branch
  T nesterov_weight;            // momentum: grad.lerp(momentum_buffer, momentum)
  T nesterov_weight_minus_one;  // momentum - 1
  T decay;                      // 1 - lr * weight_decay
  T neg_adjusted_lr;            // -(lr * lr_ratio)
  bool buffer_small;            // torch.lerp picks its formula by |weight| < 0.5
  bool nesterov_small;
  bool nesterov;
};

FS_HOST_DEVICE MuonCoeffs<float> muon_coeffs(const double* row, double lr_ratio) {
  const double lr = row[kLr], momentum = row[kMomentum];
  const double buffer_weight = 1.0 - momentum;
  MuonCoeffs<float> c;
  c.buffer_weight = static_cast<float>(buffer_weight);
  c.buffer_weight_minus_one = c.buffer_weight - 1.0f;
  c.nesterov_weight = static_cast<float>(momentum);
  c.nesterov_weight_minus_one = c.nesterov_weight - 1.0f;
  c.decay = static_cast<float>(1.0 - lr * row[kWeightDecay]);
  c.neg_adjusted_lr = static_cast<float>(-(lr * lr_ratio));
  c.buffer_small = fabs(buffer_weight) < 0.5;
  c.nesterov_small = fabs(momentum) < 0.5;
  c.nesterov = (hyper_flags(row) & kNesterov) != 0;
  return c;
}

// torch.lerp(start, end, weight) with a scalar weight: start + w * (end - start) for |w| < 0.5, else
// end - (1 - w) * (end - start), each rounded once as torch's vectorized kernel does (optim_math.h "Rounding").
template <typename T>
FS_HOST_DEVICE T muon_lerp(T start, T end, T weight, T weight_minus_one, bool small) {
  const T diff = end - start;
  return small ? MathOps<T>::fma(weight, diff, start) : MathOps<T>::fma(weight_minus_one, diff, end);
}

// Momentum pass of one element: g is the prescaled gradient; returns the update to orthogonalize (before its
// rounding to bfloat16).
template <typename T>
FS_HOST_DEVICE T muon_momentum_element(T g, T& buf, const MuonCoeffs<T>& c) {
  buf = muon_lerp(buf, g, c.buffer_weight, c.buffer_weight_minus_one, c.buffer_small);
  return c.nesterov ? muon_lerp(g, buf, c.nesterov_weight, c.nesterov_weight_minus_one, c.nesterov_small) : buf;
}

// Update pass of one element: o is the orthogonalized update (a bfloat16 value widened to float).
template <typename T>
FS_HOST_DEVICE void muon_update_element(T& p, T o, const MuonCoeffs<T>& c) {
  p = p * c.decay;                             // param.mul_(1 - lr * weight_decay)
  p = MathOps<T>::fma(o, c.neg_adjusted_lr, p);  // param.add_(update, alpha=-adjusted_lr)
}

}  // namespace FS_MATH_ABI
}  // namespace fused_sched
