"""Schedulers made of schedulers: SequentialLR and ChainedScheduler."""

from __future__ import annotations

import math
from bisect import bisect_right
from typing import TYPE_CHECKING

from torch.optim import lr_scheduler as _torch

from .._schedule_program import CONST, INF, MOMENTUM, Program, Segment, evaluate_reference
from .._scheduler_base import DeviceScheduleMixin
from ._base import _close, _DeviceSchedule, _plain, _unbind_tree

if TYPE_CHECKING:
    from collections.abc import Sequence

    from torch.optim import Optimizer


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
