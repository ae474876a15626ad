// Learning-rate (and momentum) schedules evaluated on the device, inside the update kernels.
//
// A schedule is a short program per param group: rows of kScheduleColumns float64 values, evaluated at the
// scheduler's step counter t (a float64 device scalar that scheduler.step() advances on the device). Each row is
// one segment:
//
//   kind, combine, target, lo, hi, origin, p0 .. p9
//
// A segment is active when lo <= t < hi (hi may be +inf); its formula sees the local time u = t - origin. An
// active SET segment assigns the target's value, an active MUL segment multiplies it (ChainedScheduler). target 0
// is the learning rate, 1 the momentum (SGD) / beta1 (Adam) that CyclicLR and OneCycleLR cycle. A row of kind
// kSegmentEnd ends the program. A target no active segment assigned keeps the hyper-parameter table's value.
//
// Formulas follow the references' float64 operation order (torch.optim.lr_scheduler closed forms,
// transformers.optimization lambdas), so the result rounds to the same float32 as the reference.
// The Python mirror is fused_sched/_schedule_program.py (evaluate_reference); the Triton mirror lives in
// fused_sched/backends/triton_schedule.py. All three must change together.
#pragma once

#include <cmath>
#include <cstdint>

#include "fused_sched/optim_math.h"

namespace fused_sched {
inline namespace FS_MATH_ABI {

enum ScheduleColumn : int {
  kSegKind = 0,
  kSegCombine = 1,
  kSegTarget = 2,
  kSegLo = 3,
  kSegHi = 4,
  kSegOrigin = 5,
  kSegP0 = 6,  // p0 .. p9 in columns 6 .. 15
  kScheduleColumns = 16,
};

enum SegmentKind : int {
  kSegmentEnd = 0,
  kSegConst = 1,           // p0
  kSegStep = 2,            // p0 * p1 ** floor(u / p2)                               StepLR
  kSegExponential = 3,     // p0 * p1 ** u                                            ExponentialLR
  kSegLinear = 4,          // p0 * (p1 + (p2 - p1) * min(p3, u) / p3)                 LinearLR
  kSegPolynomial = 5,      // p0 * (1 - min(p1, u) / p1) ** p2                        PolynomialLR
  kSegCosine = 6,          // p1 + (p0 - p1) * (1 + cos(pi * u / p2)) / 2             CosineAnnealingLR
  kSegWarmRestarts = 7,    // b=p0 eta=p1 T0=p2 T_mult=p3                             CosineAnnealingWarmRestarts
  kSegCyclic = 8,          // base=p0 max=p1 total=p2 ratio=p3 mode=p4 gamma=p5       CyclicLR
  kSegAnnealCos = 9,       // start=p0 end=p1 phase start=p2 phase end=p3             OneCycleLR cos phase
  kSegAnnealLinear = 10,   // as kSegAnnealCos, linear                                OneCycleLR linear phase
  kSegHfWarmup = 11,       // p0 * (u / p1), p1 = max(1, W)                           transformers warmups
  kSegHfLinearDecay = 12,  // p0 * max(0, (p1 - u) / p2), p1 = T, p2 = max(1, T - W)
  kSegHfCosine = 13,       // W=p1 D=p2 cycles=p3 min_lr_rate=p4 shift=p5             cosine (+ min lr variants)
  kSegHfCosineRestarts = 14,  // W=p1 D=p2 cycles=p3                                   cosine_with_hard_restarts
  kSegHfPolynomial = 15,   // lr_init=p1 lr_end=p2 power=p3 W=p4 T=p5                 polynomial decay
  kSegHfInverseSqrt = 16,  // shift=p1 timescale=p2                                   inverse_sqrt
  kSegHfWarmupRate = 17,   // p0 * (warmup_lr_rate=p1 + (1 - p1) * u / p2)            cosine_warmup_with_min_lr
  kSegWsd = 18,            // start=p1 length=p2 shape=p3 (0 linear 1 cosine 2 sqrt) rising=p4 min=p5 cycles=p6
};

enum SegmentCombine : int { kCombineSet = 0, kCombineMul = 1 };
enum SegmentTarget : int { kTargetLr = 0, kTargetMomentum = 1 };

constexpr double kPi = 3.141592653589793;

// Python's float % for a positive divisor (the sign follows the divisor).
FS_HOST_DEVICE double py_mod(double a, double b) {
  double r = fmod(a, b);
  return (r != 0.0 && (r < 0.0) != (b < 0.0)) ? r + b : r;
}

FS_HOST_DEVICE double segment_value(const double* s, double t) {
  const int kind = static_cast<int>(s[kSegKind]);
  const double u = t - s[kSegOrigin];
  const double* p = s + kSegP0;
  switch (kind) {
    case kSegConst:
      return p[0];
    case kSegStep:
      return p[0] * pow(p[1], floor(u / p[2]));
    case kSegExponential:
      return p[0] * pow(p[1], u);
    case kSegLinear:
      return p[0] * (p[1] + (p[2] - p[1]) * fmin(p[3], u) / p[3]);
    case kSegPolynomial:
      return p[0] * pow(1.0 - fmin(p[1], u) / p[1], p[2]);
    case kSegCosine:
      return p[1] + (p[0] - p[1]) * (1.0 + cos(kPi * u / p[2])) / 2.0;
    case kSegWarmRestarts: {
      double t_cur = u, t_i = p[2];
      if (p[3] == 1.0) {
        t_cur = fmod(u, p[2]);
      } else {
        while (t_cur >= t_i) {
          t_cur -= t_i;
          t_i *= p[3];
        }
      }
      return p[1] + (p[0] - p[1]) * (1.0 + cos(kPi * t_cur / t_i)) / 2.0;
    }
    case kSegCyclic: {
      const double cycle = floor(1.0 + u / p[2]);
      const double x = 1.0 + u / p[2] - cycle;
      const double scale_factor = x <= p[3] ? x / p[3] : (x - 1.0) / (p[3] - 1.0);
      const double base_height = (p[1] - p[0]) * scale_factor;
      const int mode = static_cast<int>(p[4]);
      const double scale = mode == 0 ? 1.0 : (mode == 1 ? 1.0 / pow(2.0, cycle - 1.0) : pow(p[5], u));
      return p[0] + base_height * scale;
    }
    case kSegAnnealCos: {
      const double pct = (u - p[2]) / (p[3] - p[2]);
      const double cos_out = cos(kPi * pct) + 1.0;
      return p[1] + (p[0] - p[1]) / 2.0 * cos_out;
    }
    case kSegAnnealLinear: {
      const double pct = (u - p[2]) / (p[3] - p[2]);
      return (p[1] - p[0]) * pct + p[0];
    }
    case kSegHfWarmup:
      return p[0] * (u / p[1]);
    case kSegHfLinearDecay:
      return p[0] * fmax(0.0, (p[1] - u) / p[2]);
    case kSegHfCosine: {
      const double progress = (u - p[1] + p[5]) / p[2];
      double factor = 0.5 * (1.0 + cos(kPi * p[3] * 2.0 * progress));
      factor = factor * (1.0 - p[4]) + p[4];
      return p[0] * fmax(0.0, factor);
    }
    case kSegHfCosineRestarts: {
      const double progress = (u - p[1]) / p[2];
      if (progress >= 1.0) return p[0] * 0.0;
      return p[0] * fmax(0.0, 0.5 * (1.0 + cos(kPi * py_mod(p[3] * progress, 1.0))));
    }
    case kSegHfPolynomial: {
      if (u > p[5]) return p[0] * (p[2] / p[1]);
      const double lr_range = p[1] - p[2];
      const double decay_steps = p[5] - p[4];
      const double pct_remaining = 1.0 - (u - p[4]) / decay_steps;
      const double decay = lr_range * pow(pct_remaining, p[3]) + p[2];
      return p[0] * (decay / p[1]);
    }
    case kSegHfInverseSqrt:
      return p[0] * (1.0 / sqrt((u + p[1]) / p[2]));
    case kSegHfWarmupRate:
      return p[0] * (p[1] + (1.0 - p[1]) * u / p[2]);
    case kSegWsd: {
      const double progress = (u - p[1]) / p[2];
      const int shape = static_cast<int>(p[3]);
      double factor;
      if (p[4] != 0.0) {  // warmup
        factor = shape == 0 ? progress : (shape == 1 ? 0.5 * (1.0 - cos(kPi * progress)) : 1.0 - sqrt(1.0 - progress));
      } else {  // decay
        factor = shape == 0 ? 1.0 - progress
                            : (shape == 1 ? 0.5 * (1.0 + cos(kPi * p[6] * 2.0 * progress)) : 1.0 - sqrt(progress));
      }
      factor = factor * (1.0 - p[5]) + p[5];
      return p[0] * fmax(0.0, factor);
    }
    default:
      return NAN;
  }
}

// Evaluates a group's program at step t. value[k] is overwritten only for targets the program sets; `set`
// reports which (bit k).
FS_HOST_DEVICE uint32_t evaluate_schedule(const double* program, int64_t segments, double t, double* value) {
  uint32_t set = 0;
  for (int64_t i = 0; i < segments; ++i) {
    const double* s = program + i * kScheduleColumns;
    const int kind = static_cast<int>(s[kSegKind]);
    if (kind == kSegmentEnd) break;
    if (!(s[kSegLo] <= t && t < s[kSegHi])) continue;
    // Two targets (lr, momentum), each written with a constant index: value[target] with a run-time target put the
    // caller's value array in local memory on GPUs (16 bytes of stack per step kernel, bench/kernel_resources.py).
    const bool momentum = static_cast<int>(s[kSegTarget]) == kTargetMomentum;
    const bool mul = static_cast<int>(s[kSegCombine]) == kCombineMul;
    const double v = segment_value(s, t);
    if (momentum) {
      value[kTargetMomentum] = mul ? value[kTargetMomentum] * v : v;
    } else {
      value[kTargetLr] = mul ? value[kTargetLr] * v : v;
    }
    if (!mul) set |= 1u << (momentum ? kTargetMomentum : kTargetLr);
  }
  return set;
}

}  // namespace FS_MATH_ABI
}  // namespace fused_sched
