"""What the Triton step kernels of every optimizer share: launch constants, the hyper-table flags, and the jit helpers
for rounding, AMP / clipping inputs, the device schedule, block masks and the last program's step advance."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._schedule_program import COLUMNS as _SCHEDULE_COLUMNS
from ..device_tables import TABLE_COLUMNS
from .schedule import evaluate_program

# Untuned: no GPU was available when these were chosen. CHUNK must be a multiple of BLOCK, BLOCK a power of two.
# BLOCK 512: one 16-byte vector per thread and tensor at 4 warps; 1024 took Adam to 150-212 registers on sm_90
# (3 programs per SM instead of the 4 asked), 512 to 93-127 (bench/results/kernel-resources.md).
DEFAULT_BLOCK = 512  # elements per inner iteration of a program
DEFAULT_CHUNK = 65536  # elements per chunk (unit of work handed to a program)
DEFAULT_NUM_WARPS = 4
# Rows handled per iteration when the last program advances the steps / clears the fresh flags.
_ROW_BLOCK = 256
# float64 values per row of a schedule program (schedule_math.h kScheduleColumns).
_COLUMNS = tl.constexpr(_SCHEDULE_COLUMNS)

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# Flag bits of the FLAGS hyper-parameter column (optim_math.h HyperFlag).
_AMSGRAD = tl.constexpr(1)
_MAXIMIZE = tl.constexpr(2)
_NESTEROV = tl.constexpr(4)
_DECOUPLED_WEIGHT_DECAY = tl.constexpr(8)
_STOCHASTIC_ROUNDING = tl.constexpr(16)
_LR_FROM_TABLE = tl.constexpr(64)
_MOMENTUM_FROM_TABLE = tl.constexpr(128)

# Address table layout (optim_math.h TableColumn): device_tables.py, shared with the CUDA backend.
_W = tl.constexpr(TABLE_COLUMNS)


@triton.jit
def _to_param_dtype(x, PARAM_DTYPE: tl.constexpr):
    """Rounds float32 values to the parameter dtype, to nearest-even."""
    if PARAM_DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # The carry of the rounding would turn a NaN with a small payload into an infinity.
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(PARAM_DTYPE)


@triton.jit
def _store_param(param_ptr, master_ptr, offs, p, mask, master_mask, stochastic, key, PARAM_DTYPE: tl.constexpr):
    """Writes the updated float32 values: into the master copy where there is one, and into the parameter
    (rounded to nearest even, or stochastically for a bfloat16 parameter that asks for it)."""
    tl.store(master_ptr + offs, p, mask=master_mask)
    if PARAM_DTYPE == tl.bfloat16:
        nearest = _to_param_dtype(p, PARAM_DTYPE)
        rounded = tl.where(stochastic, _to_bf16_stochastic(p, key, offs.to(tl.int64)), nearest)
        tl.store(param_ptr + offs, rounded, mask=mask)
    else:
        tl.store(param_ptr + offs, _to_param_dtype(p, PARAM_DTYPE), mask=mask)


@triton.jit
def _advance_steps_and_reset(table_ptr, counter_ptr, n_rows, skipped, ADVANCE_STEPS: tl.constexpr,
                             CLEAR_FRESH: tl.constexpr, ROW_BLOCK: tl.constexpr):
    """Run by the program holding the last ticket, after every program has finished its chunks: advances the steps
    (ADVANCE_STEPS) and clears SGD's fresh flags (CLEAR_FRESH). A step that found_inf skipped advances nothing and
    keeps the fresh flags."""
    if not skipped:
        for r0 in range(0, n_rows, ROW_BLOCK):
            rows = r0 + tl.arange(0, ROW_BLOCK)
            in_range = rows < n_rows
            if ADVANCE_STEPS:
                step_address = tl.load(table_ptr + rows * _W + 5, mask=in_range, other=0)
                steps = step_address.to(tl.pointer_type(tl.float32))
                # Adam: every row has a step. SGD: the rows of bfloat16 momentum buffers rounded stochastically.
                has_step = in_range & (step_address != 0) if CLEAR_FRESH else in_range
                # torch keeps the step in float32 and adds 1 in float32.
                tl.store(steps, tl.load(steps, mask=has_step) + 1.0, mask=has_step)
            if CLEAR_FRESH:
                tl.store(table_ptr + rows * _W + 14, tl.zeros([ROW_BLOCK], dtype=tl.int64), mask=in_range)
    tl.store(counter_ptr, 0)


@triton.jit
def _finish(table_ptr, counter_ptr, n_rows, skipped, step_advance_ptr, ADVANCE_STEPS: tl.constexpr,
            CLEAR_FRESH: tl.constexpr, ROW_BLOCK: tl.constexpr):
    """Takes this program's ticket; the last program advances the steps (and clears the fresh flags) and records
    in step_advance whether the step ran."""
    # The ticket is taken by one thread: the barrier makes every thread's reads of steps / flags precede it.
    tl.debug_barrier()
    # acq_rel: the other programs' reads happen before the last program's writes.
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if ticket == tl.num_programs(0) - 1:
        _advance_steps_and_reset(table_ptr, counter_ptr, n_rows, skipped, ADVANCE_STEPS, CLEAR_FRESH, ROW_BLOCK)
        # "A step ran since the bound scheduler last cleared the flag": left alone by a skipped step.
        if not skipped:
            tl.store(step_advance_ptr, tl.full([], 1.0, tl.float64))


@triton.jit
def _mix32(x):
    """optim_math.h mix32 (lowbias32) on uint32 values."""
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], 0x846CA68B, tl.uint32)
    x = x ^ (x >> 16)
    return x


@triton.jit
def _rounding_key(seed_lo, seed_hi, step, param_id):
    """optim_math.h rounding_key: the per-tensor key of one step (seed halves as int32, the rest uint32)."""
    seed_lo = seed_lo.to(tl.int32).to(tl.uint32, bitcast=True)
    seed_hi = seed_hi.to(tl.int32).to(tl.uint32, bitcast=True)
    k = _mix32(seed_lo ^ _mix32(seed_hi))
    k = _mix32(k ^ step)
    return _mix32(k ^ param_id)


@triton.jit
def _to_bf16_stochastic(x, key, offs):
    """optim_math.h bf16_bits_stochastic with rounding_bits(key, offs): unbiased stochastic rounding."""
    hi = (offs >> 32).to(tl.uint32)
    lo = (offs & 0xFFFFFFFF).to(tl.uint32)
    random16 = _mix32(_mix32(key ^ hi) ^ lo) & 0xFFFF
    bits = x.to(tl.uint32, bitcast=True)
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = tl.where(is_nan, (bits >> 16) | 0x40, (bits + random16) >> 16)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _prescale(g, grad_scale, clip_coef, HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr):
    """optim_math.h prescale_grad: divide by GradScaler's scale, multiply by a fused clip's coefficient."""
    if HAS_SCALE:
        g = tl.div_rn(g, grad_scale)
    if HAS_CLIP:
        g = g * clip_coef
    return g


@triton.jit
def _step_inputs(grad_scale_ptr, found_inf_ptr, clip_coef_ptr, HAS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                 HAS_CLIP: tl.constexpr):
    """(grad_scale, clip_coef, skipped) of this launch."""
    grad_scale = 1.0
    clip_coef = 1.0
    skipped = tl.full([], 0, tl.int32) != 0
    if HAS_SCALE:
        grad_scale = tl.load(grad_scale_ptr)
    if HAS_CLIP:
        clip_coef = tl.load(clip_coef_ptr)
    if HAS_FOUND_INF:
        skipped = tl.load(found_inf_ptr) != 0.0
    return grad_scale, clip_coef, skipped


@triton.jit
def _scheduled(lr, momentum, schedule_ptr, segments, schedule_step_ptr, group, flags):
    """effective_hyper (csrc/cpu/step_common.cpp) for one group: the values its schedule program sets at the scheduler's
    step replace the table's lr and momentum (Adam: beta1). Every chunk evaluates the program of its own group:
    no launch-wide pass is needed, and the host reads neither the step nor the table."""
    program = schedule_ptr + group * segments * _COLUMNS
    s_lr, lr_set, s_momentum, momentum_set = evaluate_program(program, segments, tl.load(schedule_step_ptr))
    lr_set = lr_set & ((flags & _LR_FROM_TABLE) == 0)
    momentum_set = momentum_set & ((flags & _MOMENTUM_FROM_TABLE) == 0)
    return tl.where(lr_set, s_lr, lr), tl.where(momentum_set, s_momentum, momentum)


@triton.jit
def _state_mask(flag, offs, off, end, BLOCK: tl.constexpr, FULL: tl.constexpr):
    """The mask of an optional state (a scalar flag says whether it exists). FULL: `flag` everywhere, uniform, so
    it keeps a vector load or store whole; otherwise the elements up to `end` when `flag`, through the end of the
    mask rather than (mask & flag), which the Triton interpreter mistypes."""
    if FULL:
        return tl.full([BLOCK], 0, tl.int32) + flag.to(tl.int32) != 0
    else:
        return offs < tl.where(flag, end, off)


@triton.jit
def _block_inputs(param_ptr, grad_ptr, master_ptr, off, end, has_master, grad_scale, clip_coef,
                  PARAM_DTYPE: tl.constexpr, BLOCK: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr,
                  FULL: tl.constexpr):
    """A block's offsets, element mask (FULL: all true), master-copy mask, float32 parameter (from
    the master copy where there is one) and prescaled gradient (written back when scaled or clipped, as torch's
    fused kernels leave it). FULL: a whole block of 16-byte aligned tensors, offsets hinted contiguous and
    aligned."""
    offs = off + tl.arange(0, BLOCK)
    if FULL:
        offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
        mask = tl.full([BLOCK], 1, tl.int1)  # a constant: the compiler drops it
    else:
        mask = offs < end
    master_mask = _state_mask(has_master, offs, off, end, BLOCK, FULL)
    p = tl.load(param_ptr + offs, mask=_state_mask(has_master == 0, offs, off, end, BLOCK, FULL)).to(tl.float32)
    p = tl.where(master_mask, tl.load(master_ptr + offs, mask=master_mask), p)
    g = _prescale(tl.load(grad_ptr + offs, mask=mask).to(tl.float32), grad_scale, clip_coef, HAS_SCALE, HAS_CLIP)
    if HAS_SCALE or HAS_CLIP:
        tl.store(grad_ptr + offs, _to_param_dtype(g, PARAM_DTYPE), mask=mask)
    return offs, mask, master_mask, p, g
