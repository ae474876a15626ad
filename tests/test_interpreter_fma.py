"""tests/triton_interpreter_fma.py: the fma that conftest.py installs into a Triton interpreter whose fma rounds
twice is correctly rounded (checked against exact rational arithmetic), and the probe tells the two apart."""

from fractions import Fraction

import numpy as np
import pytest
import triton_interpreter_fma as shim


def _nearest(exact: Fraction, dtype) -> float:
    """exact rounded to nearest, ties to even, in dtype (float64 / float32), by exact comparisons."""
    guess = np.array(float(exact), dtype=np.float64).astype(dtype)
    up, down = np.array(np.inf, dtype=dtype), np.array(-np.inf, dtype=dtype)
    candidates = [guess, np.nextafter(guess, up), np.nextafter(guess, down)]
    as_int = np.int64 if dtype == np.float64 else np.int32

    def key(c):  # nearest first; of two at the same distance, the even one
        return abs(Fraction(float(c)) - exact), int(np.array(c).view(as_int)) & 1

    return float(min(candidates, key=key))


def _cases(dtype, n=4000):
    rng = np.random.default_rng(0)
    bits = 52 if dtype == np.float64 else 23
    x = (1.0 + rng.integers(0, 2**bits, n) / 2.0**bits) * 2.0 ** rng.integers(-20, 20, n)
    y = (1.0 + rng.integers(0, 2**bits, n) / 2.0**bits) * 2.0 ** rng.integers(-20, 20, n)
    x, y = x.astype(dtype) * rng.choice([-1, 1], n).astype(dtype), y.astype(dtype)
    # z: minus the rounded product (the double-double error term), nearby values, and random ones.
    z = np.where(rng.random(n) < 0.5, -(x * y), (x * y) * dtype(-1 + 2.0**-10) + rng.standard_normal(n).astype(dtype))
    # Near-ties of the final rounding: (1 + 2**-k)**2 - 1 patterns.
    k = np.arange(1, 30) if dtype == np.float32 else np.arange(1, 60)
    t = (1.0 + 2.0 ** -k.astype(np.float64)).astype(dtype)
    return (np.concatenate([x, t]), np.concatenate([y, t]), np.concatenate([z, np.full(t.shape, -1.0, dtype)]))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fma_rounds_once(dtype):
    x, y, z = _cases(dtype)
    got = shim.fma(x, y, z)
    assert got.dtype == dtype
    for a, b, c, r in zip(x.tolist(), y.tolist(), z.tolist(), got.tolist(), strict=True):
        exact = Fraction(a) * Fraction(b) + Fraction(c)
        assert r == _nearest(exact, dtype), (a, b, c)


def test_fma_keeps_non_finite_values():
    inf, nan = np.float64(np.inf), np.float64(np.nan)
    out = shim.fma(np.array([inf, 1.0, nan, 1e300]), np.array([1.0, inf, 1.0, 1e10]), np.array([0.0, 1.0, 1.0, 0.0]))
    assert np.isinf(out[0]) and np.isinf(out[1]) and np.isnan(out[2]) and np.isinf(out[3])


def test_probe_and_install_leave_an_exact_interpreter():
    pytest.importorskip("triton")
    from fused_sched import backends

    if not backends.triton_interpreted():
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1)")
    # conftest.py ran install() already: whichever triton this is, its interpreter's fma now rounds once.
    assert not shim.interpreter_fma_rounds_twice()
