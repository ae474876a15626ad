"""An fma that rounds once, for Triton interpreters whose ``tl.fma`` rounds twice.

The kernels' bit-exact tests compare the Triton backend with the C++ backends and torch to the last bit, and the
kernels call ``tl.fma`` where optim_math.h rounds a multiply-add once (and in the double-double arithmetic of the
schedules and bias corrections, where ``fma(a, b, -a*b)`` must give the exact rounding error of a product). A GPU's
fma rounds once; so does the interpreter of triton 3.9 (``_interpreter.fma_fp32`` / ``fma_fp64``). The interpreter
of triton 3.8 (which torch 2.14 pins) computes ``x * y + z`` in the operands' precision: two roundings.

``install()`` probes the interpreter with a kernel whose result tells the two apart, and only when its fma rounds
twice, replaces the interpreter's ``create_fma`` with this module's ``fma``: the kernels under test are unchanged
and the interpreter then computes what the GPU computes. ``fma`` is vectorized numpy:

* float64: Boldo and Melquiond's emulation ("Emulation of FMA and correctly-rounded sums: proved algorithms using
  rounding to odd", IEEE TC 2008): the exact product as a pair (Dekker), an exact sum with z, the low parts added
  with rounding to odd, and one final round-to-nearest;
* float32: the product is exact in float64, the sum with z is made exact as a pair (TwoSum) and rounded to odd in
  float64, whose 29 extra bits make the final rounding to float32 correct;
* float16 / bfloat16: as triton 3.9 does, one float64 sum rounded once to the narrow type.
"""

from __future__ import annotations

import numpy as np


def _two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _split(a):
    c = a * 134217729.0  # 2**27 + 1 (Veltkamp)
    hi = c - (c - a)
    return hi, a - hi


def _two_product(a, b):
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _round_to_odd_sum(a, b):
    """fl(a + b) rounded to odd: exact sums stay; inexact ones take the neighbour whose last bit is 1."""
    s, e = _two_sum(a, b)
    bits = s.view(np.int64)
    even = (bits & 1) == 0
    toward = np.where(e > 0, np.inf, -np.inf)
    return np.where((e != 0) & even & np.isfinite(s), np.nextafter(s, toward), s)


def fma(x, y, z):
    """x * y + z rounded once, elementwise, in the dtype of z."""
    x, y, z = np.broadcast_arrays(x, y, z)
    dtype = z.dtype
    with np.errstate(over="ignore", invalid="ignore"):
        if dtype == np.float64:
            ph, pl = _two_product(x, y)
            uh, ul = _two_sum(z, ph)
            result = uh + _round_to_odd_sum(ul, pl)
            # Non-finite or huge operands: the splitting overflows; the plain expression is right there.
            plain = x * y + z
            return np.where(np.isfinite(result) & (np.abs(ph) < 1e300), result, plain)
        if dtype == np.float32:
            p = x.astype(np.float64) * y.astype(np.float64)  # exact: 24 + 24 bits
            return _round_to_odd_sum(p, z.astype(np.float64)).astype(np.float32)
        return (x.astype(np.float64) * y.astype(np.float64) + z.astype(np.float64)).astype(dtype)


def interpreter_fma_rounds_twice() -> bool:
    """Runs tl.fma in the interpreter on float32 operands whose product needs a rounding: (1 + 2**-12)**2 - 1 is
    2**-11 + 2**-24 exactly (a float32), while rounding the product first gives 2**-11."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def probe(x_ptr, out_ptr):
        x = tl.load(x_ptr)
        tl.store(out_ptr, tl.fma(x, x, -1.0))

    x = torch.tensor([1.0 + 2.0**-12], dtype=torch.float32)
    out = torch.zeros(1, dtype=torch.float32)
    probe[(1,)](x, out)
    return out.item() != 2.0**-11 + 2.0**-24


def install() -> bool:
    """Makes the interpreter's fma round once where it rounds twice; True when it was replaced."""
    if not interpreter_fma_rounds_twice():
        return False
    from triton.runtime import interpreter

    def create_fma(self, x, y, z):
        return interpreter.TensorHandle(fma(x.data, y.data, z.data), z.dtype.scalar)

    interpreter.InterpreterBuilder.create_fma = create_fma
    assert not interpreter_fma_rounds_twice()
    return True
