"""transformers' learning-rate schedules (``transformers.optimization``), computed inside fused_sched's kernels.

Every factory has transformers' signature, defaults and errors, and returns a ``ProgramLambdaLR``: a
``torch.optim.lr_scheduler.LambdaLR`` whose lambda computes transformers' factor with the same float64 operations
(so ``get_last_lr()``, ``group["lr"]`` and ``state_dict()`` are transformers' to the bit) and that also describes
the schedule as a device program per param group (fused_sched._schedule_program). On a fused_sched optimizer the
kernels evaluate that program at the scheduler's device step counter: ``scheduler.step()`` uploads nothing.

    import fused_sched
    from fused_sched.hf_schedules import get_scheduler

    opt = fused_sched.AdamW(model.parameters(), lr=3e-4)
    sched = get_scheduler("cosine", opt, num_warmup_steps=100, num_training_steps=10_000)

Past the end of the schedule the values are transformers' too: cosine climbs again, linear stays at 0, polynomial
holds ``lr_end``, hard restarts give 0, warmup_stable_decay holds ``min_lr_ratio``.

With a torch.optim optimizer the schedulers are plain LambdaLRs with transformers' values.
"""

from __future__ import annotations

import math
import warnings
from enum import Enum
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

from ._schedule_program import (
    CONST,
    HF_COSINE,
    HF_COSINE_RESTARTS,
    HF_INVERSE_SQRT,
    HF_LINEAR_DECAY,
    HF_POLYNOMIAL,
    HF_WARMUP,
    HF_WARMUP_RATE,
    INF,
    WSD,
    Program,
    Segment,
)
from ._scheduler_base import DeviceScheduleMixin

__all__ = [
    "ProgramLambdaLR",
    "SCHEDULER_NAMES",
    "SchedulerType",
    "get_constant_schedule",
    "get_constant_schedule_with_warmup",
    "get_cosine_schedule_with_warmup",
    "get_cosine_with_hard_restarts_schedule_with_warmup",
    "get_cosine_with_min_lr_schedule_with_warmup",
    "get_cosine_with_min_lr_schedule_with_warmup_lr_rate",
    "get_inverse_sqrt_schedule",
    "get_linear_schedule_with_warmup",
    "get_polynomial_decay_schedule_with_warmup",
    "get_reduce_on_plateau_schedule",
    "get_scheduler",
    "get_wsd_schedule",
]

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


def _chain(base_lr: float, pieces) -> list[Segment]:
    """Segments of an if-chain: piece i = (hi, kind, params, origin) applies when no earlier piece did and t < hi.
    Params are the formula's parameters after p0 (p0 is the group's base lr). Empty pieces are dropped."""
    segments = []
    lo = -INF
    for hi, kind, params, origin in pieces:
        if hi > lo:
            segments.append(Segment(kind, (base_lr, *params), lo=lo, hi=hi, origin=origin))
        lo = max(lo, hi)
    return segments


# -- factors (host, transformers' float operations) and their programs ------------------------------------------
def _warmup_factor(current_step, num_warmup_steps):
    return float(current_step) / float(max(1, num_warmup_steps))


def _warmup_piece(num_warmup_steps):
    return (num_warmup_steps, HF_WARMUP, (float(max(1, num_warmup_steps)),), 0.0)


def _constant_factor(_=None):
    return 1


def _constant_program(base_lr):
    return [Segment(CONST, (base_lr,))]


def _constant_with_warmup_factor(current_step: int, *, num_warmup_steps: int):
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1.0, num_warmup_steps))
    return 1.0


def _constant_with_warmup_program(base_lr, *, num_warmup_steps):
    warmup = (num_warmup_steps, HF_WARMUP, (float(max(1.0, num_warmup_steps)),), 0.0)
    return _chain(base_lr, [warmup, (INF, CONST, (), 0.0)])


def _linear_factor(current_step: int, *, num_warmup_steps: int, num_training_steps: int):
    if current_step < num_warmup_steps:
        return _warmup_factor(current_step, num_warmup_steps)
    return max(0.0, float(num_training_steps - current_step) / float(max(1, num_training_steps - num_warmup_steps)))


def _linear_program(base_lr, *, num_warmup_steps, num_training_steps):
    decay = (float(num_training_steps), float(max(1, num_training_steps - num_warmup_steps)))
    return _chain(base_lr, [_warmup_piece(num_warmup_steps), (INF, HF_LINEAR_DECAY, decay, 0.0)])


def _cosine_factor(
    current_step: int, *, num_warmup_steps: int, num_training_steps: int, num_cycles: float, min_lr_rate: float = 0.0
):
    # transformers defines this lambda twice; the second definition (with min_lr_rate) is the one in use for both
    # get_cosine_schedule_with_warmup and get_cosine_with_min_lr_schedule_with_warmup.
    if current_step < num_warmup_steps:
        return _warmup_factor(current_step, num_warmup_steps)
    progress = float(current_step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
    factor = factor * (1 - min_lr_rate) + min_lr_rate
    return max(0, factor)


def _cosine_program(base_lr, *, num_warmup_steps, num_training_steps, num_cycles, min_lr_rate=0.0):
    params = (float(num_warmup_steps), float(max(1, num_training_steps - num_warmup_steps)), float(num_cycles),
              float(min_lr_rate), 0.0)
    return _chain(base_lr, [_warmup_piece(num_warmup_steps), (INF, HF_COSINE, params, 0.0)])


def _hard_restarts_factor(current_step: int, *, num_warmup_steps: int, num_training_steps: int, num_cycles: int):
    if current_step < num_warmup_steps:
        return _warmup_factor(current_step, num_warmup_steps)
    progress = float(current_step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))


def _hard_restarts_program(base_lr, *, num_warmup_steps, num_training_steps, num_cycles):
    params = (float(num_warmup_steps), float(max(1, num_training_steps - num_warmup_steps)), float(num_cycles))
    return _chain(base_lr, [_warmup_piece(num_warmup_steps), (INF, HF_COSINE_RESTARTS, params, 0.0)])


def _polynomial_factor(
    current_step: int, *, num_warmup_steps: int, num_training_steps: int, lr_end: float, power: float, lr_init: float
):
    if current_step < num_warmup_steps:
        return _warmup_factor(current_step, num_warmup_steps)
    elif current_step > num_training_steps:
        return lr_end / lr_init  # as LambdaLR multiplies by lr_init
    else:
        lr_range = lr_init - lr_end
        decay_steps = num_training_steps - num_warmup_steps
        pct_remaining = 1 - (current_step - num_warmup_steps) / decay_steps
        decay = lr_range * pct_remaining**power + lr_end
        return decay / lr_init  # as LambdaLR multiplies by lr_init


def _polynomial_program(base_lr, *, num_warmup_steps, num_training_steps, lr_end, power, lr_init):
    if isinstance(lr_init, torch.Tensor) or isinstance(lr_end, torch.Tensor):
        return None
    # In float64 the kernel's lr_init - lr_end, (t - W) / (T - W) and lr_end / lr_init are Python's as long as the
    # step counts are exact (below 2 ** 53).
    params = (float(lr_init), float(lr_end), float(power), float(num_warmup_steps), float(num_training_steps))
    return _chain(base_lr, [_warmup_piece(num_warmup_steps), (INF, HF_POLYNOMIAL, params, 0.0)])


def _inverse_sqrt_factor(current_step: int, *, num_warmup_steps: int, timescale: int | None = None):
    if current_step < num_warmup_steps:
        return _warmup_factor(current_step, num_warmup_steps)
    shift = timescale - num_warmup_steps
    decay = 1.0 / math.sqrt((current_step + shift) / timescale)
    return decay


def _inverse_sqrt_program(base_lr, *, num_warmup_steps, timescale=None):
    params = (float(timescale - num_warmup_steps), float(timescale))
    return _chain(base_lr, [_warmup_piece(num_warmup_steps), (INF, HF_INVERSE_SQRT, params, 0.0)])


def _cosine_lr_rate_factor(
    current_step: int,
    *,
    num_warmup_steps: int,
    num_training_steps: int,
    num_cycles: float,
    min_lr_rate: float = 0.0,
    warmup_lr_rate: float | None = None,
):
    current_step = float(current_step)
    num_warmup_steps = float(num_warmup_steps)
    num_training_steps = float(num_training_steps)

    if current_step < num_warmup_steps:
        if warmup_lr_rate is None:
            return (current_step + 1.0) / max(1.0, num_warmup_steps)
        else:
            warmup_lr_rate = float(warmup_lr_rate)
            return warmup_lr_rate + (1.0 - warmup_lr_rate) * (current_step) / (max(1, num_warmup_steps - 1))
    progress = (current_step - num_warmup_steps + 1.0) / (max(1.0, num_training_steps - num_warmup_steps))
    factor = 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))
    factor = factor * (1 - min_lr_rate) + min_lr_rate
    return max(0, factor)


def _cosine_lr_rate_program(
    base_lr, *, num_warmup_steps, num_training_steps, num_cycles, min_lr_rate=0.0, warmup_lr_rate=None
):
    w, total = float(num_warmup_steps), float(num_training_steps)
    if warmup_lr_rate is None:  # (t + 1) / max(1, W): local time t - (-1)
        warmup = (w, HF_WARMUP, (float(max(1.0, w)),), -1.0)
    else:
        warmup = (w, HF_WARMUP_RATE, (float(warmup_lr_rate), float(max(1, w - 1))), 0.0)
    # progress = (t - W + 1) / max(1, T - W): the cosine's shift p5 = 1
    decay = (INF, HF_COSINE, (w, float(max(1.0, total - w)), float(num_cycles), float(min_lr_rate), 1.0), 0.0)
    return _chain(base_lr, [warmup, decay])


_WSD_SHAPES = {"linear": 0, "cosine": 1, "1-sqrt": 2}


def _wsd_factor(
    current_step: int,
    *,
    num_warmup_steps: int,
    num_stable_steps: int,
    num_decay_steps: int,
    warmup_type: str,
    decay_type: str,
    min_lr_ratio: float,
    num_cycles: float,
):
    if current_step < num_warmup_steps:
        progress = float(current_step) / float(max(1, num_warmup_steps))
        if warmup_type == "linear":
            factor = progress
        elif warmup_type == "cosine":
            factor = 0.5 * (1.0 - math.cos(math.pi * progress))
        elif warmup_type == "1-sqrt":
            factor = 1.0 - math.sqrt(1.0 - progress)
        else:
            raise ValueError(f"Unknown warmup type: {warmup_type}, expected 'linear', 'cosine' or '1-sqrt'")
        factor = factor * (1.0 - min_lr_ratio) + min_lr_ratio
        return max(0.0, factor)

    if current_step < num_warmup_steps + num_stable_steps:
        return 1.0

    if current_step < num_warmup_steps + num_stable_steps + num_decay_steps:
        progress = float(current_step - num_warmup_steps - num_stable_steps) / float(max(1, num_decay_steps))
        if decay_type == "linear":
            factor = 1.0 - progress
        elif decay_type == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
        elif decay_type == "1-sqrt":
            factor = 1.0 - math.sqrt(progress)
        else:
            raise ValueError(f"Unknown decay type: {decay_type}, expected 'linear', 'cosine' or '1-sqrt'")
        factor = factor * (1.0 - min_lr_ratio) + min_lr_ratio
        return max(0.0, factor)
    return min_lr_ratio


def _wsd_program(
    base_lr, *, num_warmup_steps, num_stable_steps, num_decay_steps, warmup_type, decay_type, min_lr_ratio, num_cycles
):
    if warmup_type not in _WSD_SHAPES or decay_type not in _WSD_SHAPES:
        return None
    w, s, d = num_warmup_steps, num_stable_steps, num_decay_steps
    m, c = float(min_lr_ratio), float(num_cycles)
    # WSD segment: progress = (t - start) / length, rising 1 for the warmup, 0 for the decay
    warmup = (w, WSD, (0.0, float(max(1, w)), _WSD_SHAPES[warmup_type], 1.0, m, c), 0.0)
    stable = (w + s, CONST, (), 0.0)
    decay = (w + s + d, WSD, (float(w + s), float(max(1, d)), _WSD_SHAPES[decay_type], 0.0, m, c), 0.0)
    segments = _chain(base_lr, [warmup, stable, decay])
    lo = max(-INF, w, w + s, w + s + d)
    segments.append(Segment(CONST, (base_lr * min_lr_ratio,), lo=lo, hi=INF))  # LambdaLR: base_lr * min_lr_ratio
    return segments


_PROGRAMS = {
    _constant_factor: _constant_program,
    _constant_with_warmup_factor: _constant_with_warmup_program,
    _linear_factor: _linear_program,
    _cosine_factor: _cosine_program,
    _hard_restarts_factor: _hard_restarts_program,
    _polynomial_factor: _polynomial_program,
    _inverse_sqrt_factor: _inverse_sqrt_program,
    _cosine_lr_rate_factor: _cosine_lr_rate_program,
    _wsd_factor: _wsd_program,
}


# -- factories (transformers' signatures, defaults and errors) ---------------------------------------------------
def get_constant_schedule(optimizer, last_epoch: int = -1):
    """Constant learning rate: the one set in the optimizer (transformers.get_constant_schedule)."""
    return ProgramLambdaLR(optimizer, _constant_factor, last_epoch=last_epoch)


def get_reduce_on_plateau_schedule(optimizer, **kwargs):
    """ReduceLROnPlateau(optimizer, **kwargs): fused_sched.lr_scheduler's where it exists, else torch's."""
    try:
        from .lr_scheduler import ReduceLROnPlateau
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


# -- get_scheduler ---------------------------------------------------------------------------------------------
class SchedulerType(str, Enum):  # noqa: UP042 (not StrEnum: f"{name}" must read "SchedulerType.LINEAR" as theirs)
    """transformers.trainer_utils.SchedulerType: the names get_scheduler accepts (its members are accepted too)."""

    LINEAR = "linear"
    COSINE = "cosine"
    COSINE_WITH_RESTARTS = "cosine_with_restarts"
    POLYNOMIAL = "polynomial"
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"
    INVERSE_SQRT = "inverse_sqrt"
    REDUCE_ON_PLATEAU = "reduce_lr_on_plateau"
    COSINE_WITH_MIN_LR = "cosine_with_min_lr"
    COSINE_WARMUP_WITH_MIN_LR = "cosine_warmup_with_min_lr"
    WARMUP_STABLE_DECAY = "warmup_stable_decay"
    GREEDY = "greedy"

    @classmethod
    def _missing_(cls, value):
        if isinstance(value, Enum) and isinstance(value.value, str):  # transformers' own SchedulerType members
            for member in cls:
                if member.value == value.value:
                    return member
        raise ValueError(
            f"{value} is not a valid {cls.__name__}, please select one of {list(cls._value2member_map_.keys())}"
        )


TYPE_TO_SCHEDULER_FUNCTION = {
    SchedulerType.LINEAR: get_linear_schedule_with_warmup,
    SchedulerType.COSINE: get_cosine_schedule_with_warmup,
    SchedulerType.COSINE_WITH_RESTARTS: get_cosine_with_hard_restarts_schedule_with_warmup,
    SchedulerType.POLYNOMIAL: get_polynomial_decay_schedule_with_warmup,
    SchedulerType.CONSTANT: get_constant_schedule,
    SchedulerType.CONSTANT_WITH_WARMUP: get_constant_schedule_with_warmup,
    SchedulerType.INVERSE_SQRT: get_inverse_sqrt_schedule,
    SchedulerType.REDUCE_ON_PLATEAU: get_reduce_on_plateau_schedule,
    SchedulerType.COSINE_WITH_MIN_LR: get_cosine_with_min_lr_schedule_with_warmup,
    SchedulerType.COSINE_WARMUP_WITH_MIN_LR: get_cosine_with_min_lr_schedule_with_warmup_lr_rate,
    SchedulerType.WARMUP_STABLE_DECAY: get_wsd_schedule,
    SchedulerType.GREEDY: get_greedy_schedule,
}

# The names whose schedules run as device programs (reduce_lr_on_plateau and greedy follow a metric on the host).
SCHEDULER_NAMES = tuple(
    t.value for t in SchedulerType if t not in (SchedulerType.REDUCE_ON_PLATEAU, SchedulerType.GREEDY)
)


def get_scheduler(
    name,
    optimizer,
    num_warmup_steps: int | None = None,
    num_training_steps: int | None = None,
    scheduler_specific_kwargs: dict | None = None,
):
    """transformers.get_scheduler: the schedule `name` (a str or a SchedulerType, this module's or transformers')
    on `optimizer`, with transformers' errors for missing arguments. Extra arguments of a schedule go in
    `scheduler_specific_kwargs`."""
    name = SchedulerType(name)
    schedule_func = TYPE_TO_SCHEDULER_FUNCTION[name]

    if name == SchedulerType.CONSTANT:
        return schedule_func(optimizer)

    if scheduler_specific_kwargs is None:
        scheduler_specific_kwargs = {}

    if name in (SchedulerType.REDUCE_ON_PLATEAU, SchedulerType.GREEDY):
        return schedule_func(optimizer, **scheduler_specific_kwargs)

    # All other schedulers require `num_warmup_steps`
    if num_warmup_steps is None:
        raise ValueError(f"{name} requires `num_warmup_steps`, please provide that argument.")

    if name == SchedulerType.CONSTANT_WITH_WARMUP:
        return schedule_func(optimizer, num_warmup_steps=num_warmup_steps)

    if name == SchedulerType.INVERSE_SQRT:
        return schedule_func(optimizer, num_warmup_steps=num_warmup_steps, **scheduler_specific_kwargs)

    # wsd scheduler requires either num_training_steps or num_stable_steps
    if name == SchedulerType.WARMUP_STABLE_DECAY:
        return schedule_func(
            optimizer,
            num_warmup_steps=num_warmup_steps,
            num_training_steps=num_training_steps,
            **scheduler_specific_kwargs,
        )

    # All other schedulers require `num_training_steps`
    if num_training_steps is None:
        raise ValueError(f"{name} requires `num_training_steps`, please provide that argument.")

    return schedule_func(
        optimizer,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        **scheduler_specific_kwargs,
    )
