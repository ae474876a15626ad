"""Device schedule programs in Triton: the mirror of csrc/include/fused_sched/schedule_math.h.

``evaluate_program`` evaluates one param group's program (rows of 16 float64, see the header) at the step t; the
update kernels (adam.py, sgd.py) call it once per chunk. ``evaluate_schedule_triton`` runs it for every group
of a table, like ``torch.ops.fused_sched.evaluate_schedule`` (for tests).

Every formula repeats the header's float64 operations in the header's order, so that the value is the C++ (and
Python) one. The C++ code calls libm's cos and pow; Triton's own ``tl.cos`` is numpy's cos under the interpreter
and CUDA's libdevice cos (up to 2 ulp off) on a GPU, and there is no pow the interpreter can run. So cos and pow
are computed here from IEEE operations alone (+, -, *, /, fma, floor, bit casts) in double-double arithmetic,
about 100 significant bits, and rounded to float64 once: the result is the correctly rounded value unless the
exact value lies within about 2**-45 ulp of a rounding boundary, and it has the same bits under the interpreter
and on every GPU. glibc's cos and pow are correctly rounded but for about 1 in 500 (cos) and 1 in 1500 (pow)
random arguments (measured against mpmath), which then differ by 1 ulp: an lr that differs in float32 would need
such an argument whose value also lies within 1 float64 ulp of a float32 rounding boundary.

Kernels that use this code must be launched with ``enable_fp_fusion=False``: a multiply-add contracted into an
fma would round differently from the header's code and break the double-double arithmetic. That arithmetic also
needs an exact ``tl.fma``: compiled it is fma.rn.f64; the interpreter's is exact from triton 3.9 on (before, it
multiplied and added with two roundings).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ... import _schedule_program as sp
from .libm import _cos, _fmax0, _fmin, _fmod, _pow, _py_mod

# Program layout and kinds, from the Python mirror of schedule_math.h.
_COLUMNS = tl.constexpr(sp.COLUMNS)
_KIND = tl.constexpr(sp.KIND)
_COMBINE = tl.constexpr(sp.COMBINE)
_TARGET = tl.constexpr(sp.TARGET)
_LO = tl.constexpr(sp.LO)
_HI = tl.constexpr(sp.HI)
_ORIGIN = tl.constexpr(sp.ORIGIN)
_P0 = tl.constexpr(sp.P0)
_END = tl.constexpr(sp.END)
_CONST = tl.constexpr(sp.CONST)
_STEP = tl.constexpr(sp.STEP)
_EXPONENTIAL = tl.constexpr(sp.EXPONENTIAL)
_LINEAR = tl.constexpr(sp.LINEAR)
_POLYNOMIAL = tl.constexpr(sp.POLYNOMIAL)
_COSINE = tl.constexpr(sp.COSINE)
_WARM_RESTARTS = tl.constexpr(sp.WARM_RESTARTS)
_CYCLIC = tl.constexpr(sp.CYCLIC)
_ANNEAL_COS = tl.constexpr(sp.ANNEAL_COS)
_ANNEAL_LINEAR = tl.constexpr(sp.ANNEAL_LINEAR)
_HF_WARMUP = tl.constexpr(sp.HF_WARMUP)
_HF_LINEAR_DECAY = tl.constexpr(sp.HF_LINEAR_DECAY)
_HF_COSINE = tl.constexpr(sp.HF_COSINE)
_HF_COSINE_RESTARTS = tl.constexpr(sp.HF_COSINE_RESTARTS)
_HF_POLYNOMIAL = tl.constexpr(sp.HF_POLYNOMIAL)
_HF_INVERSE_SQRT = tl.constexpr(sp.HF_INVERSE_SQRT)
_HF_WARMUP_RATE = tl.constexpr(sp.HF_WARMUP_RATE)
_WSD = tl.constexpr(sp.WSD)
_MUL = tl.constexpr(sp.MUL)
_TARGET_LR = tl.constexpr(sp.LR)
_TARGET_MOMENTUM = tl.constexpr(sp.MOMENTUM)

# The header's kPi: pi rounded to float64. The formulas write kPi * u as u * _PI (a product is commutative, bit
# for bit): under the interpreter a constexpr left of a tensor yields a constexpr wrapping the tensor, which some
# builtins reject.
_PI = tl.constexpr(math.pi)

# --- the program ------------------------------------------------------------------------------------------------
@triton.jit
def _segment_value(s, t):
    """segment_value of schedule_math.h, operation for operation: the value of segment row `s` at step t."""
    kind = tl.load(s + _KIND).to(tl.int32)
    u = t - tl.load(s + _ORIGIN)
    p0 = tl.load(s + _P0 + 0)
    p1 = tl.load(s + _P0 + 1)
    p2 = tl.load(s + _P0 + 2)
    p3 = tl.load(s + _P0 + 3)
    p4 = tl.load(s + _P0 + 4)
    p5 = tl.load(s + _P0 + 5)
    p6 = tl.load(s + _P0 + 6)
    v = tl.full((), float("nan"), tl.float64)
    if kind == _CONST:
        v = p0
    elif kind == _STEP:
        v = p0 * _pow(p1, tl.floor(u / p2))
    elif kind == _EXPONENTIAL:
        v = p0 * _pow(p1, u)
    elif kind == _LINEAR:
        v = p0 * (p1 + (p2 - p1) * _fmin(p3, u) / p3)
    elif kind == _POLYNOMIAL:
        v = p0 * _pow(1.0 - _fmin(p1, u) / p1, p2)
    elif kind == _COSINE:
        v = p1 + (p0 - p1) * (1.0 + _cos(u * _PI / p2)) / 2.0
    elif kind == _WARM_RESTARTS:
        t_cur = u
        t_i = p2
        if p3 == 1.0:
            t_cur = _fmod(u, p2)
        else:
            while t_cur >= t_i:
                t_cur = t_cur - t_i
                t_i = t_i * p3
        v = p1 + (p0 - p1) * (1.0 + _cos(t_cur * _PI / t_i)) / 2.0
    elif kind == _CYCLIC:
        cycle = tl.floor(1.0 + u / p2)
        x = 1.0 + u / p2 - cycle
        scale_factor = tl.where(x <= p3, x / p3, (x - 1.0) / (p3 - 1.0))
        base_height = (p1 - p0) * scale_factor
        mode = p4.to(tl.int32)
        scale = tl.full((), 1.0, tl.float64)
        if mode == 1:
            scale = 1.0 / _pow(tl.full((), 2.0, tl.float64), cycle - 1.0)
        elif mode != 0:
            scale = _pow(p5, u)
        v = p0 + base_height * scale
    elif kind == _ANNEAL_COS:
        pct = (u - p2) / (p3 - p2)
        cos_out = _cos(pct * _PI) + 1.0
        v = p1 + (p0 - p1) / 2.0 * cos_out
    elif kind == _ANNEAL_LINEAR:
        pct = (u - p2) / (p3 - p2)
        v = (p1 - p0) * pct + p0
    elif kind == _HF_WARMUP:
        v = p0 * (u / p1)
    elif kind == _HF_LINEAR_DECAY:
        v = p0 * _fmax0((p1 - u) / p2)
    elif kind == _HF_COSINE:
        progress = (u - p1 + p5) / p2
        factor = 0.5 * (1.0 + _cos(p3 * _PI * 2.0 * progress))
        factor = factor * (1.0 - p4) + p4
        v = p0 * _fmax0(factor)
    elif kind == _HF_COSINE_RESTARTS:
        progress = (u - p1) / p2
        if progress >= 1.0:
            v = p0 * 0.0
        else:
            v = p0 * _fmax0(0.5 * (1.0 + _cos(_py_mod(p3 * progress, 1.0) * _PI)))
    elif kind == _HF_POLYNOMIAL:
        if u > p5:
            v = p0 * (p2 / p1)
        else:
            lr_range = p1 - p2
            decay_steps = p5 - p4
            pct_remaining = 1.0 - (u - p4) / decay_steps
            decay = lr_range * _pow(pct_remaining, p3) + p2
            v = p0 * (decay / p1)
    elif kind == _HF_INVERSE_SQRT:
        v = p0 * (1.0 / tl.sqrt((u + p1) / p2))
    elif kind == _HF_WARMUP_RATE:
        v = p0 * (p1 + (1.0 - p1) * u / p2)
    elif kind == _WSD:
        progress = (u - p1) / p2
        shape = p3.to(tl.int32)
        if p4 != 0.0:  # warmup
            if shape == 0:
                factor = progress
            elif shape == 1:
                factor = 0.5 * (1.0 - _cos(progress * _PI))
            else:
                factor = 1.0 - tl.sqrt(1.0 - progress)
        else:  # decay
            if shape == 0:
                factor = 1.0 - progress
            elif shape == 1:
                factor = 0.5 * (1.0 + _cos(p6 * _PI * 2.0 * progress))
            else:
                factor = 1.0 - tl.sqrt(progress)
        factor = factor * (1.0 - p5) + p5
        v = p0 * _fmax0(factor)
    return v


@triton.jit
def evaluate_program(program_ptr, segments, t):
    """evaluate_schedule of schedule_math.h: one group's program (`segments` rows of 16 float64 from program_ptr)
    at step t. Returns (lr, lr_set, momentum, momentum_set); a value whose flag is false is meaningless."""
    lr = tl.full((), float("nan"), tl.float64)
    momentum = tl.full((), float("nan"), tl.float64)
    lr_set = tl.full((), 0, tl.int1)
    momentum_set = tl.full((), 0, tl.int1)
    # No break in Triton loops: an END row turns `live` off for the rest of the rows.
    live = tl.full((), 1, tl.int1)
    for i in range(segments):
        s = program_ptr + i * _COLUMNS
        live = live & (tl.load(s + _KIND).to(tl.int32) != _END)
        if live & (tl.load(s + _LO) <= t) & (t < tl.load(s + _HI)):
            target = tl.load(s + _TARGET).to(tl.int32)
            v = _segment_value(s, t)
            mul = tl.load(s + _COMBINE).to(tl.int32) == _MUL
            to_lr = target == _TARGET_LR
            to_momentum = target == _TARGET_MOMENTUM
            lr = tl.where(to_lr, tl.where(mul, lr * v, v), lr)
            lr_set = lr_set | (to_lr & (mul == 0))
            momentum = tl.where(to_momentum, tl.where(mul, momentum * v, v), momentum)
            momentum_set = momentum_set | (to_momentum & (mul == 0))
    return lr, lr_set, momentum, momentum_set


@triton.jit
def _evaluate_kernel(table_ptr, step_ptr, out_ptr, segments):
    g = tl.program_id(0).to(tl.int64)
    lr, lr_set, momentum, momentum_set = evaluate_program(table_ptr + g * segments * _COLUMNS, segments,
                                                          tl.load(step_ptr))
    tl.store(out_ptr + 2 * g, tl.where(lr_set, lr, float("nan")))
    tl.store(out_ptr + 2 * g + 1, tl.where(momentum_set, momentum, float("nan")))


def evaluate_schedule_triton(table: torch.Tensor, t) -> torch.Tensor:
    """``torch.ops.fused_sched.evaluate_schedule`` through the Triton code: float64 [groups, 2] of (lr, momentum)
    of every group's program in `table` (float64 [groups, segments, 16]) at step t (a float or a one-element
    tensor), NaN where the program sets no value."""
    if table.dtype != torch.float64 or table.dim() != 3 or table.shape[2] != sp.COLUMNS:
        raise ValueError(f"schedule must be a float64 tensor [groups, segments, {sp.COLUMNS}], got {table.dtype} "
                         f"{list(table.shape)}")
    table = table.contiguous()
    step = torch.as_tensor(t, dtype=torch.float64, device=table.device).reshape(1)
    out = torch.empty(table.shape[0], 2, dtype=torch.float64, device=table.device)
    if table.shape[0]:
        _evaluate_kernel[(table.shape[0],)](table, step, out, table.shape[1], enable_fp_fusion=False)
    return out
