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

import math
import warnings
from bisect import bisect_right
from typing import TYPE_CHECKING, Literal

import torch
from torch.optim import lr_scheduler as _torch

from ._schedule_program import (
    ANNEAL_COS,
    ANNEAL_LINEAR,
    CONST,
    COSINE,
    CYCLIC,
    EXPONENTIAL,
    INF,
    LINEAR,
    LR,
    MOMENTUM,
    P0,
    POLYNOMIAL,
    STEP,
    WARM_RESTARTS,
    Program,
    Segment,
    evaluate_reference,
)
from ._scheduler_base import DeviceScheduleMixin

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from torch.optim import Optimizer

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

_CYCLIC_MODES = {"triangular": 0, "triangular2": 1, "exp_range": 2}


def _plain(values) -> bool:
    """True when every value is a Python number (not a Tensor, whose arithmetic torch does in its own dtype)."""
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _integral(value) -> bool:
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _unbind_tree(scheduler) -> None:
    """Unbind `scheduler` and, for a composite, all its descendants (a composite that binds takes over)."""
    if isinstance(scheduler, DeviceScheduleMixin):
        scheduler._unbind()
    for child in getattr(scheduler, "_schedulers", ()):
        _unbind_tree(child)


def _close(a: float, b: float) -> bool:
    """Equal up to the float64 drift of torch's recursive form (a different anchor differs macroscopically)."""
    return a == b or abs(a - b) <= 1e-9 * max(abs(a), abs(b))


class _DeviceSchedule(DeviceScheduleMixin):
    """The layer every class of this module shares over DeviceScheduleMixin.

    * ``_lr_programs(bases)``: the lr programs of the class for given base lrs (ChainedScheduler builds its factors
      with bases of 1).
    * Anchoring: torch's recursive form continues from the lr the param group holds, which is ``base * h(t)`` only
      when the scheduler started from ``base`` (not so for a second scheduler on an optimizer another one already
      moved, for torch's ``last_epoch=k`` constructor, or for the first child of a SequentialLR built with a
      OneCycleLR, which rewrites ``initial_lr``). At bind time the program is checked against ``get_last_lr()`` at
      ``last_epoch``; when the two disagree, the program is re-anchored on the host's value (``_reanchor``), or the
      scheduler goes to host mode where it cannot be.
    * ``step(epoch)`` (torch's deprecated closed-form jump) rebinds when the programs change (a re-anchored
      program returns to the closed form; CosineAnnealingWarmRestarts restarts its cycle); otherwise it only sets
      the device step counter.
    """

    #: lr(t) = base * h(t) and torch's recursive step is lr *= h(t) / h(t - 1) (ChainedScheduler can multiply).
    _multiplicative = False

    def step(self, epoch: int | None = None) -> None:
        """torch's host step, then the device counter (or the host-mode constants) follows. (SequentialLR and
        ChainedScheduler take no epoch in torch: it is passed on only when given.)"""
        # An lr written into a group since this scheduler's last step (by hand, by another scheduler stepping the
        # same optimizer): torch's recursive step continues from it, so the programs are re-anchored on the new
        # host values after the step (a rebind: a table upload, no sync).
        rebind = self._lr_written_by_hand()
        if epoch is None:
            super().step()
        else:
            super().step(epoch)
        if rebind:
            self._bind()
            return
        self._after_step(epoch)

    def _lr_programs(self, bases: list, closed_entry: bool = False) -> list[Program] | None:
        """lr programs for these base lrs. closed_entry: the scheduler is entered at its step 0 with torch's closed
        form (a SequentialLR child after the first), not with its initial recursive step."""
        return None

    def _reanchor(self, g: int, last: float, t0: int, closed_entry: bool) -> Program | None:
        """Group g's program through the host value `last` at step t0 (multiplicative classes: base = last / h(t0))."""
        unit = self._lr_programs([1.0], closed_entry)
        if unit is None:
            return None
        h = evaluate_reference(unit[0], t0)[0]
        if not math.isfinite(h) or h == 0.0:
            return None
        return self._lr_programs([last / h], closed_entry)[0]

    def _anchored_programs(self, closed_entry: bool = False) -> list[Program] | None:
        last_lrs = self.get_last_lr()
        if not _plain(self.base_lrs) or not _plain(last_lrs):
            return None
        programs = self._lr_programs(self.base_lrs, closed_entry)
        if programs is None:
            return None
        t0 = self.last_epoch
        anchored = []
        for g, (program, last) in enumerate(zip(programs, last_lrs, strict=True)):
            if not _close(evaluate_reference(program, t0)[0], last):
                program = self._reanchor(g, last, t0, closed_entry)
                if program is None:
                    return None
            anchored.append(program)
        return anchored

    def _programs(self) -> list[Program] | None:
        return self._anchored_programs()

    def _sequence_programs(self, first: bool, pending: bool) -> list[Program] | None:
        """Programs in this scheduler's own step count when it is a SequentialLR child.

        first: SequentialLR gave this child its initial step (the child that runs at step 0); every other child is
        entered at its milestone with ``_update_lr(0)``, torch's closed form at 0 where the class has one.
        pending: the child has not been entered yet (its milestone lies ahead), so it has no host value to check.
        """
        if pending:
            return self._lr_programs(self.base_lrs, not first) if _plain(self.base_lrs) else None
        return self._anchored_programs(closed_entry=not first)

    def _after_step(self, epoch) -> None:
        binding = self._binding
        if epoch is not None and binding is not None and not getattr(self, "_host_mode", False):
            if self._programs() != binding.programs:
                self._bind()
                return
        self._device_step()


class LambdaLR(_DeviceSchedule, _torch.LambdaLR):
    """torch.optim.lr_scheduler.LambdaLR: lr = base_lr * lr_lambda(epoch).

    Host mode: ``lr_lambda`` is an arbitrary Python callable, so the lr is computed on the host at each step and
    copied to the device (no sync). A CUDA graph cannot replay this schedule: a captured optimizer step keeps the
    lr it was captured with. The transformers schedules of fused_sched.hf_schedules are LambdaLRs with device
    programs.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        lr_lambda: Callable[[int], float] | list[Callable[[int], float]],
        last_epoch: int = -1,
    ) -> None:
        super().__init__(optimizer, lr_lambda, last_epoch)
        self._bind()


class MultiplicativeLR(_DeviceSchedule, _torch.MultiplicativeLR):
    """torch.optim.lr_scheduler.MultiplicativeLR: lr *= lr_lambda(epoch) at every step after the first.

    Host mode: ``lr_lambda`` is an arbitrary Python callable, so the lr is computed on the host at each step and
    copied to the device (no sync). A CUDA graph cannot replay this schedule: a captured optimizer step keeps the
    lr it was captured with.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        lr_lambda: Callable[[int], float] | list[Callable[[int], float]],
        last_epoch: int = -1,
    ) -> None:
        super().__init__(optimizer, lr_lambda, last_epoch)
        self._bind()


class StepLR(_DeviceSchedule, _torch.StepLR):
    """torch.optim.lr_scheduler.StepLR; device program: one STEP segment ``base * gamma ** floor(t / step_size)``.

    A non-positive or fractional ``step_size`` (where torch's recursive and closed forms disagree) runs in host
    mode.
    """

    _multiplicative = True

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1, last_epoch: int = -1) -> None:
        super().__init__(optimizer, step_size, gamma, last_epoch)
        self._bind()

    def _lr_programs(self, bases, closed_entry=False):
        if not _integral(self.step_size) or self.step_size <= 0:
            return None
        return [Program([Segment(STEP, (b, self.gamma, self.step_size))]) for b in bases]


class MultiStepLR(_DeviceSchedule, _torch.MultiStepLR):
    """torch.optim.lr_scheduler.MultiStepLR; device program: CONST segments between the milestones.

    The constants are computed as torch's recursive step computes them (``lr * gamma ** count`` at each milestone
    the step counter reaches), so the kernels use exactly the host's learning rates.
    """

    _multiplicative = True

    def __init__(
        self, optimizer: Optimizer, milestones: Iterable[int], gamma: float = 0.1, last_epoch: int = -1
    ) -> None:
        super().__init__(optimizer, milestones, gamma, last_epoch)
        self._bind()

    def _lr_programs(self, bases, closed_entry=False):
        counts = self.milestones
        # The recursion multiplies when the (integer, non-negative) step counter hits a milestone key.
        reached = sorted(m for m in counts if _integral(m) and m > 0)
        programs = []
        for b in bases:
            if closed_entry:
                value = b * self.gamma ** bisect_right(sorted(counts.elements()), 0)
            else:  # the initial step: the recursion at 0
                value = b * self.gamma ** counts[0] if 0 in counts else b
            segments, lo = [], -INF
            for m in reached:
                segments.append(Segment(CONST, (value,), lo, m))
                value = value * self.gamma ** counts[m]
                lo = m
            segments.append(Segment(CONST, (value,), lo, INF))
            programs.append(Program(segments))
        return programs


class ConstantLR(_DeviceSchedule, _torch.ConstantLR):
    """torch.optim.lr_scheduler.ConstantLR; device program: CONST ``base * factor`` before ``total_iters``, then
    the value torch's recursion restores there (``lr * (1 / factor)``)."""

    _multiplicative = True

    def __init__(
        self, optimizer: Optimizer, factor: float = 1.0 / 3, total_iters: int = 5, last_epoch: int = -1
    ) -> None:
        super().__init__(optimizer, factor, total_iters, last_epoch)
        self._bind()

    def _lr_programs(self, bases, closed_entry=False):
        factor, total = self.factor, self.total_iters
        programs = []
        for b in bases:
            if closed_entry:
                first = b * (factor + (total <= 0) * (1 - factor))
            else:  # the initial step: the recursion at 0
                first = b * factor
            if _integral(total) and total > 0:
                # factor == 0: torch divides by zero at total_iters and raises before the device sees that step.
                restored = first * (1.0 / factor) if factor != 0 else b
                segments = [Segment(CONST, (first,), -INF, total), Segment(CONST, (restored,), total, INF)]
            else:  # the recursion never meets total_iters again
                segments = [Segment(CONST, (first,))]
            programs.append(Program(segments))
        return programs


class LinearLR(_DeviceSchedule, _torch.LinearLR):
    """torch.optim.lr_scheduler.LinearLR; device program: one LINEAR segment
    ``base * (start + (end - start) * min(total_iters, t) / total_iters)`` (CONST ``base * start`` when
    total_iters <= 0: torch's recursion never moves then)."""

    _multiplicative = True

    def __init__(
        self,
        optimizer: Optimizer,
        start_factor: float = 1.0 / 3,
        end_factor: float = 1.0,
        total_iters: int = 5,
        last_epoch: int = -1,
    ) -> None:
        super().__init__(optimizer, start_factor, end_factor, total_iters, last_epoch)
        self._bind()

    def _lr_programs(self, bases, closed_entry=False):
        total = self.total_iters
        if not _integral(total):
            return None
        if total <= 0:
            return [Program([Segment(CONST, (b * self.start_factor,))]) for b in bases]
        return [Program([Segment(LINEAR, (b, self.start_factor, self.end_factor, total))]) for b in bases]


class ExponentialLR(_DeviceSchedule, _torch.ExponentialLR):
    """torch.optim.lr_scheduler.ExponentialLR; device program: one EXPONENTIAL segment ``base * gamma ** t``."""

    _multiplicative = True

    def __init__(self, optimizer: Optimizer, gamma: float, last_epoch: int = -1) -> None:
        super().__init__(optimizer, gamma, last_epoch)
        self._bind()

    def _lr_programs(self, bases, closed_entry=False):
        return [Program([Segment(EXPONENTIAL, (b, self.gamma))]) for b in bases]


class PolynomialLR(_DeviceSchedule, _torch.PolynomialLR):
    """torch.optim.lr_scheduler.PolynomialLR; device program: one POLYNOMIAL segment
    ``base * (1 - min(total_iters, t) / total_iters) ** power`` (CONST ``base`` when total_iters <= 0)."""

    _multiplicative = True

    def __init__(self, optimizer: Optimizer, total_iters: int = 5, power: float = 1.0, last_epoch: int = -1) -> None:
        super().__init__(optimizer, total_iters, power, last_epoch)
        self._bind()

    def _lr_programs(self, bases, closed_entry=False):
        total = self.total_iters
        if not _integral(total):
            return None
        if total <= 0:
            return [Program([Segment(CONST, (b,))]) for b in bases]
        return [Program([Segment(POLYNOMIAL, (b, total, self.power))]) for b in bases]


class CosineAnnealingLR(_DeviceSchedule, _torch.CosineAnnealingLR):
    """torch.optim.lr_scheduler.CosineAnnealingLR; device program: one COSINE segment
    ``eta_min + (base - eta_min) * (1 + cos(pi * t / T_max)) / 2``, periodic past T_max as torch.

    torch's recursion restarts from ``base`` one step past each trough (``(t - 1 - T_max) % (2 T_max) == 0``): a
    program anchored on another lr (see the module notes) switches to ``base`` there. For the same reason the
    class is not multiplicative for ChainedScheduler. T_max == 0 runs in host mode.
    """

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0, last_epoch: int = -1) -> None:
        super().__init__(optimizer, T_max, eta_min, last_epoch)
        self._bind()

    def _lr_programs(self, bases, closed_entry=False):
        if self.T_max == 0 or not _plain([self.eta_min]):
            return None
        return [Program([Segment(COSINE, (b, self.eta_min, self.T_max))]) for b in bases]

    def _reanchor(self, g, last, t0, closed_entry):
        period, eta = self.T_max, self.eta_min
        cos_term = 1 + math.cos(math.pi * t0 / period)
        if not _integral(period) or period <= 0 or cos_term == 0:
            return None
        # eta + (last - eta) * c(t) / c(t0) until the next restart step t_s, then torch's base again.
        anchor = eta + (last - eta) * 2 / cos_term
        restart = period + 1 + 2 * period * ((t0 - period - 1) // (2 * period) + 1)
        return Program([
            Segment(COSINE, (anchor, eta, period), -INF, restart),
            Segment(COSINE, (self.base_lrs[g], eta, period), restart, INF),
        ])


class CosineAnnealingWarmRestarts(_DeviceSchedule, _torch.CosineAnnealingWarmRestarts):
    """torch.optim.lr_scheduler.CosineAnnealingWarmRestarts; device program: one WARM_RESTARTS segment.

    The segment starts from the scheduler's current cycle (``T_i``, ``T_cur``), so ``step(epoch)`` with a
    fractional epoch (torch's documented per-batch use) and ``load_state_dict`` rebind the program at the state
    torch computed.
    """

    def __init__(
        self, optimizer: Optimizer, T_0: int, T_mult: int = 1, eta_min: float = 0.0, last_epoch: int = -1
    ) -> None:
        super().__init__(optimizer, T_0, T_mult, eta_min, last_epoch)
        self._bind()

    def _restart_programs(self, origin) -> list[Program] | None:
        if not _plain([*self.base_lrs, self.T_cur, self.T_i, self.eta_min]):
            return None
        return [
            Program([Segment(WARM_RESTARTS, (b, self.eta_min, self.T_i, self.T_mult), origin=origin)])
            for b in self.base_lrs
        ]

    def _programs(self):
        # The local time t - origin is T_cur at the current step; the cycle in progress has length T_i.
        return self._restart_programs(self.last_epoch - self.T_cur)

    def _sequence_programs(self, first, pending):
        # A pending child is entered at its local step 0 with its cycle state as it is (torch's _update_lr(0)).
        return self._restart_programs(-self.T_cur if pending else self.last_epoch - self.T_cur)

    def step(self, epoch=None) -> None:
        super().step(epoch)
        self._after_step(epoch)


class CyclicLR(_DeviceSchedule, _torch.CyclicLR):
    """torch.optim.lr_scheduler.CyclicLR; device program: one CYCLIC segment for the lr and, with
    ``cycle_momentum``, one for the momentum (SGD) / beta1 (Adam), moving opposite to the lr as torch does.

    A custom ``scale_fn`` (an arbitrary callable) runs in host mode: the lr and momentum are computed on the host
    and copied to the device at each step; a CUDA graph cannot replay it.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        base_lr: float | list[float],
        max_lr: float | list[float],
        step_size_up: int = 2000,
        step_size_down: int | None = None,
        mode: Literal["triangular", "triangular2", "exp_range"] = "triangular",
        gamma: float = 1.0,
        scale_fn: Callable[[float], float] | None = None,
        scale_mode: Literal["cycle", "iterations"] = "cycle",
        cycle_momentum: bool = True,
        base_momentum: float = 0.8,
        max_momentum: float = 0.9,
        last_epoch: int = -1,
    ) -> None:
        super().__init__(
            optimizer, base_lr, max_lr, step_size_up, step_size_down, mode, gamma, scale_fn, scale_mode,
            cycle_momentum, base_momentum, max_momentum, last_epoch,
        )
        self._bind()

    def _cyclic_programs(self) -> list[Program] | None:
        if self._scale_fn_custom is not None or self.mode not in _CYCLIC_MODES:
            return None
        if not _plain([*self.base_lrs, *self.max_lrs, self.gamma]):
            return None
        if self.cycle_momentum and not _plain([*self.base_momentums, *self.max_momentums]):
            return None
        shape = (self.total_size, self.step_ratio, _CYCLIC_MODES[self.mode], self.gamma)
        programs = []
        for g in range(len(self.base_lrs)):
            segments = [Segment(CYCLIC, (self.base_lrs[g], self.max_lrs[g], *shape))]
            if self.cycle_momentum:
                # torch: max_m - (max_m - base_m) * sf * scale == max_m + (base_m - max_m) * sf * scale, bit for bit
                values = (self.max_momentums[g], self.base_momentums[g], *shape)
                segments.append(Segment(CYCLIC, values, target=MOMENTUM))
            programs.append(Program(segments))
        return programs

    def _programs(self):
        programs = self._cyclic_programs()
        if programs is None or not _plain(self.get_last_lr()):
            return None
        # torch's initial step runs before CyclicLR sets base_lrs: it uses the group's initial_lr, which differs
        # from base_lr when another scheduler set initial_lr first. Hold the host value for that one step.
        t0 = self.last_epoch
        for program, last in zip(programs, self.get_last_lr(), strict=True):
            if evaluate_reference(program, t0)[0] != last:
                program.segments.append(Segment(CONST, (last,), t0, t0 + 1))
        return programs

    def _sequence_programs(self, first, pending):
        return self._cyclic_programs() if pending else self._programs()


class OneCycleLR(_DeviceSchedule, _torch.OneCycleLR):
    """torch.optim.lr_scheduler.OneCycleLR; device program: one ANNEAL_COS / ANNEAL_LINEAR segment per phase for
    the lr and, with ``cycle_momentum``, for the momentum (SGD) / beta1 (Adam).

    Phase k is active on the integer steps torch gives it (``step_num <= end_step`` of the first phase that holds,
    the last phase otherwise), with torch's float phase bounds in the formula. Stepping past total_steps raises
    ValueError on the host, as torch.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        max_lr: float | list[float],
        total_steps: int | None = None,
        epochs: int | None = None,
        steps_per_epoch: int | None = None,
        pct_start: float = 0.3,
        anneal_strategy: Literal["cos", "linear"] = "cos",
        cycle_momentum: bool = True,
        base_momentum: float | list[float] = 0.85,
        max_momentum: float | list[float] = 0.95,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        three_phase: bool = False,
        last_epoch: int = -1,
    ) -> None:
        super().__init__(
            optimizer, max_lr, total_steps, epochs, steps_per_epoch, pct_start, anneal_strategy, cycle_momentum,
            base_momentum, max_momentum, div_factor, final_div_factor, three_phase, last_epoch,
        )
        self._bind()

    def _programs(self):
        strategy = getattr(self, "_anneal_func_type", None)
        if strategy not in ("cos", "linear"):
            return None
        kind = ANNEAL_COS if strategy == "cos" else ANNEAL_LINEAR
        phases = self._schedule_phases
        keys = [("start_lr", "end_lr", LR)]
        if self.cycle_momentum:
            keys.append(("start_momentum", "end_momentum", MOMENTUM))
        programs = []
        for group in self.optimizer.param_groups:
            if not _plain([group[phase[k]] for phase in phases for start, end, _ in keys for k in (start, end)]):
                return None
            segments = []
            start_step, lo = 0.0, -INF
            for i, phase in enumerate(phases):
                end_step = phase["end_step"]
                # torch takes phase i for integer t <= end_step (the first such phase); the last one takes the rest.
                hi = INF if i == len(phases) - 1 else max(lo, math.floor(end_step) + 1.0)
                if lo < hi:
                    for start, end, target in keys:
                        values = (group[phase[start]], group[phase[end]], start_step, end_step)
                        segments.append(Segment(kind, values, lo, hi, target=target))
                start_step, lo = end_step, hi
            programs.append(Program(segments))
        return programs

    def _sequence_programs(self, first, pending):
        return self._programs()


class SequentialLR(_DeviceSchedule, _torch.SequentialLR):
    """torch.optim.lr_scheduler.SequentialLR; device program: each child's program shifted to its milestone and
    clipped to the steps torch gives it.

    torch's milestone behaviour is kept: the child that runs at step 0 gets its initial (recursive) step there;
    every later child is entered at its milestone with its closed form at 0 (``_update_lr(0)``) and stepped
    recursively afterwards. A momentum / beta1 that a child cycles keeps, outside that child's steps, the value
    torch leaves in the param group (the program carries it as constants). The children stop driving the
    optimizer when the SequentialLR is built. Children may be any fused_sched scheduler (fused_sched.hf_schedules
    too). Host mode when a child is in host mode, is not a fused_sched scheduler or is a composite, or when the
    milestones are not sorted.
    """

    def __init__(
        self, optimizer: Optimizer, schedulers: list[_torch.LRScheduler], milestones: list[int], last_epoch: int = -1
    ) -> None:
        super().__init__(optimizer, schedulers, milestones, last_epoch)
        self._bind()

    def _bind(self) -> None:
        for child in self._schedulers:
            _unbind_tree(child)
        super()._bind()

    def _programs(self):
        children, milestones = self._schedulers, list(self._milestones)
        if milestones != sorted(milestones):
            return None
        if not all(isinstance(c, DeviceScheduleMixin) and not hasattr(c, "_schedulers") for c in children):
            return None
        now = self.last_epoch
        active = bisect_right(milestones, now)
        initial = bisect_right(milestones, 0)  # the child SequentialLR.__init__ gave its initial step
        groups = len(self.optimizer.param_groups)
        segments: list[list[Segment]] = [[] for _ in range(groups)]
        spans: list[tuple[float, float, list[Program]]] = []
        for i, child in enumerate(children):
            lo = -INF if i == 0 else milestones[i - 1]
            hi = milestones[i] if i < len(milestones) else INF
            if lo >= hi or i < initial:
                continue  # torch never runs this child
            if isinstance(child, _DeviceSchedule):
                programs = child._sequence_programs(first=i == initial, pending=i > active)
            else:  # another fused_sched scheduler (transformers schedules): closed forms in its own count
                programs = child._programs()
            if programs is None:
                return None
            # The child counts t - offset (the running child: as its own counter says).
            if i == active:
                offset = now - child.last_epoch
            else:
                offset = 0 if i == initial else milestones[i - 1]
            shifted = [Program([s.shifted(offset, lo, hi) for s in p.segments]) for p in programs]
            for g in range(groups):
                segments[g].extend(shifted[g].segments)
            spans.append((lo, hi, shifted))
        for g, group in enumerate(self.optimizer.param_groups):
            if any(s.target == MOMENTUM for s in segments[g]):
                gaps = self._momentum_gaps(g, group, spans)
                if gaps is None:
                    return None
                segments[g].extend(gaps)
        return [Program(s) for s in segments]

    @staticmethod
    def _momentum_gaps(g: int, group: dict, spans) -> list[Segment] | None:
        """CONST momentum segments where no child cycles it: there torch leaves the last value a cycling child set
        (before any, the value the param group holds now)."""
        value = group["betas"][0] if "betas" in group else group.get("momentum")
        gaps = []
        for lo, hi, programs in spans:
            if MOMENTUM in programs[g].targets():
                if hi != INF:
                    value = evaluate_reference(programs[g], hi - 1.0)[MOMENTUM]
            else:
                if not _plain([value]):
                    return None
                gaps.append(Segment(CONST, (value,), lo, hi, target=MOMENTUM))
        return gaps

    def step(self) -> None:  # torch's signature: no epoch
        super().step()

    def _rewind_host(self, step: int) -> None:
        """Also the running child's counter: torch counts a SequentialLR's steps in the child that runs them (from
        0 at its milestone), and the programs of a rebind (a resumed state_dict) are placed by it."""
        super()._rewind_host(step)
        milestones = list(self._milestones)
        active = bisect_right(milestones, step)
        child = self._schedulers[active]
        child.last_epoch = step - (milestones[active - 1] if active > 0 else 0)
        child._last_lr = list(self._last_lr)


class ChainedScheduler(_DeviceSchedule, _torch.ChainedScheduler):
    """torch.optim.lr_scheduler.ChainedScheduler; device program: the first child's program followed by the other
    children's programs as factors (MUL segments with base 1).

    That product is torch's value when every child is multiplicative (its step is ``lr *= h(t) / h(t - 1)``):
    StepLR, MultiStepLR, ConstantLR, LinearLR, ExponentialLR, PolynomialLR. Any other child (CosineAnnealingLR,
    whose recursion restarts from ``base`` past each trough; CyclicLR and OneCycleLR, which set the lr; lambdas;
    composites; torch's own classes) puts the chain in host mode. The step counter of the chain is its first
    child's ``last_epoch`` (torch's ChainedScheduler keeps none).
    """

    def __init__(self, schedulers: Sequence[_torch.LRScheduler], optimizer: Optimizer | None = None) -> None:
        super().__init__(schedulers, optimizer)
        self._bind()

    @property
    def last_epoch(self) -> int:
        return getattr(self._schedulers[0], "last_epoch", 0) if self._schedulers else 0

    @last_epoch.setter
    def last_epoch(self, value: int) -> None:
        # torch's ChainedScheduler has no counter of its own: assigning one (torch's _update_lr does, before it
        # fails with NotImplementedError) changes nothing.
        pass

    def _bind(self) -> None:
        for child in self._schedulers:
            _unbind_tree(child)
        super()._bind()

    def _product(self, first_bases: list) -> list[Program] | None:
        children = self._schedulers
        programs = children[0]._lr_programs(first_bases)
        if programs is None:
            return None
        programs = [Program(list(p.segments)) for p in programs]
        ones = [1.0] * len(programs)
        for child in children[1:]:
            factors = child._lr_programs(ones)
            if factors is None:
                return None
            # Child k counts t + (its last_epoch - the first child's): in the chain's count it is shifted back.
            offset = self.last_epoch - child.last_epoch
            for program, factor in zip(programs, factors, strict=True):
                program.segments.extend(s.as_factor().shifted(offset) for s in factor.segments)
        return programs

    def _programs(self):
        children = self._schedulers
        if not all(isinstance(c, _DeviceSchedule) and c._multiplicative for c in children):
            return None
        last_lrs = self.get_last_lr()
        if not all(_plain(c.base_lrs) for c in children) or not _plain(last_lrs):
            return None
        programs = self._product(children[0].base_lrs)
        if programs is None:
            return None
        t0 = self.last_epoch
        for g, last in enumerate(last_lrs):
            if not _close(evaluate_reference(programs[g], t0)[0], last):
                # Anchor the product on the host's lr (the first child started from another lr than its base).
                unit = evaluate_reference(self._product([1.0] * len(programs))[g], t0)[0]
                if not math.isfinite(unit) or unit == 0.0:
                    return None
                programs[g] = self._product([last / unit] * len(programs))[g]
        return programs

    def step(self) -> None:  # torch's signature: no epoch
        super().step()

    def _rewind_host(self, step: int) -> None:
        """The children's counters, which are the chain's (every child steps at every chain step)."""
        behind = self.last_epoch - step
        for child in self._schedulers:
            child.last_epoch -= behind
        super()._rewind_host(step)


class ReduceLROnPlateau(_DeviceSchedule, _torch.ReduceLROnPlateau):
    """torch.optim.lr_scheduler.ReduceLROnPlateau; with a metric held in a tensor, decided on the device.

    ``step(metric)`` with a Python number (or anything ``float()`` accepts that is not a tensor) takes torch's host
    decision and copies the new learning rates into the program's constants (no sync).

    ``step(metric)`` with a tensor (a loss still on the GPU) takes the same decision on the metric's device with
    tensor operations, mirroring torch's arithmetic in float64: best value, bad-epoch and cooldown counters live in
    device tensors and the reduced learning rates are written straight into the program the kernels read. Nothing
    is copied to the host, so the step does not synchronize and can be captured in a CUDA graph. The host copies
    (``get_last_lr()``, ``best``, ``num_bad_epochs``, ``cooldown_counter``, ``group["lr"]``) are brought up to date
    when ``get_last_lr()``, ``state_dict()`` or a step with a Python number asks for them: that read waits for the
    device. Reading ``group["lr"]`` directly in between shows the value of the last such read.
    """

    _skips_with_optimizer = False

    def __init__(
        self,
        optimizer: Optimizer,
        mode: Literal["min", "max"] = "min",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: Literal["rel", "abs"] = "rel",
        cooldown: int = 0,
        min_lr: list[float] | float = 0,
        eps: float = 1e-8,
    ) -> None:
        self._plateau_device = None
        super().__init__(optimizer, mode, factor, patience, threshold, threshold_mode, cooldown, min_lr, eps)
        self._bind()

    _RUNTIME_KEYS = (*DeviceScheduleMixin._RUNTIME_KEYS, "_plateau_device")

    def _programs(self):
        return None

    def step(self, metrics, epoch=None) -> None:
        if isinstance(metrics, torch.Tensor) and self._binding is not None:
            self._device_decision(metrics, epoch)
            return
        self._pull_device_state()
        _torch.ReduceLROnPlateau.step(self, metrics, epoch)
        self._plateau_device = None  # the host decided: the next device decision starts from the host's state
        self._device_step()

    def get_last_lr(self) -> list[float]:
        self._pull_device_state()
        return super().get_last_lr()

    def state_dict(self):
        self._pull_device_state()
        return super().state_dict()

    def load_state_dict(self, state_dict):
        self._plateau_device = None
        super().load_state_dict(state_dict)

    def _device_decision(self, metric: torch.Tensor, epoch) -> None:
        if epoch is None:
            epoch = self.last_epoch + 1
        else:
            warnings.warn(_torch.EPOCH_DEPRECATION_WARNING, UserWarning, stacklevel=3)
        self.last_epoch = epoch
        groups = self.optimizer.param_groups
        if len(self._binding.programs) != len(groups) or not all(self._binding.lr_groups):
            self._pull_device_state()
            self._bind()  # a group added since: every group gets its CONST segment
        device = metric.device
        state = self._plateau_state(device)
        lrs_view = self._binding.table(device)[:, 0, P0]  # the CONST lr segment of every group
        # A tensor lr is the lr the kernels read (its CONST segment is unused): decided from and written back into
        # the tensor, as torch's fill_ does.
        tensor_lrs = [(g, group["lr"]) for g, group in enumerate(groups) if isinstance(group["lr"], torch.Tensor)]
        for g, lr in tensor_lrs:
            lrs_view[g].copy_(lr.reshape(()), non_blocking=True)
        current = metric.detach().to(dtype=torch.float64).reshape(())
        best, bad, cooldown = state["best"], state["bad"], state["cooldown"]
        if self.mode == "min" and self.threshold_mode == "rel":
            better = current < best * (1.0 - self.threshold)
        elif self.mode == "min":
            better = current < best - self.threshold
        elif self.threshold_mode == "rel":
            better = current > best * (self.threshold + 1.0)
        else:
            better = current > best + self.threshold
        best.copy_(torch.where(better, current, best))
        bad.copy_(torch.where(better, torch.zeros_like(bad), bad + 1.0))
        in_cooldown = cooldown > 0
        cooldown.copy_(torch.where(in_cooldown, cooldown - 1.0, cooldown))
        bad.copy_(torch.where(in_cooldown, torch.zeros_like(bad), bad))
        reduce = bad > self.patience
        if len(self.optimizer.param_groups) != len(self.min_lrs):
            if self.default_min_lr is None:  # torch's rule for a param group added since construction
                raise RuntimeError(
                    f"The number of param groups in the `optimizer` ({len(self.optimizer.param_groups)}) differs "
                    f"from when `ReduceLROnPlateau` was initialized ({len(self.min_lrs)}), usually due to a new "
                    "param group being added to the optimizer. Please modify the `min_lrs` field to match the "
                    "length of the `optimizer` param groups."
                )
            self.min_lrs = [self.default_min_lr] * len(self.optimizer.param_groups)
        min_lrs = torch.tensor([float(m) for m in self.min_lrs], dtype=torch.float64).to(device, non_blocking=True)
        old = lrs_view.clone()
        new = torch.maximum(old * self.factor, min_lrs)
        lrs_view.copy_(torch.where(reduce & (old - new > self.eps), new, old))
        for g, lr in tensor_lrs:
            lr.copy_(lrs_view[g].reshape(lr.shape), non_blocking=True)
        cooldown.copy_(torch.where(reduce, torch.full_like(cooldown, float(self.cooldown)), cooldown))
        bad.copy_(torch.where(reduce, torch.zeros_like(bad), bad))
        for other, table in self._binding.tables.items():
            if other != device:
                table[:, 0, P0].copy_(lrs_view, non_blocking=True)
        state["pending"] = True

    def _plateau_state(self, device: torch.device) -> dict:
        state = self._plateau_device
        if state is None or state["device"] != device:
            self._pull_device_state()
            state = {
                "device": device,
                "best": torch.tensor(float(self.best), dtype=torch.float64).to(device),
                "bad": torch.tensor(float(self.num_bad_epochs), dtype=torch.float64).to(device),
                "cooldown": torch.tensor(float(self.cooldown_counter), dtype=torch.float64).to(device),
                "pending": False,
            }
            self._plateau_device = state
        return state

    def _pull_device_state(self) -> None:
        """Bring the host copies up to date after device decisions (waits for the device)."""
        state = getattr(self, "_plateau_device", None)
        if state is None or not state["pending"]:
            return
        lrs = self._binding.table(state["device"])[:, 0, P0].tolist()
        self.best = state["best"].item()
        self.num_bad_epochs = int(state["bad"].item())
        self.cooldown_counter = int(state["cooldown"].item())
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            if not isinstance(group["lr"], torch.Tensor):  # a tensor lr holds the decision already
                group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        self._binding.host[:, 0, P0] = torch.tensor(lrs, dtype=torch.float64)
        self._record_host_lrs()  # the lrs the device decided, not lrs written by hand
        state["pending"] = False
