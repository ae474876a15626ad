"""The Triton mirror of csrc/include/fused_sched/state_format_math.h: the low-memory state formats' per-element
rules (docs/state_formats.md), for the step kernels' formatted rows.

A formatted block widens its states to float32 (``_widen_bf16``, ``_dequantize``), runs the optimizer's unchanged
float32 element update and narrows the results (``_store_bf16_state``, ``_store_quantized``); a bfloat16 param with
an int16 remainder is joined into its float32 master before the update and split after it (``_formatted_inputs``,
``_store_formatted_param``). Everything is integer or correctly rounded float32 arithmetic, so the results equal
the torch mirror (fused_sched/optim/state_format.py) bit for bit.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .step_common import _block_inputs, _mix32, _state_mask, _store_param, _to_bf16_stochastic

# The kColFormat bit field (optim_math.h StateFormat).
FORMAT_MASK = tl.constexpr(3)
FORMAT_FLOAT32 = tl.constexpr(0)
FORMAT_BFLOAT16 = tl.constexpr(1)
FORMAT_BLOCKWISE_8BIT = tl.constexpr(2)
FORMAT_MASTER_REMAINDER = tl.constexpr(4)
# The hyper flag kStateRoundNearest: bfloat16 moments rounded to nearest even instead of stochastically.
STATE_ROUND_NEAREST = tl.constexpr(256)
# Offsets of the rows of the float32 [4, 256] code table (state_format_math.h kQmap*).
QMAP_SIGNED_CODES = tl.constexpr(0)
QMAP_SIGNED_THRESHOLDS = tl.constexpr(256)
QMAP_UNSIGNED_CODES = tl.constexpr(512)
QMAP_UNSIGNED_THRESHOLDS = tl.constexpr(768)
# state_rounding_key's salt of moment k (0 exp_avg, 1 exp_avg_sq, 2 max_exp_avg_sq): 0x9E3779B9 * (k + 1) mod 2^32.
STATE_SALT0 = tl.constexpr(0x9E3779B9)
STATE_SALT1 = tl.constexpr((0x9E3779B9 * 2) & 0xFFFFFFFF)
STATE_SALT2 = tl.constexpr((0x9E3779B9 * 3) & 0xFFFFFFFF)


# -- bfloat16 moments --

@triton.jit
def _widen_bf16(x):
    """bfloat16 -> float32 by its bits (exact, NaN payloads included)."""
    return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _bf16_nearest(x):
    """state_format_math.h bf16_bits_nearest: to nearest even; a NaN becomes a quiet NaN (sign and payload kept)."""
    bits = x.to(tl.uint32, bitcast=True)
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = tl.where(is_nan, (bits >> 16) | 0x40, (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _state_key(key, SALT: tl.constexpr):
    """state_format_math.h state_rounding_key: the key of one moment from the tensor's step key."""
    return _mix32(key ^ tl.full([], SALT, tl.uint32))


@triton.jit
def _store_bf16_state(ptr, offs, x, mask, nearest, state_key):
    """state_format_math.h bf16_state_bits: a moment's float32 values stored as bfloat16, to nearest even when
    `nearest` (kStateRoundNearest), else stochastically with the bits of each element under `state_key`."""
    rounded = tl.where(nearest, _bf16_nearest(x), _to_bf16_stochastic(x, state_key, offs.to(tl.int64)))
    tl.store(ptr + offs, rounded, mask=mask)


# -- blockwise 8-bit --

@triton.jit
def _dequantize(codes_ptr, absmax_ptr, qmap_ptr, offs, mask, CODES: tl.constexpr, QBLOCK: tl.constexpr):
    """dequantize_code: code_map[code] * absmax of its block (float32 multiply); CODES: the code row's offset."""
    codes = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + offs // QBLOCK, mask=mask, other=0.0)
    return tl.load(qmap_ptr + CODES + codes) * scale


@triton.jit
def _block_absmax(x, mask, BLOCK: tl.constexpr, QBLOCK: tl.constexpr):
    """absmax_step over each QBLOCK of the BLOCK values `x` ([BLOCK // QBLOCK]): max |x| over the elements in
    `mask`, NaN where one of them is NaN (the NaN found apart from the max, whose NaN handling differs between
    Triton's targets)."""
    a = tl.where(mask, tl.abs(x), 0.0)
    is_nan = a != a
    amax = tl.max(tl.reshape(tl.where(is_nan, 0.0, a), [BLOCK // QBLOCK, QBLOCK]), axis=1)
    any_nan = tl.max(tl.reshape(is_nan.to(tl.int32), [BLOCK // QBLOCK, QBLOCK]), axis=1) != 0
    return tl.where(any_nan, float("nan"), amax)


@triton.jit
def _search_step(q, y, thresholds_ptr, S: tl.constexpr):
    return tl.where(tl.load(thresholds_ptr + (q + (S - 1))) < y, q + S, q)


@triton.jit
def _quantize(x, scale, thresholds_ptr):
    """quantize_code: the number of thresholds below y = x / absmax (0 where absmax is 0; a NaN y gives 0), by the
    branchless binary search over the 255 sorted thresholds (gathered loads of the code table's row).

    y is the float32 division rounded to nearest (div_rn), computed as the float64 quotient rounded to float32:
    the same value (rounding twice is harmless for a quotient when the first precision is at least 2 * 24 + 2
    bits, 53 here; the float64 quotient of float32 values neither overflows nor underflows). On sm_90 the float32
    div_rn's slow-path subroutine left call frames of 12-16 bytes in the SGD kernels; float64's leaves none."""
    divisor = tl.where(scale == 0.0, 1.0, scale).to(tl.float64)
    y = tl.where(scale == 0.0, 0.0, (x.to(tl.float64) / divisor).to(tl.float32))
    q = tl.zeros(x.shape, tl.int32)
    q = _search_step(q, y, thresholds_ptr, 128)
    q = _search_step(q, y, thresholds_ptr, 64)
    q = _search_step(q, y, thresholds_ptr, 32)
    q = _search_step(q, y, thresholds_ptr, 16)
    q = _search_step(q, y, thresholds_ptr, 8)
    q = _search_step(q, y, thresholds_ptr, 4)
    q = _search_step(q, y, thresholds_ptr, 2)
    q = _search_step(q, y, thresholds_ptr, 1)
    return q.to(tl.uint8)


@triton.jit
def _store_quantized(codes_ptr, absmax_ptr, qmap_ptr, offs, off, end, x, mask, write, THRESHOLDS: tl.constexpr,
                     BLOCK: tl.constexpr, QBLOCK: tl.constexpr, FULL: tl.constexpr):
    """Narrows a BLOCK of new float32 values `x` (elements in `mask`) to 8-bit codes: each QBLOCK's absmax, then
    the codes against the thresholds row at THRESHOLDS. Written (codes and absmax) only when `write`."""
    amax = _block_absmax(x, mask, BLOCK, QBLOCK)
    scale = tl.reshape(tl.broadcast_to(tl.expand_dims(amax, 1), [BLOCK // QBLOCK, QBLOCK]), [BLOCK])
    codes = _quantize(x, scale, qmap_ptr + THRESHOLDS)
    tl.store(codes_ptr + offs, codes, mask=_state_mask(write, offs, off, end, BLOCK, FULL))
    blocks = off // QBLOCK + tl.arange(0, BLOCK // QBLOCK)
    # The blocks holding an element below `end` (all of them in a FULL block).
    tl.store(absmax_ptr + blocks, amax, mask=blocks * QBLOCK < tl.where(write, end, off))


# -- 16-bit master remainders of bfloat16 params --

@triton.jit
def _join_remainder(p, remainder):
    """join_remainder: the float32 master of bfloat16 params (`p`: their exact float32 values) and their int16
    remainders, (param bits << 16) + remainder mod 2^32."""
    high = p.to(tl.uint32, bitcast=True) & 0xFFFF0000
    return (high + remainder.to(tl.int32).to(tl.uint32, bitcast=True)).to(tl.float32, bitcast=True)


@triton.jit
def _split_remainder(x):
    """split_remainder: (bfloat16 param, int16 remainder) of float32 masters: the high half rounded half up in
    magnitude and the signed low half; a NaN gives the quiet NaN (sign kept) and 0."""
    bits = x.to(tl.uint32, bitcast=True)
    low = bits & 0xFFFF
    up = low >= 0x8000
    high = ((bits >> 16) + up.to(tl.uint32)) & 0xFFFF
    remainder = tl.where(up, low.to(tl.int32) - 0x10000, low.to(tl.int32))
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    high = tl.where(is_nan, ((bits >> 16) & 0x8000) | 0x7FC0, high)
    remainder = tl.where(is_nan, 0, remainder)
    return high.to(tl.uint16).to(tl.bfloat16, bitcast=True), remainder.to(tl.int16)


@triton.jit
def _formatted_inputs(param_ptr, grad_ptr, master_ptr, remainder_ptr, off, end, has_master, has_remainder,
                      grad_scale, clip_coef, PARAM_DTYPE: tl.constexpr, BLOCK: tl.constexpr, HAS_SCALE: tl.constexpr,
                      HAS_CLIP: tl.constexpr, FULL: tl.constexpr):
    """_block_inputs of a formatted row: the float32 parameter is the master joined from the bfloat16 param and
    its remainder where the row has one (has_remainder; has_master: a float32 master)."""
    offs, mask, master_mask, p, g = _block_inputs(param_ptr, grad_ptr, master_ptr, off, end, has_master, grad_scale,
                                                  clip_coef, PARAM_DTYPE, BLOCK, HAS_SCALE, HAS_CLIP, FULL)
    if PARAM_DTYPE == tl.bfloat16:
        remainder_mask = _state_mask(has_remainder, offs, off, end, BLOCK, FULL)
        remainder = tl.load(remainder_ptr + offs, mask=remainder_mask, other=0)
        p = tl.where(remainder_mask, _join_remainder(p, remainder), p)
    return offs, mask, master_mask, p, g


@triton.jit
def _store_formatted_param(param_ptr, master_ptr, remainder_ptr, offs, off, end, p, mask, master_mask, has_remainder,
                           stochastic, key, PARAM_DTYPE: tl.constexpr, BLOCK: tl.constexpr, FULL: tl.constexpr):
    """_store_param of a formatted row; a row with a remainder writes the split of its master instead."""
    if PARAM_DTYPE == tl.bfloat16:
        remainder_mask = _state_mask(has_remainder, offs, off, end, BLOCK, FULL)
        _store_param(param_ptr, master_ptr, offs, p, _state_mask(has_remainder == 0, offs, off, end, BLOCK, FULL),
                     master_mask, stochastic, key, PARAM_DTYPE)
        high, remainder = _split_remainder(p)
        tl.store(param_ptr + offs, high, mask=remainder_mask)
        tl.store(remainder_ptr + offs, remainder, mask=remainder_mask)
    else:
        _store_param(param_ptr, master_ptr, offs, p, mask, master_mask, stochastic, key, PARAM_DTYPE)
