// Per-element Adam / AdamW math (torch/optim/adam.py), shared by every C++ backend like optim_math.h, whose
// MathOps, hyper columns and flags it uses.
#pragma once

#include "fused_sched/optim_math.h"

namespace fused_sched {
inline namespace FS_MATH_ABI {

// Scalars of one Adam/AdamW update of one tensor, computed in float64 exactly as torch computes them in
// Python (bias corrections from the float32 step counter after its increment), then rounded to float once.
template <typename T>
struct AdamCoeffs {
  T decay;           // 1 - lr * wd (AdamW) ; unused for Adam
  T weight_decay;    // L2 coefficient (Adam)
  T lerp_weight;           // 1 - beta1
  T lerp_weight_minus_one;  // (1 - beta1) - 1, the large-weight branch of torch.lerp
  T beta2;
  T one_minus_beta2;
  T bc2_sqrt;        // sqrt(1 - beta2^step)
  T eps;
  T neg_step_size;   // -lr / (1 - beta1^step)
  bool lerp_small;   // torch.lerp picks its formula by |weight| < 0.5
  uint32_t flags;
};

FS_HOST_DEVICE AdamCoeffs<float> adam_coeffs(const double* row, double step) {
  const double lr = row[kLr], beta1 = row[kBeta1], beta2 = row[kBeta2], wd = row[kWeightDecay];
  const double bias_correction1 = 1.0 - pow(beta1, step);
  const double bias_correction2 = 1.0 - pow(beta2, step);
  const double lerp_w = 1.0 - beta1;
  const float lerp_wf = static_cast<float>(lerp_w);
  AdamCoeffs<float> c;
  c.decay = static_cast<float>(1.0 - lr * wd);
  c.weight_decay = static_cast<float>(wd);
  c.lerp_weight = lerp_wf;
  c.lerp_weight_minus_one = lerp_wf - 1.0f;
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.bc2_sqrt = static_cast<float>(sqrt(bias_correction2));
  c.eps = static_cast<float>(row[kEps]);
  c.neg_step_size = static_cast<float>(-(lr / bias_correction1));
  c.lerp_small = fabs(lerp_w) < 0.5;
  c.flags = hyper_flags(row);
  if (wd == 0.0) c.flags |= kNoWeightDecay;
  return c;
}

// One Adam/AdamW element: p, m, v, vmax updated in place; g is the gradient as stored.
template <typename T>
FS_HOST_DEVICE void adam_element(T& p, T g, T& m, T& v, T& vmax, const AdamCoeffs<T>& c) {
  if (c.flags & kMaximize) g = MathOps<T>::neg(g);
  if (c.flags & kDecoupledWeightDecay) {
    p = p * c.decay;
  } else if (!(c.flags & kNoWeightDecay)) {
    g = MathOps<T>::fma(p, c.weight_decay, g);  // grad.add(param, alpha=weight_decay)
  }
  // exp_avg.lerp_(grad, 1 - beta1)
  m = c.lerp_small ? MathOps<T>::fma(c.lerp_weight, g - m, m) : MathOps<T>::fma(c.lerp_weight_minus_one, g - m, g);
  // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
  v = v * c.beta2;
  v = v + c.one_minus_beta2 * g * g;
  T second = v;
  if (c.flags & kAmsgrad) {
    vmax = MathOps<T>::max(vmax, v);
    second = vmax;
  }
  // denom = sqrt(v) / bias_correction2_sqrt + eps ; param.addcdiv_(exp_avg, denom, value=-step_size)
  const T denom = MathOps<T>::sqrt(second) / c.bc2_sqrt + c.eps;
  p = p + c.neg_step_size * m / denom;
}

}  // namespace FS_MATH_ABI
}  // namespace fused_sched
