"""Device schedule programs in Triton: the mirror of csrc/include/fused_sched/schedule_math.h.

``evaluate_program`` evaluates one param group's program (rows of 16 float64, see the header) at the step t; the
update kernels in triton_kernels.py call it once per chunk. ``evaluate_schedule_triton`` runs it for every group
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
from fractions import Fraction

import torch
import triton
import triton.language as tl

from .. import _schedule_program as sp

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

# pi and ln 2 to 240 bits (hexadecimal digits), to split into the pieces below.
_PI_240 = Fraction(0x3243F6A8885A308D313198A2E03707344A4093822299F31D0082EFA98EC4E, 1 << 240)
_LN2_240 = Fraction(0xB17217F7D1CF79ABC9E3B39803F2F6AF40F343267298B62D8A0D175B8BAA, 1 << 240)


def _pieces(value: Fraction, bits: int, count: int) -> tuple[float, ...]:
    """`value` as a sum of `count` floats, each but the last rounded to `bits` significant bits, so that its
    product with an integer of up to 53 - bits bits is exact (Cody and Waite's argument reduction)."""
    pieces = []
    for i in range(count):
        width = bits if i < count - 1 else 53
        exponent = math.frexp(float(value))[1]
        scale = Fraction(2) ** (width - exponent)
        piece = Fraction(round(value * scale)) / scale
        pieces.append(float(piece))
        value -= piece
    return tuple(pieces)


def _dd(value: Fraction) -> tuple[float, float]:
    hi = float(value)
    return hi, float(value - Fraction(hi))


def _series(coefficients: list[Fraction], n_dd: int) -> tuple[tl.constexpr, ...]:
    """Arguments of _dd_poly: the first n_dd coefficients (degree 0 up) as double-double (hi and lo), the higher
    ones as doubles, both highest degree first (the order of Horner's scheme), and the two counts."""
    head = [_dd(c) for c in coefficients[:n_dd]][::-1]
    tail = [float(c) for c in coefficients[n_dd:]][::-1]
    return (tl.constexpr(tuple(h for h, _ in head)), tl.constexpr(tuple(lo for _, lo in head)),
            tl.constexpr(tuple(tail)), tl.constexpr(len(head)), tl.constexpr(len(tail)))


# pi/2 in 27-bit pieces: k * piece is exact for k < 2**26, i.e. cos arguments below about 1e8.
_PIO2_1, _PIO2_2, _PIO2_3, _PIO2_4 = (tl.constexpr(p) for p in _pieces(_PI_240 / 2, 27, 4))
_TWO_OVER_PI = tl.constexpr(float(2 / _PI_240))
# ln 2 in 42-bit pieces: k * piece is exact for the binary exponents |k| < 2**11 of exp and log.
_LN2_1, _LN2_2, _LN2_3 = (tl.constexpr(p) for p in _pieces(_LN2_240, 42, 3))
_INV_LN2 = tl.constexpr(float(1 / _LN2_240))
_SQRT2 = tl.constexpr(math.sqrt(2.0))

# Taylor series, truncated where the next term is below 2**-106 of the sum on the reduced range; the terms below
# 2**-53 of the sum are summed in double, the others in double-double.
# cos r = sum (-1)^k z^k / (2k)!, z = r^2 <= (pi/4)^2
_COS_HI, _COS_LO, _COS_TAIL, _COS_N, _COS_N_TAIL = _series(
    [Fraction((-1) ** k, math.factorial(2 * k)) for k in range(15)], 9)
# sin r = r * sum (-1)^k z^k / (2k+1)!
_SIN_HI, _SIN_LO, _SIN_TAIL, _SIN_N, _SIN_N_TAIL = _series(
    [Fraction((-1) ** k, math.factorial(2 * k + 1)) for k in range(15)], 8)
# log m = 2 s * sum w^k / (2k+1), s = (m - 1) / (m + 1), w = s^2 <= 0.0295 for m in [sqrt(2)/2, sqrt(2)]
_LOG_HI, _LOG_LO, _LOG_TAIL, _LOG_N, _LOG_N_TAIL = _series([Fraction(1, 2 * k + 1) for k in range(21)], 10)
# exp r = sum r^n / n!, |r| <= ln(2) / 2
_EXP_HI, _EXP_LO, _EXP_TAIL, _EXP_N, _EXP_N_TAIL = _series([Fraction(1, math.factorial(n)) for n in range(24)], 14)

# exp's argument is clamped to +-_EXP_LIMIT (the result is 0 or infinite well before), so that 2**k splits into
# two normal powers of two.
_EXP_LIMIT = tl.constexpr(1100.0)
_MIN_NORMAL = tl.constexpr(2.0**-1022)


# --- double-double arithmetic: a value is an unevaluated sum hi + lo with |lo| <= ulp(hi) / 2 -------------------


@triton.jit
def _two_sum(a, b):
    """a + b exactly, as s + e with s = fl(a + b)."""
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, e


@triton.jit
def _fast_two_sum(a, b):
    """a + b exactly when |a| >= |b| (or a == 0)."""
    s = a + b
    e = b - (s - a)
    return s, e


@triton.jit
def dd_mul(ah, al, bh, bl):
    """(ah + al) * (bh + bl) in double-double arithmetic, renormalized so that hi = fl(hi + lo)."""
    p = ah * bh
    e = tl.fma(ah, bh, -p)  # the exact rounding error of ah * bh
    e = e + (ah * bl + al * bh)
    hi = p + e
    lo = e - (hi - p)
    return hi, lo


@triton.jit
def _dd_add(ah, al, bh, bl):
    """(ah + al) + (bh + bl), accurate to about 2**-104 relative for any magnitudes and signs."""
    sh, se = _two_sum(ah, bh)
    th, te = _two_sum(al, bl)
    sh, se = _fast_two_sum(sh, se + th)
    return _fast_two_sum(sh, se + te)


@triton.jit
def _dd_div(a, bh, bl):
    """a / (bh + bl) for a float64 a: the quotient plus the correction from the exact remainder."""
    q1 = a / bh
    ph, pl = dd_mul(q1, 0.0, bh, bl)
    rh, rl = _dd_add(a, 0.0, -ph, -pl)
    q2 = rh / bh
    return _fast_two_sum(q1, q2)


@triton.jit
def _dd_poly(zh, zl, HI: tl.constexpr, LO: tl.constexpr, TAIL: tl.constexpr, N_DD: tl.constexpr,
             N_TAIL: tl.constexpr):
    """sum c_k z^k by Horner's scheme (constants from _series): the small high-order terms in double, then each
    step s = c_k + z * s in double-double.

    A step is dd_mul and _fast_two_sum written out (|z * s| <= |c_k| on the reduced ranges): the interpreter's
    cost is mostly per call of a jit function, and these steps are most of the calls.
    """
    s = tl.full((), TAIL[0], tl.float64)
    for i in tl.static_range(1, N_TAIL):
        s = s * zh + TAIL[i]
    sh = s
    sl = tl.full((), 0.0, tl.float64)
    for i in tl.static_range(N_DD):
        p = sh * zh
        e = tl.fma(sh, zh, -p) + (sh * zl + sl * zh)  # z * s = p + e
        s = p + HI[i]
        e = (p - (s - HI[i])) + (e + LO[i])  # c_k + z * s = s + e
        sh = s + e
        sl = e - (sh - s)
    return sh, sl


# --- the libm functions the header calls, in float64 -------------------------------------------------------------


@triton.jit(noinline=True)
def _cos(x):
    """C's cos(x), correctly rounded (see the module docstring), for |x| < 2**26 * pi / 2.

    Called once per kernel (noinline) although seven formulas use it: one copy of the code.
    """
    ax = tl.abs(x)
    # ax = k pi/2 + r, |r| <= pi/4; ax - k * _PIO2_1 is exact (Sterbenz), the rest is added in double-double.
    k = tl.floor(ax * _TWO_OVER_PI + 0.5)
    rh, rl = _two_sum(ax - k * _PIO2_1, k * -_PIO2_2)
    ch, cl = _two_sum(k * -_PIO2_3, k * -_PIO2_4)
    rh, rl = _dd_add(rh, rl, ch, cl)
    zh, zl = dd_mul(rh, rl, rh, rl)
    quadrant = k - 4.0 * tl.floor(k * 0.25)
    if (quadrant == 1.0) | (quadrant == 3.0):
        sh, sl = _dd_poly(zh, zl, _SIN_HI, _SIN_LO, _SIN_TAIL, _SIN_N, _SIN_N_TAIL)
        c, _ = dd_mul(rh, rl, sh, sl)
    else:
        c, _ = _dd_poly(zh, zl, _COS_HI, _COS_LO, _COS_TAIL, _COS_N, _COS_N_TAIL)
    # cos(r + pi/2) = -sin r, cos(r + pi) = -cos r, cos(r + 3pi/2) = sin r
    return tl.where((quadrant == 1.0) | (quadrant == 2.0), c * -1.0, c)


@triton.jit
def _log_dd(x):
    """log(x) in double-double for a finite x > 0."""
    subnormal = x < _MIN_NORMAL
    x = tl.where(subnormal, x * 18014398509481984.0, x)  # * 2**54: a normal number
    bits = x.to(tl.int64, bitcast=True)
    e = ((bits >> 52) & 0x7FF) - 1023
    m = ((bits & 0xFFFFFFFFFFFFF) | 0x3FF0000000000000).to(tl.float64, bitcast=True)  # x = m 2**e, m in [1, 2)
    big = m > _SQRT2
    m = tl.where(big, m * 0.5, m)
    e = tl.where(big, e + 1, e)
    e = tl.where(subnormal, e - 54, e).to(tl.float64)
    # log m = 2 atanh(s), s = (m - 1) / (m + 1); m - 1 is exact (Sterbenz), m + 1 exact in double-double.
    dh, dl = _two_sum(m, 1.0)
    sh, sl = _dd_div(m - 1.0, dh, dl)
    wh, wl = dd_mul(sh, sl, sh, sl)
    ah, al = _dd_poly(wh, wl, _LOG_HI, _LOG_LO, _LOG_TAIL, _LOG_N, _LOG_N_TAIL)
    lh, ll = dd_mul(sh * 2.0, sl * 2.0, ah, al)
    # + e ln 2: e * _LN2_1 and e * _LN2_2 are exact.
    kh, kl = _two_sum(e * _LN2_1, e * _LN2_2)
    kh, kl = _fast_two_sum(kh, kl + e * _LN2_3)
    return _dd_add(kh, kl, lh, ll)


@triton.jit
def _exp_dd(eh, el):
    """exp(eh + el) rounded to float64: 0 below about -745, infinite above about 709.8."""
    clamped = tl.where(eh > _EXP_LIMIT, _EXP_LIMIT, tl.where(eh < -_EXP_LIMIT, -_EXP_LIMIT, eh))
    el = tl.where(clamped == eh, el, 0.0)
    # e = k ln 2 + r, |r| <= ln(2)/2; eh - k * _LN2_1 is exact (Sterbenz), the rest is added in double-double.
    k = tl.floor(clamped * _INV_LN2 + 0.5)
    rh, rl = _two_sum(clamped - k * _LN2_1, el)
    ch, cl = _two_sum(k * -_LN2_2, k * -_LN2_3)
    rh, rl = _dd_add(rh, rl, ch, cl)
    ph, pl = _dd_poly(rh, rl, _EXP_HI, _EXP_LO, _EXP_TAIL, _EXP_N, _EXP_N_TAIL)
    # * 2**k in two exact steps (k1, k2 normal exponents): only an underflowing result rounds, once more.
    k1 = tl.floor(k * 0.5)
    k2 = k - k1
    scale1 = ((k1.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)
    scale2 = ((k2.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)
    return ph * scale1 * scale2


@triton.jit(noinline=True)
def _pow(x, y):
    """C's pow(x, y), correctly rounded (see the module docstring), as exp(y log|x|) in double-double.

    C's special cases are kept: pow(x, 0) = pow(1, y) = 1, NaN in NaN out, pow(0, y) = 0 (y > 0) or inf, pow(inf, y)
    = inf (y > 0) or 0, a negative x gives NaN unless y is an integer (negative result for an odd y). Signed zeros
    and infinite y are not special-cased. Called once per kernel (noinline) although six formulas use it.
    """
    ax = tl.abs(x)
    is_int = tl.floor(y) == y
    odd = is_int & (tl.floor(y * 0.5) * 2.0 != y)
    finite = (ax > 0.0) & (ax < float("inf"))
    lh, ll = _log_dd(tl.where(finite, ax, 1.0))
    eh, el = dd_mul(y, 0.0, lh, ll)
    r = _exp_dd(eh, el)
    r = tl.where(x < 0.0, tl.where(is_int, tl.where(odd, r * -1.0, r), float("nan")), r)
    r = tl.where(ax == 0.0, tl.where(y > 0.0, 0.0, float("inf")), r)
    r = tl.where(ax == float("inf"), tl.where(y > 0.0, float("inf"), 0.0), r)
    r = tl.where((x != x) | (y != y), float("nan"), r)
    return tl.where((y == 0.0) | (x == 1.0), 1.0, r)


@triton.jit
def _fmod(a, b):
    """C's fmod(a, b) (exact), for |a / b| < 2**53."""
    aa = tl.abs(a)
    ab = tl.abs(b)
    # q = trunc(|a / b|), or one more when the quotient rounds up to an integer; a - q * b is exact in an fma
    # whenever q is the true quotient (the remainder is representable), so one correction suffices.
    q = tl.floor(aa / ab)
    r = tl.fma(q * -1.0, ab, aa)
    r = tl.where(r < 0.0, tl.fma((q - 1.0) * -1.0, ab, aa), r)
    return tl.where(a < 0.0, r * -1.0, r)


@triton.jit
def _py_mod(a, b):
    """Python's float % for a positive divisor (the header's py_mod)."""
    r = _fmod(a, b)
    return tl.where((r != 0.0) & ((r < 0.0) != (b < 0.0)), r + b, r)


@triton.jit
def _fmin(a, b):
    """Python's min(a, b) (the header's fmin: the same but for NaN and signed zeros)."""
    return tl.where(b < a, b, a)


@triton.jit
def _fmax0(a):
    """Python's max(0.0, a) (the header's fmax(0.0, a): the same but for signed zeros)."""
    return tl.where(a > 0.0, a, 0.0)


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
