"""Triton kernels of the fused optimizer step: one launch updates every tensor of one (device, dtype) bucket.

Design
------
* Address table (``OptimBucket.address_table``): int64 ``[n, TABLE_COLUMNS]``, one row per tensor: (param, grad,
  state0, state1, state2, step) addresses, numel, param-group index, master-copy address, param id (optim_math.h
  ``TableColumn``). The kernels turn the addresses into typed pointers
  (the pattern of Triton's grouped-GEMM tutorial), so one launch reaches tensors that share no storage. Adam:
  state0 = exp_avg, state1 = exp_avg_sq, state2 = max_exp_avg_sq (0 unless amsgrad), step = a float32
  one-element tensor. SGD: state0 = momentum_buffer (0 without momentum); column 5 is no address but the "fresh
  buffer" flag (1 on the step that creates the buffer, which torch fills with the gradient). A nonzero master
  address (master_weights) makes the kernel read and write the float32 copy and write the parameter rounded from
  it; the param id keys stochastic rounding's random bits.
* Chunk map (``build_chunks``): int64 ``[n_chunks, 2]`` of (row, start); a chunk covers elements
  ``[start, min(start + CHUNK, numel))`` of one tensor. Chunks, not tensors, are the unit of work, so a bucket of
  one huge and many tiny tensors still spreads evenly over the programs.
* Hyper-parameter table (fused_sched/_hyper.py, optim_math.h ``HyperColumn``): float64 ``[groups, 8]``. Every
  chunk computes its scalars on the device in float64 exactly like ``adam_coeffs`` / ``sgd_coeffs`` and rounds
  them to float32 once; the host reads neither the table nor the steps, so a launch can be captured in a CUDA
  graph and replayed while the learning rate and the steps change.
* Device schedules (``schedule`` / ``schedule_step``, HAS_SCHEDULE): every chunk also evaluates its group's
  schedule program (triton_schedule.py, schedule_math.h) at the scheduler's float64 step counter, and the values
  it sets replace the row's lr and beta1 (SGD: momentum), as ``effective_hyper`` in optim_cpu.cpp does. Without
  a schedule HAS_SCHEDULE is false and none of it is compiled.
* Persistent grid: ``num_programs`` programs, program ``pid`` taking chunks ``pid, pid + num_programs, ...``.
  Offsets are int64 throughout: tensors of more than 2**31 elements work.
* Vector path: the addresses come from a table, so Triton knows nothing of their alignment and would move every
  element on its own (32-bit loads). A chunk whose tensors all start on a 16-byte boundary runs its full blocks
  through ``_adam_block`` / ``_sgd_block`` with FULL=True: alignment and contiguity hints, no element masks (the
  optional states are gated by masks uniform over the block), so every load and store is a 16-byte vector; the
  partial last block and misaligned tensors take the masked path (FULL=False). Both paths compute the same
  operations in the same order (bit-for-bit tests against the C++ backend cover each).
* Step advance without a race: a program reads a tensor's step (and uses step + 1) while it updates that
  tensor's chunks, so no step may change before every program is done. Each program therefore takes a ticket
  from ``counter`` (int32, zero before the launch) once its chunks are done; the program holding the last ticket
  increments every step (Adam) or clears every fresh flag (SGD), then zeroes ``counter`` so that the next launch
  (or CUDA-graph replay) starts clean.

* Large-model inputs (optional pointers, compiled in by constexpr flags): GradScaler's ``grad_scale`` (gradients
  are divided by it) and ``found_inf`` (when set, no program touches anything and the steps do not advance), a
  fused clip's ``clip_coef`` (gradients are multiplied by it; the prescaled gradient is written back into
  ``.grad``, as torch's fused kernels leave it unscaled and clip_grad_norm_ leaves it clipped), and
  ``step_advance`` (float64, set to 1 by the last program of a step that ran, left alone by a skipped one) which
  the bound device scheduler adds to its counter and clears.
* Norm pass (``grad_norm_kernel``): every program accumulates |g|^p (or max |g|) of its chunks in float64 into its
  slot of a partials buffer; the launch marked FINALIZE has its last program combine every slot in order
  (deterministic), and write the total norm and torch's clip coefficient (optim_math.h ``total_norm_from``,
  ``clip_coefficient``).

Numerics mirror csrc/include/fused_sched/optim_math.h operation by operation, so results agree with the C++
backends (and torch.optim) to the last bit or so:

* a multiply-add rounds once exactly where optim_math.h calls MathOps::fma (where torch's vectorized CPU kernels
  fuse: add with alpha, lerp), through an explicit ``tl.fma``; everywhere else the launch disables fp fusion, so
  a multiply and an add round twice;
* divisions and square roots are IEEE round-to-nearest (``tl.div_rn`` / ``tl.sqrt_rn``, not the approximate
  defaults of ``/`` and ``tl.sqrt`` on float32);
* beta ** step is computed in double-double arithmetic (``_pow``): libdevice's pow is unavailable under the
  Triton interpreter, and exp2(step * log2(beta)) would be far less accurate than the C pow() that torch uses;
* negation multiplies by -1 (Triton's unary minus is 0 - x, which turns -0.0 into +0.0);
* float32 -> bfloat16 rounds to nearest-even by integer arithmetic, because the Triton interpreter truncates
  that conversion (float16 conversions are exact on both).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._schedule_program import COLUMNS as _SCHEDULE_COLUMNS
from .device_tables import COL_MASTER, COL_NUMEL, COL_PARAM_ID, COL_STEP, TABLE_COLUMNS, build_chunks
from .triton_schedule import dd_mul, evaluate_program

__all__ = ["COL_MASTER", "COL_NUMEL", "COL_PARAM_ID", "COL_STEP", "TABLE_COLUMNS", "build_chunks", "launch_adam",
           "launch_sgd", "launch_grad_norm"]

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

# Norm kinds of the norm pass (grad_norm_kernel's NORM constexpr).
NORM_TWO, NORM_ONE, NORM_INF, NORM_P = 0, 1, 2, 3


@triton.jit
def _pow(base, exponent):
    """base ** exponent in float64, for an integer-valued exponent >= 0 (Adam's step counter).

    Binary exponentiation in double-double (about 100 significant bits) leaves an error far below half an ulp of
    float64, so the result is the correctly rounded power, which is what C's pow() returns.
    """
    rh = tl.cast(1.0, tl.float64)
    rl = tl.cast(0.0, tl.float64)
    bh = base
    bl = tl.cast(0.0, tl.float64)
    e = exponent
    while e > 0.0:
        half = tl.floor(e * 0.5)
        ph, pl = dd_mul(rh, rl, bh, bl)
        odd = e != half * 2.0
        rh = tl.where(odd, ph, rh)
        rl = tl.where(odd, pl, rl)
        bh, bl = dd_mul(bh, bl, bh, bl)
        e = half
    return rh


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
def _advance_steps_and_reset(table_ptr, counter_ptr, n_rows, skipped, IS_ADAM: tl.constexpr,
                             ROW_BLOCK: tl.constexpr):
    """Run by the program holding the last ticket, after every program has finished its chunks. A step that
    found_inf skipped advances nothing and keeps the fresh flags."""
    if not skipped:
        for r0 in range(0, n_rows, ROW_BLOCK):
            rows = r0 + tl.arange(0, ROW_BLOCK)
            in_range = rows < n_rows
            if IS_ADAM:
                steps = tl.load(table_ptr + rows * _W + 5, mask=in_range, other=0).to(tl.pointer_type(tl.float32))
                # torch keeps the step in float32 and adds 1 in float32.
                tl.store(steps, tl.load(steps, mask=in_range) + 1.0, mask=in_range)
            else:
                tl.store(table_ptr + rows * _W + 5, tl.zeros([ROW_BLOCK], dtype=tl.int64), mask=in_range)
    tl.store(counter_ptr, 0)


@triton.jit
def _finish(table_ptr, counter_ptr, n_rows, skipped, step_advance_ptr, IS_ADAM: tl.constexpr,
            ROW_BLOCK: tl.constexpr):
    """Takes this program's ticket; the last program advances the steps (or clears the fresh flags) and records
    in step_advance whether the step ran."""
    # The ticket is taken by one thread: the barrier makes every thread's reads of steps / flags precede it.
    tl.debug_barrier()
    # acq_rel: the other programs' reads happen before the last program's writes.
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if ticket == tl.num_programs(0) - 1:
        _advance_steps_and_reset(table_ptr, counter_ptr, n_rows, skipped, IS_ADAM, ROW_BLOCK)
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
    """effective_hyper of optim_cpu.cpp for one group: the values its schedule program sets at the scheduler's
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


@triton.jit
def _adam_block(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, master_ptr, off, end, amsgrad,
                has_master, grad_scale, clip_coef, grad_sign, decoupled, decay, l2, weight_decay, lerp_small,
                lerp_weight, lerp_weight_minus_one, beta2_f, one_minus_beta2, bc2_sqrt, eps, neg_step_size,
                stochastic, key, PARAM_DTYPE: tl.constexpr, BLOCK: tl.constexpr, HAS_SCALE: tl.constexpr,
                HAS_CLIP: tl.constexpr, FULL: tl.constexpr):
    """adam_element over the BLOCK elements at `off`. FULL: a whole block of 16-byte aligned tensors (contiguous,
    aligned offsets; the optional states gated by uniform masks); otherwise elements up to `end` only."""
    offs, mask, master_mask, p, g = _block_inputs(param_ptr, grad_ptr, master_ptr, off, end, has_master, grad_scale,
                                                  clip_coef, PARAM_DTYPE, BLOCK, HAS_SCALE, HAS_CLIP, FULL)
    vmax_mask = _state_mask(amsgrad, offs, off, end, BLOCK, FULL)
    m = tl.load(exp_avg_ptr + offs, mask=mask)
    v = tl.load(exp_avg_sq_ptr + offs, mask=mask)
    vmax = tl.load(max_exp_avg_sq_ptr + offs, mask=vmax_mask)

    # adam_element, operation for operation.
    g = g * grad_sign
    p = tl.where(decoupled, p * decay, p)
    g = tl.where(l2, tl.fma(p, weight_decay, g), g)  # grad.add(param, alpha=weight_decay)
    m = tl.where(lerp_small, tl.fma(lerp_weight, g - m, m), tl.fma(lerp_weight_minus_one, g - m, g))
    v = v * beta2_f
    v = v + one_minus_beta2 * g * g
    vmax = tl.where((vmax != vmax) | (vmax > v), vmax, v)  # torch.maximum propagates NaN
    second = tl.where(amsgrad, vmax, v)
    denom = tl.div_rn(tl.sqrt_rn(second), bc2_sqrt) + eps
    p = p + tl.div_rn(neg_step_size * m, denom)

    _store_param(param_ptr, master_ptr, offs, p, mask, master_mask, stochastic, key, PARAM_DTYPE)
    tl.store(exp_avg_ptr + offs, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
    tl.store(max_exp_avg_sq_ptr + offs, vmax, mask=vmax_mask)


@triton.jit
def adam_kernel(table_ptr, chunks_ptr, hyper_ptr, counter_ptr, n_rows, n_chunks, schedule_ptr, segments,
                schedule_step_ptr, grad_scale_ptr, found_inf_ptr, clip_coef_ptr, step_advance_ptr, seed_lo, seed_hi,
                PARAM_DTYPE: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                ROW_BLOCK: tl.constexpr, HAS_SCHEDULE: tl.constexpr, HAS_SCALE: tl.constexpr,
                HAS_FOUND_INF: tl.constexpr, HAS_CLIP: tl.constexpr):
    """Adam / AdamW over every chunk of the bucket; see the module docstring for the tables."""
    grad_scale, clip_coef, skipped = _step_inputs(grad_scale_ptr, found_inf_ptr, clip_coef_ptr, HAS_SCALE,
                                                  HAS_FOUND_INF, HAS_CLIP)
    for c in range(tl.program_id(0), tl.where(skipped, 0, n_chunks), tl.num_programs(0)):
        row = tl.load(chunks_ptr + 2 * c)
        start = tl.load(chunks_ptr + 2 * c + 1)
        entry = table_ptr + row * _W
        group = tl.load(entry + 7)
        h = hyper_ptr + group * 8
        # adam_coeffs: float64 scalars, rounded to float32 once. The schedule first: its evaluation calls functions
        # (noinline), and the fewer values live across those calls, the fewer registers are saved to the stack
        # around them (sm_90: 4-8 bytes of spills in some scheduled variants otherwise).
        lr = tl.load(h + 0)
        beta1 = tl.load(h + 1)
        if HAS_SCHEDULE:
            lr, beta1 = _scheduled(lr, beta1, schedule_ptr, segments, schedule_step_ptr, group,
                                   tl.load(h + 7).to(tl.int32))
        param_ptr = tl.load(entry + 0).to(tl.pointer_type(PARAM_DTYPE))
        grad_ptr = tl.load(entry + 1).to(tl.pointer_type(PARAM_DTYPE))
        exp_avg_ptr = tl.load(entry + 2).to(tl.pointer_type(tl.float32))
        exp_avg_sq_ptr = tl.load(entry + 3).to(tl.pointer_type(tl.float32))
        max_exp_avg_sq_ptr = tl.load(entry + 4).to(tl.pointer_type(tl.float32))
        step_ptr = tl.load(entry + 5).to(tl.pointer_type(tl.float32))
        numel = tl.load(entry + 6)
        master_address = tl.load(entry + 8)
        master_ptr = master_address.to(tl.pointer_type(tl.float32))
        has_master = master_address != 0
        beta2 = tl.load(h + 2)
        eps = tl.load(h + 3).to(tl.float32)
        wd = tl.load(h + 4)
        flags = tl.load(h + 7).to(tl.int32)
        step = (tl.load(step_ptr) + 1.0).to(tl.float64)  # the float32 step after torch's increment
        bias_correction1 = 1.0 - _pow(beta1, step)
        bias_correction2 = 1.0 - _pow(beta2, step)
        lerp_w = 1.0 - beta1
        lerp_weight = lerp_w.to(tl.float32)
        lerp_weight_minus_one = lerp_weight - 1.0
        lerp_small = tl.abs(lerp_w) < 0.5  # torch.lerp's choice of formula
        decay = (1.0 - lr * wd).to(tl.float32)
        weight_decay = wd.to(tl.float32)
        beta2_f = beta2.to(tl.float32)
        one_minus_beta2 = (1.0 - beta2).to(tl.float32)
        bc2_sqrt = tl.sqrt(bias_correction2).to(tl.float32)  # float64 sqrt is correctly rounded
        neg_step_size = ((lr / bias_correction1) * -1.0).to(tl.float32)
        grad_sign = tl.where((flags & _MAXIMIZE) != 0, -1.0, 1.0)
        amsgrad = (flags & _AMSGRAD) != 0
        decoupled = (flags & _DECOUPLED_WEIGHT_DECAY) != 0
        # Adam's L2 term; kNoWeightDecay: torch skips the add when weight_decay == 0.
        l2 = ((flags & _DECOUPLED_WEIGHT_DECAY) == 0) & (wd != 0.0)
        stochastic = ((flags & _STOCHASTIC_ROUNDING) != 0) & (master_address == 0)
        key = _rounding_key(seed_lo, seed_hi, (tl.load(step_ptr) + 1.0).to(tl.uint32),
                            tl.load(entry + 9).to(tl.uint32))

        end = tl.minimum(start + CHUNK, numel)
        # Full blocks of a chunk whose tensors all start 16-byte aligned take the vector path (no masks but the
        # optional states' uniform ones, alignment hints: 128-bit loads and stores); the rest (a partial last block,
        # a misaligned tensor) the masked scalar path.
        aligned = ((tl.load(entry + 0) | tl.load(entry + 1) | tl.load(entry + 2) | tl.load(entry + 3)
                    | tl.load(entry + 4) | master_address) & 15) == 0
        full_end = tl.where(aligned, start + (end - start) // BLOCK * BLOCK, start)
        for off in range(start, full_end, BLOCK):
            off = tl.multiple_of(off, BLOCK)
            _adam_block(tl.multiple_of(param_ptr, 16), tl.multiple_of(grad_ptr, 16), tl.multiple_of(exp_avg_ptr, 16),
                        tl.multiple_of(exp_avg_sq_ptr, 16), tl.multiple_of(max_exp_avg_sq_ptr, 16),
                        tl.multiple_of(master_ptr, 16), off, end, amsgrad, has_master, grad_scale, clip_coef,
                        grad_sign, decoupled, decay, l2, weight_decay, lerp_small, lerp_weight,
                        lerp_weight_minus_one, beta2_f, one_minus_beta2, bc2_sqrt, eps, neg_step_size, stochastic, key,
                        PARAM_DTYPE, BLOCK, HAS_SCALE, HAS_CLIP, True)
        for off in range(full_end, end, BLOCK):
            _adam_block(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, master_ptr, off, end,
                        amsgrad, has_master, grad_scale, clip_coef, grad_sign, decoupled, decay, l2, weight_decay,
                        lerp_small, lerp_weight, lerp_weight_minus_one, beta2_f, one_minus_beta2, bc2_sqrt, eps,
                        neg_step_size, stochastic, key, PARAM_DTYPE, BLOCK, HAS_SCALE, HAS_CLIP, False)

    _finish(table_ptr, counter_ptr, n_rows, skipped, step_advance_ptr, True, ROW_BLOCK)


@triton.jit
def _sgd_block(param_ptr, grad_ptr, buf_ptr, master_ptr, off, end, read_buf, has_momentum, has_master, fresh,
               grad_scale, clip_coef, grad_sign, has_wd, weight_decay, one_minus_dampening, momentum_f, nesterov,
               neg_lr, PARAM_DTYPE: tl.constexpr, BLOCK: tl.constexpr, HAS_SCALE: tl.constexpr,
               HAS_CLIP: tl.constexpr, FULL: tl.constexpr):
    """sgd_element over the BLOCK elements at `off` (FULL: as in _adam_block)."""
    offs, mask, master_mask, p, g = _block_inputs(param_ptr, grad_ptr, master_ptr, off, end, has_master, grad_scale,
                                                  clip_coef, PARAM_DTYPE, BLOCK, HAS_SCALE, HAS_CLIP, FULL)
    buf_write_mask = _state_mask(has_momentum, offs, off, end, BLOCK, FULL)
    buf = tl.load(buf_ptr + offs, mask=_state_mask(read_buf, offs, off, end, BLOCK, FULL))

    # sgd_element, operation for operation.
    g = g * grad_sign
    g = tl.where(has_wd, tl.fma(p, weight_decay, g), g)  # grad.add(param, alpha=weight_decay)
    buf = tl.where(fresh, g, tl.fma(g, one_minus_dampening, buf * momentum_f))
    g = tl.where(has_momentum, tl.where(nesterov, tl.fma(buf, momentum_f, g), buf), g)
    p = tl.fma(g, neg_lr, p)  # param.add_(grad, alpha=-lr)

    _store_param(param_ptr, master_ptr, offs, p, mask, master_mask, False, tl.full([], 0, tl.uint32), PARAM_DTYPE)
    tl.store(buf_ptr + offs, buf, mask=buf_write_mask)


@triton.jit
def sgd_kernel(table_ptr, chunks_ptr, hyper_ptr, counter_ptr, n_rows, n_chunks, schedule_ptr, segments,
               schedule_step_ptr, grad_scale_ptr, found_inf_ptr, clip_coef_ptr, step_advance_ptr, seed_lo, seed_hi,
               PARAM_DTYPE: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
               ROW_BLOCK: tl.constexpr, HAS_SCHEDULE: tl.constexpr, HAS_SCALE: tl.constexpr,
               HAS_FOUND_INF: tl.constexpr, HAS_CLIP: tl.constexpr):
    """SGD (momentum, dampening, Nesterov) over every chunk of the bucket; see the module docstring."""
    grad_scale, clip_coef, skipped = _step_inputs(grad_scale_ptr, found_inf_ptr, clip_coef_ptr, HAS_SCALE,
                                                  HAS_FOUND_INF, HAS_CLIP)
    for c in range(tl.program_id(0), tl.where(skipped, 0, n_chunks), tl.num_programs(0)):
        row = tl.load(chunks_ptr + 2 * c)
        start = tl.load(chunks_ptr + 2 * c + 1)
        entry = table_ptr + row * _W
        group = tl.load(entry + 7)
        h = hyper_ptr + group * 8
        # sgd_coeffs, the schedule first (as in adam_kernel).
        lr = tl.load(h + 0)
        momentum = tl.load(h + 5)
        if HAS_SCHEDULE:
            lr, momentum = _scheduled(lr, momentum, schedule_ptr, segments, schedule_step_ptr, group,
                                      tl.load(h + 7).to(tl.int32))
        wd = tl.load(h + 4)
        param_ptr = tl.load(entry + 0).to(tl.pointer_type(PARAM_DTYPE))
        grad_ptr = tl.load(entry + 1).to(tl.pointer_type(PARAM_DTYPE))
        buf_ptr = tl.load(entry + 2).to(tl.pointer_type(tl.float32))
        fresh_flag = tl.load(entry + 5)
        fresh = fresh_flag != 0
        numel = tl.load(entry + 6)
        master_address = tl.load(entry + 8)
        master_ptr = master_address.to(tl.pointer_type(tl.float32))
        has_master = master_address != 0
        flags = tl.load(h + 7).to(tl.int32)
        neg_lr = (lr * -1.0).to(tl.float32)
        weight_decay = wd.to(tl.float32)
        momentum_f = momentum.to(tl.float32)
        one_minus_dampening = (1.0 - tl.load(h + 6)).to(tl.float32)
        grad_sign = tl.where((flags & _MAXIMIZE) != 0, -1.0, 1.0)
        nesterov = (flags & _NESTEROV) != 0
        has_wd = wd != 0.0
        has_momentum = momentum != 0.0

        end = tl.minimum(start + CHUNK, numel)
        read_buf = has_momentum & (fresh_flag == 0)  # the buffer is read unless fresh, written with momentum
        # Vector path for the full blocks of aligned tensors, as in adam_kernel.
        aligned = ((tl.load(entry + 0) | tl.load(entry + 1) | tl.load(entry + 2) | master_address) & 15) == 0
        full_end = tl.where(aligned, start + (end - start) // BLOCK * BLOCK, start)
        for off in range(start, full_end, BLOCK):
            off = tl.multiple_of(off, BLOCK)
            _sgd_block(tl.multiple_of(param_ptr, 16), tl.multiple_of(grad_ptr, 16), tl.multiple_of(buf_ptr, 16),
                       tl.multiple_of(master_ptr, 16), off, end, read_buf, has_momentum, has_master, fresh,
                       grad_scale, clip_coef, grad_sign, has_wd, weight_decay, one_minus_dampening, momentum_f,
                       nesterov, neg_lr, PARAM_DTYPE, BLOCK, HAS_SCALE, HAS_CLIP, True)
        for off in range(full_end, end, BLOCK):
            _sgd_block(param_ptr, grad_ptr, buf_ptr, master_ptr, off, end, read_buf, has_momentum, has_master, fresh,
                       grad_scale, clip_coef, grad_sign, has_wd, weight_decay, one_minus_dampening, momentum_f,
                       nesterov, neg_lr, PARAM_DTYPE, BLOCK, HAS_SCALE, HAS_CLIP, False)

    _finish(table_ptr, counter_ptr, n_rows, skipped, step_advance_ptr, False, ROW_BLOCK)


def _check_schedule(schedule, schedule_step, hyper):
    """effective_hyper's checks (optim_cpu.cpp), on the hyper-parameter table's device."""
    if schedule is None:
        return
    if schedule_step is None:
        raise ValueError("a schedule needs its step (schedule_step)")
    if (schedule.dtype != torch.float64 or schedule.dim() != 3 or schedule.shape[0] != hyper.shape[0]
            or schedule.shape[2] != _SCHEDULE_COLUMNS or not schedule.is_contiguous()
            or schedule.device != hyper.device):
        raise ValueError(f"schedule must be a contiguous float64 tensor [groups, segments, {_SCHEDULE_COLUMNS}] "
                         f"with one program per hyper row, on {hyper.device}; got {schedule.dtype} "
                         f"{list(schedule.shape)} on {schedule.device}")
    if schedule_step.dtype != torch.float64 or schedule_step.numel() != 1 or schedule_step.device != hyper.device:
        raise ValueError(f"schedule_step must be a one-element float64 tensor on {hyper.device}")


def _seed_halves(seed: int) -> tuple[int, int]:
    """The 64-bit seed as two int32 arguments (the kernels bitcast them to uint32): a Python int of 2**31 or more
    would be typed int64 by Triton and hashed in 64-bit arithmetic."""
    def signed(x):
        return x - (1 << 32) if x >= 1 << 31 else x

    return signed(seed & 0xFFFFFFFF), signed((seed >> 32) & 0xFFFFFFFF)


def _check_step_scalar(t, name, dtype, device):
    if t is not None and (t.dtype != dtype or t.numel() != 1 or t.device != device):
        raise ValueError(f"{name} must be a one-element {dtype} tensor on {device}, got {t.dtype} "
                         f"{list(t.shape)} on {t.device}")


def _launch(kernel, table, chunks, hyper, counter, param_dtype, num_programs, schedule, schedule_step, BLOCK, CHUNK,
            num_warps, grad_scale=None, found_inf=None, clip_coef=None, step_advance=None, sr_seed=0):
    if param_dtype not in _TL_DTYPES:
        raise ValueError(f"parameters must be float32, bfloat16 or float16, got {param_dtype}")
    if BLOCK <= 0 or BLOCK & (BLOCK - 1) or CHUNK % BLOCK:
        raise ValueError(f"BLOCK must be a power of two dividing CHUNK, got BLOCK={BLOCK}, CHUNK={CHUNK}")
    if table.dim() != 2 or table.shape[1] != TABLE_COLUMNS:
        raise ValueError(f"the address table must be int64 [n, {TABLE_COLUMNS}], got {list(table.shape)}")
    _check_schedule(schedule, schedule_step, hyper)
    for t, name in ((grad_scale, "grad_scale"), (found_inf, "found_inf"), (clip_coef, "clip_coef")):
        _check_step_scalar(t, name, torch.float32, hyper.device)
    _check_step_scalar(step_advance, "step_advance", torch.float64, hyper.device)
    n_rows, n_chunks = table.shape[0], chunks.shape[0]
    if n_rows == 0:
        return
    if step_advance is None:
        step_advance = torch.empty(1, dtype=torch.float64, device=hyper.device)
    # At least one program even without chunks (a bucket of empty tensors): the steps must still advance.
    grid = max(1, min(num_programs, n_chunks))
    specialization = (kernel.fn.__name__, param_dtype, schedule is None, grad_scale is None, found_inf is None,
                      clip_coef is None, BLOCK, CHUNK, num_warps, hyper.device)
    cap = _RESIDENT_PROGRAMS.get(specialization)
    if cap is not None:
        grid = min(grid, cap)
    compiled = kernel[(grid,)](
        table, chunks, hyper, counter, n_rows, n_chunks,
        schedule, 0 if schedule is None else schedule.shape[1], schedule_step,
        grad_scale, found_inf, clip_coef, step_advance, *_seed_halves(sr_seed),
        PARAM_DTYPE=_TL_DTYPES[param_dtype], BLOCK=BLOCK, CHUNK=CHUNK, ROW_BLOCK=_ROW_BLOCK,
        HAS_SCHEDULE=schedule is not None, HAS_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
        HAS_CLIP=clip_coef is not None,
        num_warps=num_warps,
        # optim_math.h rounds a multiply-add once only where it says so (the tl.fma calls); no other may fuse.
        enable_fp_fusion=False,
    )
    if cap is None and hyper.device.type == "cuda":
        _RESIDENT_PROGRAMS[specialization] = resident_programs(compiled, hyper.device)


#: Persistent programs that a specialization's compiled kernel keeps resident on the whole device, by
#: (kernel, dtype, optional inputs, BLOCK, CHUNK, num_warps, device): found at its first launch.
_RESIDENT_PROGRAMS: dict = {}


def programs_per_sm(regs: int, num_warps: int, shared: int, regs_per_sm: int = 65536, max_warps: int = 64,
                    shared_per_sm: int = 227 * 1024, max_blocks: int = 32) -> int:
    """Programs of `num_warps` warps that fit on one SM at once: registers (allocated per warp in units of 256),
    warps, shared memory, block slots (bench/kernel_resources.py tabulates it per kernel)."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = regs_per_sm // max(1, per_warp * num_warps)
    by_shared = shared_per_sm // shared if shared else max_blocks
    return max(1, min(by_regs, max_warps // num_warps, by_shared, max_blocks))


def resident_programs(compiled, device: torch.device) -> int:
    """The persistent grid for a compiled kernel on `device`: the programs that fit on every SM at once. A
    launcher's request beyond it (4 per SM) would only queue a second wave of programs, which start late and
    finish their round-robin chunks last."""
    props = torch.cuda.get_device_properties(device)
    fit = programs_per_sm(compiled.n_regs, compiled.metadata.num_warps, compiled.metadata.shared,
                          getattr(props, "regs_per_multiprocessor", 65536),
                          props.max_threads_per_multi_processor // 32,
                          getattr(props, "shared_memory_per_multiprocessor", 227 * 1024))
    return fit * props.multi_processor_count


def launch_adam(table: torch.Tensor, chunks: torch.Tensor, hyper: torch.Tensor, counter: torch.Tensor,
                param_dtype: torch.dtype, num_programs: int, *, schedule: torch.Tensor | None = None,
                schedule_step: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None,
                found_inf: torch.Tensor | None = None, clip_coef: torch.Tensor | None = None,
                step_advance: torch.Tensor | None = None, sr_seed: int = 0, BLOCK: int = DEFAULT_BLOCK,
                CHUNK: int = DEFAULT_CHUNK, num_warps: int = DEFAULT_NUM_WARPS) -> None:
    """One Adam/AdamW step of a bucket, steps included, in one launch.

    table: int64 [n, TABLE_COLUMNS] address table; chunks: int64 [n_chunks, 2] from ``build_chunks(numels,
    CHUNK)``; hyper: float64 [groups, 8]; counter: int32 [1], zero before the first launch (each launch leaves it
    zero). All on the parameters' device. num_programs: persistent programs to run (e.g. min(n_chunks, 4 * SMs)).
    schedule (optional): float64 [groups, segments, 16] schedule programs (schedule_math.h), contiguous, with
    schedule_step: float64 [1], the scheduler's step; the lr and beta1 a group's program sets at that step replace
    the table's. grad_scale / found_inf / clip_coef (optional float32 [1]) and step_advance (optional float64 [1],
    written): see the module docstring; sr_seed: the seed of stochastic rounding.
    """
    _launch(adam_kernel, table, chunks, hyper, counter, param_dtype, num_programs, schedule, schedule_step, BLOCK,
            CHUNK, num_warps, grad_scale, found_inf, clip_coef, step_advance, sr_seed)


def launch_sgd(table: torch.Tensor, chunks: torch.Tensor, hyper: torch.Tensor, counter: torch.Tensor,
               param_dtype: torch.dtype, num_programs: int, *, schedule: torch.Tensor | None = None,
               schedule_step: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None,
               found_inf: torch.Tensor | None = None, clip_coef: torch.Tensor | None = None,
               step_advance: torch.Tensor | None = None, sr_seed: int = 0, BLOCK: int = DEFAULT_BLOCK,
               CHUNK: int = DEFAULT_CHUNK, num_warps: int = DEFAULT_NUM_WARPS) -> None:
    """One SGD step of a bucket in one launch; clears the table's fresh-buffer flags (column 5) afterwards
    (unless found_inf skipped the step).

    Arguments as for ``launch_adam``; a schedule sets lr and momentum; SGD never rounds stochastically.
    """
    _launch(sgd_kernel, table, chunks, hyper, counter, param_dtype, num_programs, schedule, schedule_step, BLOCK,
            CHUNK, num_warps, grad_scale, found_inf, clip_coef, step_advance, 0)


@triton.jit
def _norm_terms(a, norm_type, NORM: tl.constexpr):
    """|g|^p of float32 magnitudes `a`, as float64 (NORM_P raises in float64)."""
    if NORM == 0:
        return (a * a).to(tl.float64)
    elif NORM == 1:
        return a.to(tl.float64)
    else:
        return tl.exp2(tl.log2(a.to(tl.float64)) * norm_type)


@triton.jit
def _nan_max(a, b):
    return tl.where((a != a) | (a > b), a, b)


@triton.jit
def grad_norm_kernel(table_ptr, chunks_ptr, partials_ptr, slot_offset, n_slots, counter_ptr, out_ptr,
                     grad_scale_ptr, n_chunks, norm_type, max_norm, PARAM_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                     CHUNK: tl.constexpr, NORM: tl.constexpr, HAS_SCALE: tl.constexpr, FINALIZE: tl.constexpr,
                     SLOT_BLOCK: tl.constexpr):
    """The norm pass of a fused clip over one bucket; see the module docstring."""
    grad_scale = 1.0
    if HAS_SCALE:
        grad_scale = tl.load(grad_scale_ptr)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for c in range(tl.program_id(0), n_chunks, tl.num_programs(0)):
        row = tl.load(chunks_ptr + 2 * c)
        start = tl.load(chunks_ptr + 2 * c + 1)
        entry = table_ptr + row * _W
        grad_ptr = tl.load(entry + 1).to(tl.pointer_type(PARAM_DTYPE))
        end = tl.minimum(start + CHUNK, tl.load(entry + 6))
        for off in range(start, end, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            g = tl.load(grad_ptr + offs, mask=offs < end, other=0.0).to(tl.float32)
            if HAS_SCALE:
                g = tl.div_rn(g, grad_scale)
            a = tl.abs(g)
            if NORM == 2:
                acc = _nan_max(acc, a.to(tl.float64))
            else:
                acc = acc + _norm_terms(a, norm_type, NORM)
    if NORM == 2:
        partial = tl.reduce(acc, 0, _nan_max)
    else:
        partial = tl.sum(acc, 0)
    tl.store(partials_ptr + slot_offset + tl.program_id(0), partial)
    if FINALIZE:
        tl.debug_barrier()
        ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
        if ticket == tl.num_programs(0) - 1:
            total = tl.zeros([SLOT_BLOCK], dtype=tl.float64)
            for s0 in range(0, n_slots, SLOT_BLOCK):
                slots = s0 + tl.arange(0, SLOT_BLOCK)
                value = tl.load(partials_ptr + slots, mask=slots < n_slots, other=0.0)
                if NORM == 2:
                    total = _nan_max(total, value)
                else:
                    total = total + value
            if NORM == 2:
                accumulated = tl.reduce(total, 0, _nan_max)
                norm = accumulated.to(tl.float32)
            else:
                accumulated = tl.sum(total, 0)
                if NORM == 0:
                    norm = tl.sqrt(accumulated).to(tl.float32)  # float64 sqrt is correctly rounded
                elif NORM == 1:
                    norm = accumulated.to(tl.float32)
                else:
                    norm = tl.exp2(tl.log2(accumulated) / norm_type).to(tl.float32)
            # optim_math.h clip_coefficient: reciprocal(total + 1e-6) * max_norm, clamp(max=1) keeping NaN.
            coef = tl.div_rn(1.0, norm + 1e-6) * max_norm  # max_norm: a float32 argument
            coef = tl.where(coef > 1.0, 1.0, coef)
            tl.store(out_ptr, norm)
            tl.store(out_ptr + 1, coef)
            tl.store(counter_ptr, 0)


def norm_kind(norm_type: float) -> int:
    if norm_type == float("inf"):
        return NORM_INF
    if norm_type == 2.0:
        return NORM_TWO
    if norm_type == 1.0:
        return NORM_ONE
    return NORM_P


def launch_grad_norm(table: torch.Tensor, chunks: torch.Tensor, partials: torch.Tensor, slot_offset: int,
                     counter: torch.Tensor, out: torch.Tensor, grad_dtype: torch.dtype, num_programs: int,
                     norm_type: float, max_norm: float, finalize: bool, *, grad_scale: torch.Tensor | None = None,
                     BLOCK: int = DEFAULT_BLOCK, CHUNK: int = DEFAULT_CHUNK,
                     num_warps: int = DEFAULT_NUM_WARPS) -> int:
    """The norm pass of one bucket: writes its programs' partial norms at ``partials[slot_offset:]`` and returns
    how many slots it used. The launch with ``finalize`` (the last bucket's) combines ``partials[:slot_offset +
    used]`` and writes ``out`` = float32 [total_norm, clip_coef]; counter: int32 [1], zero, left zero."""
    grid = max(1, min(num_programs, chunks.shape[0]))
    if slot_offset + grid > partials.numel():
        raise ValueError(f"partials holds {partials.numel()} slots, {slot_offset + grid} needed")
    grad_norm_kernel[(grid,)](
        table, chunks, partials, slot_offset, slot_offset + grid, counter, out, grad_scale, chunks.shape[0],
        float(norm_type), float(max_norm), PARAM_DTYPE=_TL_DTYPES[grad_dtype], BLOCK=BLOCK, CHUNK=CHUNK,
        NORM=norm_kind(norm_type), HAS_SCALE=grad_scale is not None, FINALIZE=finalize, SLOT_BLOCK=256,
        num_warps=num_warps, enable_fp_fusion=False,
    )
    return grid
