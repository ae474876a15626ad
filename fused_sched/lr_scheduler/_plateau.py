"""ReduceLROnPlateau: the decision taken from a metric, on the host or on the device."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Literal

import torch
from torch.optim import lr_scheduler as _torch

from .._schedule_program import P0
from .._scheduler_base import DeviceScheduleMixin
from ._base import _DeviceSchedule

if TYPE_CHECKING:
    from torch.optim import Optimizer


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
