"""The step and decay family: StepLR, MultiStepLR, ConstantLR, LinearLR, ExponentialLR, PolynomialLR."""

from __future__ import annotations

from bisect import bisect_right
from typing import TYPE_CHECKING

from torch.optim import lr_scheduler as _torch

from .._schedule_program import CONST, EXPONENTIAL, INF, LINEAR, POLYNOMIAL, STEP, Program, Segment
from ._base import _DeviceSchedule, _integral

if TYPE_CHECKING:
    from collections.abc import Iterable

    from torch.optim import Optimizer


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
