"""The schedule factories of transformers.optimization: their signatures, defaults and errors."""

from __future__ import annotations

import warnings
from functools import partial

from ._factors import (
    _constant_factor,
    _constant_with_warmup_factor,
    _cosine_factor,
    _cosine_lr_rate_factor,
    _hard_restarts_factor,
    _inverse_sqrt_factor,
    _linear_factor,
    _polynomial_factor,
    _wsd_factor,
)
from ._program_lambda import ProgramLambdaLR


# -- factories (transformers' signatures, defaults and errors) ---------------------------------------------------
def get_constant_schedule(optimizer, last_epoch: int = -1):
    """Constant learning rate: the one set in the optimizer (transformers.get_constant_schedule)."""
    return ProgramLambdaLR(optimizer, _constant_factor, last_epoch=last_epoch)


def get_reduce_on_plateau_schedule(optimizer, **kwargs):
    """ReduceLROnPlateau(optimizer, **kwargs): fused_sched.lr_scheduler's where it exists, else torch's."""
    try:
        from ..lr_scheduler import ReduceLROnPlateau
    except ImportError:
        from torch.optim.lr_scheduler import ReduceLROnPlateau
    return ReduceLROnPlateau(optimizer, **kwargs)


def get_constant_schedule_with_warmup(optimizer, num_warmup_steps: int, last_epoch: int = -1):
    """Linear warmup from 0 over `num_warmup_steps`, then the optimizer's learning rate."""
    lr_lambda = partial(_constant_with_warmup_factor, num_warmup_steps=num_warmup_steps)
    return ProgramLambdaLR(optimizer, lr_lambda, last_epoch=last_epoch)


def get_linear_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps, last_epoch=-1):
    """Linear warmup from 0, then linear decay to 0 at `num_training_steps` (0 afterwards)."""
    lr_lambda = partial(_linear_factor, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps)
    return ProgramLambdaLR(optimizer, lr_lambda, last_epoch)


def get_cosine_schedule_with_warmup(
    optimizer, num_warmup_steps: int, num_training_steps: int, num_cycles: float = 0.5, last_epoch: int = -1
):
    """Linear warmup from 0, then `num_cycles` cosine waves (default: half a wave down to 0); periodic after."""
    lr_lambda = partial(
        _cosine_factor, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps, num_cycles=num_cycles
    )
    return ProgramLambdaLR(optimizer, lr_lambda, last_epoch)


def get_cosine_with_hard_restarts_schedule_with_warmup(
    optimizer, num_warmup_steps: int, num_training_steps: int, num_cycles: int = 1, last_epoch: int = -1
):
    """Linear warmup from 0, then `num_cycles` cosine decays to 0, each restarting at the full lr; 0 after."""
    lr_lambda = partial(
        _hard_restarts_factor,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        num_cycles=num_cycles,
    )
    return ProgramLambdaLR(optimizer, lr_lambda, last_epoch)


def get_polynomial_decay_schedule_with_warmup(
    optimizer, num_warmup_steps, num_training_steps, lr_end=1e-7, power=1.0, last_epoch=-1
):
    """Linear warmup from 0, then polynomial decay to `lr_end` (held after `num_training_steps`). As in
    transformers, the decay is normalised by ``optimizer.defaults["lr"]``, not by each group's lr."""
    lr_init = optimizer.defaults["lr"]
    if not (lr_init > lr_end):
        raise ValueError(f"lr_end ({lr_end}) must be smaller than initial lr ({lr_init})")

    lr_lambda = partial(
        _polynomial_factor,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        lr_end=lr_end,
        power=power,
        lr_init=lr_init,
    )
    return ProgramLambdaLR(optimizer, lr_lambda, last_epoch)


def get_inverse_sqrt_schedule(optimizer, num_warmup_steps: int, timescale: int | None = None, last_epoch: int = -1):
    """Linear warmup from 0, then ``1 / sqrt((t + timescale - W) / timescale)``; `timescale` defaults to
    `num_warmup_steps` (10000 without warmup)."""
    if timescale is None:
        timescale = num_warmup_steps or 10_000

    lr_lambda = partial(_inverse_sqrt_factor, num_warmup_steps=num_warmup_steps, timescale=timescale)
    return ProgramLambdaLR(optimizer, lr_lambda, last_epoch=last_epoch)


def _min_lr_rate(optimizer, min_lr, min_lr_rate):
    if min_lr is not None and min_lr_rate is not None:
        raise ValueError("Only one of min_lr or min_lr_rate should be set")
    elif min_lr is not None:
        min_lr_rate = min_lr / optimizer.defaults["lr"]
    elif min_lr_rate is None:
        raise ValueError("One of min_lr or min_lr_rate should be set through the `lr_scheduler_kwargs`")
    return min_lr_rate


def get_cosine_with_min_lr_schedule_with_warmup(
    optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    num_cycles: float = 0.5,
    last_epoch: int = -1,
    min_lr: float | None = None,
    min_lr_rate: float | None = None,
):
    """Cosine schedule decaying to `min_lr` (or `min_lr_rate` times the initial lr; exactly one of them)."""
    min_lr_rate = _min_lr_rate(optimizer, min_lr, min_lr_rate)
    lr_lambda = partial(
        _cosine_factor,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        num_cycles=num_cycles,
        min_lr_rate=min_lr_rate,
    )
    return ProgramLambdaLR(optimizer, lr_lambda, last_epoch)


def get_cosine_with_min_lr_schedule_with_warmup_lr_rate(
    optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    num_cycles: float = 0.5,
    last_epoch: int = -1,
    min_lr: float | None = None,
    min_lr_rate: float | None = None,
    warmup_lr_rate: float | None = None,
):
    """transformers' "cosine_warmup_with_min_lr": as the min-lr cosine, shifted by one step; the warmup starts at
    `warmup_lr_rate` (default ``1 / num_warmup_steps``)."""
    min_lr_rate = _min_lr_rate(optimizer, min_lr, min_lr_rate)
    lr_lambda = partial(
        _cosine_lr_rate_factor,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        num_cycles=num_cycles,
        min_lr_rate=min_lr_rate,
        warmup_lr_rate=warmup_lr_rate,
    )
    return ProgramLambdaLR(optimizer, lr_lambda, last_epoch)


def get_wsd_schedule(
    optimizer,
    num_warmup_steps: int,
    num_decay_steps: int,
    num_training_steps: int | None = None,
    num_stable_steps: int | None = None,
    warmup_type: str = "linear",
    decay_type: str = "cosine",
    min_lr_ratio: float = 0,
    num_cycles: float = 0.5,
    last_epoch: int = -1,
):
    """Warmup-stable-decay: warmup (linear, cosine or 1-sqrt) from `min_lr_ratio`, constant, decay (linear, cosine
    or 1-sqrt) to `min_lr_ratio`, held afterwards. The stable phase lasts `num_stable_steps`, or
    ``num_training_steps - num_warmup_steps - num_decay_steps``."""
    if num_training_steps is None and num_stable_steps is None:
        raise ValueError("Either num_training_steps or num_stable_steps must be specified.")

    if num_training_steps is not None and num_stable_steps is not None:
        warnings.warn(
            "Both num_training_steps and num_stable_steps are specified. num_stable_steps will be used.", stacklevel=2
        )

    if warmup_type not in ["linear", "cosine", "1-sqrt"]:
        raise ValueError(f"Unknown warmup type: {warmup_type}, expected 'linear', 'cosine' or '1-sqrt'")

    if decay_type not in ["linear", "cosine", "1-sqrt"]:
        raise ValueError(f"Unknown decay type: {decay_type}, expected 'linear', 'cosine' or '1-sqrt'")

    if num_stable_steps is None:
        num_stable_steps = num_training_steps - num_warmup_steps - num_decay_steps

    lr_lambda = partial(
        _wsd_factor,
        num_warmup_steps=num_warmup_steps,
        num_stable_steps=num_stable_steps,
        num_decay_steps=num_decay_steps,
        warmup_type=warmup_type,
        decay_type=decay_type,
        min_lr_ratio=min_lr_ratio,
        num_cycles=num_cycles,
    )
    return ProgramLambdaLR(optimizer, lr_lambda, last_epoch)


def get_greedy_schedule(optimizer, **kwargs):
    """transformers' GreedyLR (a metric-driven host scheduler; needs transformers installed)."""
    from transformers.optimization import get_greedy_schedule as greedy

    return greedy(optimizer, **kwargs)
