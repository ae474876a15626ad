"""ProgramLambdaLR: the LambdaLR that every transformers schedule factory returns, with its device program."""

from __future__ import annotations

from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

from .._schedule_program import Program
from .._scheduler_base import DeviceScheduleMixin
from ._factors import _PROGRAMS


# -- the scheduler ---------------------------------------------------------------------------------------------
class ProgramLambdaLR(DeviceScheduleMixin, LambdaLR):
    """A LambdaLR whose lambdas are this module's factor functions (``functools.partial`` of them, as in
    transformers), each of which has a device program: lr(t) of a group is ``base_lr * factor(t)`` on the host and
    the same float64 expression in the kernels. A lambda without a program (replaced by the user) puts the
    scheduler in host mode (the kernels read the host values, uploaded at each step)."""

    def __init__(self, optimizer, lr_lambda, last_epoch: int = -1):
        super().__init__(optimizer, lr_lambda, last_epoch)
        self._bind()

    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        self._device_step()

    def _programs(self) -> list[Program] | None:
        programs = []
        for fn, base_lr in zip(self.lr_lambdas, self.base_lrs, strict=True):
            if isinstance(fn, partial) and not fn.args:
                builder, keywords = _PROGRAMS.get(fn.func), fn.keywords
            else:
                builder, keywords = _PROGRAMS.get(fn), {}
            if builder is None or isinstance(base_lr, torch.Tensor):
                return None  # tensor lrs: torch computes them in the tensor's dtype, the host values are the truth
            segments = builder(float(base_lr), **keywords)
            if segments is None:
                return None
            programs.append(Program(segments))
        return programs
