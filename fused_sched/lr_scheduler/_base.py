"""What every fused_sched torch scheduler shares over DeviceScheduleMixin: _DeviceSchedule and its helpers."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .._schedule_program import Program, evaluate_reference
from .._scheduler_base import DeviceScheduleMixin

if TYPE_CHECKING:
    pass

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
