"""Per-param-group hyper-parameter table: one float64 row per param group, read by every backend's kernel.

Mirrors csrc/include/fused_sched/optim_math.h (HyperColumn, HyperFlag); both must change together.
"""

from __future__ import annotations

import torch

LR, BETA1, BETA2, EPS, WEIGHT_DECAY, MOMENTUM, DAMPENING, FLAGS = range(8)
COLUMNS = 8

AMSGRAD = 1
MAXIMIZE = 2
NESTEROV = 4
DECOUPLED_WEIGHT_DECAY = 8
STOCHASTIC_ROUNDING = 16
# Not read by the kernels (a master copy is found by its address): makes a change of master_weights change the row,
# which is what tells the optimizer to rebuild its buckets.
MASTER_WEIGHTS = 32
# The row's lr holds even where the bound schedule program sets one: the param group's lr was written by hand
# since the scheduler's last step (torch.distributed.checkpoint's state initialization sets it to 0, for one).
LR_FROM_TABLE = 64
# The same for the momentum target (Adam's beta1, SGD's momentum): written into the param group by hand since the
# scheduler's last step.
MOMENTUM_FROM_TABLE = 128
# bfloat16 moments written rounded to nearest even instead of stochastically (state_rounding="nearest").
STATE_ROUND_NEAREST = 256
# Not read by the kernels (each tensor's format is in its address-table row): a change of a group's state format
# changes its row, which rebuilds the plan, which converts the states.
BFLOAT16_STATES = 512
EIGHT_BIT_STATES = 1024
MASTER_REMAINDER = 2048


def scalar(value) -> float:
    """A hyper-parameter as a Python float. A one-element CPU tensor is read here; a tensor on an accelerator is
    not (reading it would synchronize): its row holds 0.0 and the optimizer copies the tensor into the table on
    the device at every step (FusedOptimizer._device_values)."""
    if isinstance(value, torch.Tensor):
        return 0.0 if is_device_tensor(value) else float(value.item())
    return float(value)


def lr_scalar(value) -> float:
    """The learning rate as the table's row holds it: a float, or 0.0 for a tensor lr on any device, which the
    optimizer copies into the table with a tensor operation at every step (FusedOptimizer._device_values). Reading
    a CPU tensor here would make torch.compile guard on its value and recompile whenever the lr changes."""
    return 0.0 if isinstance(value, torch.Tensor) else float(value)


def is_device_tensor(value) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type != "cpu"


def device_tensors(group: dict) -> list:
    """(column, tensor) of the hyper-parameters besides lr that a group holds in accelerator tensors (their row
    holds 0.0; FusedOptimizer._device_values copies them in on the device): Adam's betas, the weight decay."""
    out = []
    betas = group.get("betas")
    if betas is not None:
        out += [(column, beta) for column, beta in ((BETA1, betas[0]), (BETA2, betas[1])) if is_device_tensor(beta)]
    if is_device_tensor(group.get("weight_decay")):
        out.append((WEIGHT_DECAY, group["weight_decay"]))
    return out


def same_lr(a, b) -> bool:
    """A hyper-parameter compared with the value a scheduler left (floats, or the same tensor object; never a
    device read)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    return a == b


def momentum_of(group: dict):
    """The value a schedule's momentum target drives in a param group: Adam's beta1, SGD's momentum."""
    return group["betas"][0] if "betas" in group else group.get("momentum")
