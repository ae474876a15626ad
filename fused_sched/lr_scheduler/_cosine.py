"""The cosine family: CosineAnnealingLR and CosineAnnealingWarmRestarts."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from torch.optim import lr_scheduler as _torch

from .._schedule_program import COSINE, INF, WARM_RESTARTS, Program, Segment
from ._base import _DeviceSchedule, _integral, _plain

if TYPE_CHECKING:
    from torch.optim import Optimizer


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
