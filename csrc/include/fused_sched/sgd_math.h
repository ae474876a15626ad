// Per-element SGD math (torch/optim/sgd.py), shared by every C++ backend like optim_math.h, whose MathOps,
// hyper columns and flags it uses.
#pragma once

#include "fused_sched/optim_math.h"

namespace fused_sched {
inline namespace FS_MATH_ABI {

template <typename T>
struct SgdCoeffs {
  T neg_lr;
  T weight_decay;
  T momentum;
  T one_minus_dampening;
  uint32_t flags;
  bool has_momentum;
};

FS_HOST_DEVICE SgdCoeffs<float> sgd_coeffs(const double* row) {
  SgdCoeffs<float> c;
  c.neg_lr = static_cast<float>(-row[kLr]);
  c.weight_decay = static_cast<float>(row[kWeightDecay]);
  c.momentum = static_cast<float>(row[kMomentum]);
  c.one_minus_dampening = static_cast<float>(1.0 - row[kDampening]);
  c.flags = hyper_flags(row);
  if (row[kWeightDecay] == 0.0) c.flags |= kNoWeightDecay;
  c.has_momentum = row[kMomentum] != 0.0;
  return c;
}
// One SGD element. `fresh` is true on the step that creates the momentum buffer: torch then sets buf = grad.
template <typename T>
FS_HOST_DEVICE void sgd_element(T& p, T g, T& buf, bool fresh, const SgdCoeffs<T>& c) {
  if (c.flags & kMaximize) g = MathOps<T>::neg(g);
  if (!(c.flags & kNoWeightDecay)) g = MathOps<T>::fma(p, c.weight_decay, g);  // grad.add(param, alpha=wd)
  if (c.has_momentum) {
    if (fresh) {
      buf = g;
    } else {
      // buf.mul_(momentum).add_(grad, alpha=1 - dampening)
      buf = MathOps<T>::fma(g, c.one_minus_dampening, buf * c.momentum);
    }
    g = (c.flags & kNesterov) ? MathOps<T>::fma(buf, c.momentum, g) : buf;  // grad.add(buf, alpha=momentum)
  }
  p = MathOps<T>::fma(g, c.neg_lr, p);  // param.add_(grad, alpha=-lr)
}

}  // namespace FS_MATH_ABI
}  // namespace fused_sched
