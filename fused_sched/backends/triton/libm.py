"""The float64 libm functions the schedule header calls (cos, pow, exp, log, fmod), from IEEE operations alone in
double-double arithmetic: correctly rounded, the same bits under the interpreter and on every GPU (why:
schedule.py). Adam's bias correction uses its exact double-double product too."""

from __future__ import annotations

import math
from fractions import Fraction

import triton
import triton.language as tl

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
