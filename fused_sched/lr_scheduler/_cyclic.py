"""The cyclic family: CyclicLR and OneCycleLR (lr and momentum)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from torch.optim import lr_scheduler as _torch

from .._schedule_program import (
    ANNEAL_COS,
    ANNEAL_LINEAR,
    CONST,
    CYCLIC,
    INF,
    LR,
    MOMENTUM,
    Program,
    Segment,
    evaluate_reference,
)
from ._base import _CYCLIC_MODES, _DeviceSchedule, _plain

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch.optim import Optimizer


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
