"""Device schedule programs: the Python side of csrc/include/fused_sched/schedule_math.h.

A *program* is the list of segments of one param group (see the header for the semantics). Schedulers build
programs with the helpers below; ``ScheduleBinding`` packs them into the float64 table the kernels read and owns
the device step counter. ``evaluate_reference`` is the pure-Python (float64) evaluation, statement for statement
the header's, used to test programs against torch and transformers without a kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# Columns and kinds: keep in step with schedule_math.h.
KIND, COMBINE, TARGET, LO, HI, ORIGIN, P0 = range(7)
COLUMNS = 16
N_PARAMS = COLUMNS - P0

END = 0
CONST = 1
STEP = 2
EXPONENTIAL = 3
LINEAR = 4
POLYNOMIAL = 5
COSINE = 6
WARM_RESTARTS = 7
CYCLIC = 8
ANNEAL_COS = 9
ANNEAL_LINEAR = 10
HF_WARMUP = 11
HF_LINEAR_DECAY = 12
HF_COSINE = 13
HF_COSINE_RESTARTS = 14
HF_POLYNOMIAL = 15
HF_INVERSE_SQRT = 16
HF_WARMUP_RATE = 17
WSD = 18

SET, MUL = 0, 1
LR, MOMENTUM = 0, 1
INF = math.inf


@dataclass
class Segment:
    """One row of a program: `kind` with parameters `params`, active for lo <= t < hi, local time t - origin."""

    kind: int
    params: tuple = ()
    lo: float = -INF
    hi: float = INF
    origin: float = 0.0
    combine: int = SET
    target: int = LR

    def row(self) -> list[float]:
        if len(self.params) > N_PARAMS:
            raise ValueError(f"a segment takes at most {N_PARAMS} parameters")
        values = [float(v) for v in self.params] + [0.0] * (N_PARAMS - len(self.params))
        return [float(self.kind), float(self.combine), float(self.target), float(self.lo), float(self.hi),
                float(self.origin), *values]

    def shifted(self, offset: float, lo: float | None = None, hi: float | None = None) -> Segment:
        """This segment placed `offset` steps later (SequentialLR), optionally clipped to [lo, hi)."""
        new_lo = self.lo + offset if lo is None else max(self.lo + offset, lo)
        new_hi = self.hi + offset if hi is None else min(self.hi + offset, hi)
        return Segment(self.kind, self.params, new_lo, new_hi, self.origin + offset, self.combine, self.target)

    def as_factor(self) -> Segment:
        """The same segment multiplying instead of setting (ChainedScheduler of multiplicative schedules)."""
        return Segment(self.kind, self.params, self.lo, self.hi, self.origin, MUL, self.target)


@dataclass
class Program:
    """The segments of one param group (empty: the group's lr comes from the hyper-parameter table)."""

    segments: list[Segment] = field(default_factory=list)

    def targets(self) -> set[int]:
        return {s.target for s in self.segments}


def _py_mod(a: float, b: float) -> float:
    return a % b


def segment_value(row, t: float) -> float:
    """float64 value of one segment row at step t (mirror of segment_value in schedule_math.h)."""
    kind = int(row[KIND])
    u = t - row[ORIGIN]
    p = row[P0:]
    if kind == CONST:
        return p[0]
    if kind == STEP:
        return p[0] * math.pow(p[1], math.floor(u / p[2]))
    if kind == EXPONENTIAL:
        return p[0] * math.pow(p[1], u)
    if kind == LINEAR:
        return p[0] * (p[1] + (p[2] - p[1]) * min(p[3], u) / p[3])
    if kind == POLYNOMIAL:
        return p[0] * math.pow(1.0 - min(p[1], u) / p[1], p[2])
    if kind == COSINE:
        return p[1] + (p[0] - p[1]) * (1.0 + math.cos(math.pi * u / p[2])) / 2.0
    if kind == WARM_RESTARTS:
        t_cur, t_i = u, p[2]
        if p[3] == 1.0:
            t_cur = math.fmod(u, p[2])
        else:
            while t_cur >= t_i:
                t_cur -= t_i
                t_i *= p[3]
        return p[1] + (p[0] - p[1]) * (1.0 + math.cos(math.pi * t_cur / t_i)) / 2.0
    if kind == CYCLIC:
        cycle = math.floor(1.0 + u / p[2])
        x = 1.0 + u / p[2] - cycle
        scale_factor = x / p[3] if x <= p[3] else (x - 1.0) / (p[3] - 1.0)
        base_height = (p[1] - p[0]) * scale_factor
        mode = int(p[4])
        scale = 1.0 if mode == 0 else (1.0 / math.pow(2.0, cycle - 1.0) if mode == 1 else math.pow(p[5], u))
        return p[0] + base_height * scale
    if kind == ANNEAL_COS:
        pct = (u - p[2]) / (p[3] - p[2])
        cos_out = math.cos(math.pi * pct) + 1.0
        return p[1] + (p[0] - p[1]) / 2.0 * cos_out
    if kind == ANNEAL_LINEAR:
        pct = (u - p[2]) / (p[3] - p[2])
        return (p[1] - p[0]) * pct + p[0]
    if kind == HF_WARMUP:
        return p[0] * (u / p[1])
    if kind == HF_LINEAR_DECAY:
        return p[0] * max(0.0, (p[1] - u) / p[2])
    if kind == HF_COSINE:
        progress = (u - p[1] + p[5]) / p[2]
        factor = 0.5 * (1.0 + math.cos(math.pi * p[3] * 2.0 * progress))
        factor = factor * (1.0 - p[4]) + p[4]
        return p[0] * max(0.0, factor)
    if kind == HF_COSINE_RESTARTS:
        progress = (u - p[1]) / p[2]
        if progress >= 1.0:
            return p[0] * 0.0
        return p[0] * max(0.0, 0.5 * (1.0 + math.cos(math.pi * _py_mod(p[3] * progress, 1.0))))
    if kind == HF_POLYNOMIAL:
        if u > p[5]:
            return p[0] * (p[2] / p[1])
        lr_range = p[1] - p[2]
        decay_steps = p[5] - p[4]
        pct_remaining = 1.0 - (u - p[4]) / decay_steps
        decay = lr_range * math.pow(pct_remaining, p[3]) + p[2]
        return p[0] * (decay / p[1])
    if kind == HF_INVERSE_SQRT:
        return p[0] * (1.0 / math.sqrt((u + p[1]) / p[2]))
    if kind == HF_WARMUP_RATE:
        return p[0] * (p[1] + (1.0 - p[1]) * u / p[2])
    if kind == WSD:
        progress = (u - p[1]) / p[2]
        shape = int(p[3])
        if p[4] != 0.0:
            factor = progress if shape == 0 else (
                0.5 * (1.0 - math.cos(math.pi * progress)) if shape == 1 else 1.0 - math.sqrt(1.0 - progress))
        else:
            factor = 1.0 - progress if shape == 0 else (
                0.5 * (1.0 + math.cos(math.pi * p[6] * 2.0 * progress)) if shape == 1 else 1.0 - math.sqrt(progress))
        factor = factor * (1.0 - p[5]) + p[5]
        return p[0] * max(0.0, factor)
    raise ValueError(f"unknown segment kind {kind}")


def evaluate_reference(program: Program, t: float, defaults=(math.nan, math.nan)) -> tuple[float, float]:
    """(lr, momentum) of `program` at step t; a target no active segment sets keeps its default."""
    value = list(defaults)
    for seg in program.segments:
        row = seg.row()
        if not (row[LO] <= t < row[HI]):
            continue
        v = segment_value(row, t)
        if seg.combine == MUL:
            value[seg.target] *= v
        else:
            value[seg.target] = v
    return value[0], value[1]


def pack(programs: list[Program]) -> torch.Tensor:
    """float64 [groups, segments, COLUMNS] table (CPU); shorter programs end with an END row."""
    width = max([len(p.segments) for p in programs] + [0]) + 1
    table = torch.zeros(len(programs), width, COLUMNS, dtype=torch.float64)
    for g, program in enumerate(programs):
        for i, seg in enumerate(program.segments):
            table[g, i] = torch.tensor(seg.row(), dtype=torch.float64)
    return table
