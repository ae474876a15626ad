"""torch.optim.lr_scheduler, with the learning rate computed by fused_sched's kernels on the device.

Every class subclasses the torch scheduler of the same name (same signature, defaults, validation, ``state_dict``
keys; ``isinstance`` checks against torch's classes pass) and ``DeviceScheduleMixin``
(fused_sched._scheduler_base). The torch class keeps doing all the host bookkeeping exactly as torch does
(``group["lr"]``, ``get_last_lr()``, ``last_epoch``, ``state_dict()``); in addition, the scheduler describes
lr(t) of every param group as a schedule *program* (fused_sched._schedule_program) that the optimizer's kernels
evaluate at the scheduler's step counter, a device scalar that ``step()`` advances without a sync.

Precision. torch's ``step()`` updates the lr with the *recursive* (chainable) form ``lr *= ratio(t)``; the kernels
use the closed form, in float64 with torch's operation order. Both round to the same float32 learning rate
except where the float64 drift of the recursion crosses a float32 rounding boundary: then they differ by one
float32 ulp. CyclicLR, OneCycleLR and CosineAnnealingWarmRestarts compute closed forms in torch too and agree
exactly; MultiStepLR and ConstantLR are programs of constants computed with torch's recursive operations and
agree exactly as well.

Host mode. A scheduler whose lr(t) is not a fixed function of t known in advance runs in host mode: after each
host step its new learning rates are copied into the program's constants (no sync, but a CUDA graph that
captured ``optimizer.step()`` replays the constant it captured, not the new lr). Host mode is used by:

* LambdaLR and MultiplicativeLR (arbitrary Python callables), CyclicLR with a custom ``scale_fn``;
* ReduceLROnPlateau (its decision depends on the metric);
* schedulers whose lrs are Tensors (torch then does its arithmetic in the tensor's dtype, not in float64);
* SequentialLR / ChainedScheduler with a child in host mode, a child that is not a fused_sched scheduler or is
  itself a composite; ChainedScheduler with a child that is not multiplicative (see ChainedScheduler);
* degenerate parameters torch itself handles inconsistently (StepLR with a non-positive or fractional
  step_size, CosineAnnealingLR with T_max == 0, LinearLR / PolynomialLR with a fractional total_iters,
  SequentialLR with unsorted milestones).

An lr written into a param group by hand (a float) is applied until the scheduler's next step, which then
continues from it as torch's recursive step does; a tensor lr is always read from the tensor, so an in-place
``fill_`` (torch's schedulers, SWALR, users) is applied at the next optimizer step (FusedOptimizer._current_rows).
"""

from __future__ import annotations

from ._composite import ChainedScheduler, SequentialLR
from ._cosine import CosineAnnealingLR, CosineAnnealingWarmRestarts
from ._cyclic import CyclicLR, OneCycleLR
from ._decay import ConstantLR, ExponentialLR, LinearLR, MultiStepLR, PolynomialLR, StepLR
from ._lambda import LambdaLR, MultiplicativeLR
from ._plateau import ReduceLROnPlateau

__all__ = [
    "ChainedScheduler",
    "ConstantLR",
    "CosineAnnealingLR",
    "CosineAnnealingWarmRestarts",
    "CyclicLR",
    "ExponentialLR",
    "LambdaLR",
    "LinearLR",
    "MultiStepLR",
    "MultiplicativeLR",
    "OneCycleLR",
    "PolynomialLR",
    "ReduceLROnPlateau",
    "SequentialLR",
    "StepLR",
]

# The classes are defined in the family modules but belong to this module's public API: their __module__ says so,
# as it did before the split (reprs, docs, and pickles of a scheduler object name the public path).
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
