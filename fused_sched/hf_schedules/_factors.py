"""transformers' schedules, each twice: its factor (host, transformers' float operations) and its device program."""

from __future__ import annotations

import math

import torch

from .._schedule_program import (
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
    Segment,
)


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
