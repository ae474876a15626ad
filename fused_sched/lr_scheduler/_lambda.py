"""LambdaLR and MultiplicativeLR: Python callables, so host mode."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch.optim import lr_scheduler as _torch

from ._base import _DeviceSchedule

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch.optim import Optimizer


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
