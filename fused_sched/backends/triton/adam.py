"""Adam / AdamW in Triton: the block update, the kernel over a bucket's chunks, its launcher and the custom op
fused_sched::triton_adam_step_."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import _address_table, _check_lists, _launch, _launch_from_lists, _schema_of
from .libm import dd_mul
from .state_format import (
    FORMAT_BFLOAT16,
    FORMAT_BLOCKWISE_8BIT,
    FORMAT_MASK,
    FORMAT_MASTER_REMAINDER,
    QMAP_SIGNED_CODES,
    QMAP_SIGNED_THRESHOLDS,
    QMAP_UNSIGNED_CODES,
    QMAP_UNSIGNED_THRESHOLDS,
    STATE_ROUND_NEAREST,
    STATE_SALT0,
    STATE_SALT1,
    STATE_SALT2,
    _dequantize,
    _formatted_inputs,
    _state_key,
    _store_bf16_state,
    _store_formatted_param,
    _store_quantized,
    _widen_bf16,
)
from .step_common import (
    _AMSGRAD,
    _DECOUPLED_WEIGHT_DECAY,
    _MAXIMIZE,
    _STOCHASTIC_ROUNDING,
    _W,
    DEFAULT_BLOCK,
    DEFAULT_CHUNK,
    DEFAULT_NUM_WARPS,
    _block_inputs,
    _finish,
    _rounding_key,
    _scheduled,
    _state_mask,
    _step_inputs,
    _store_param,
)


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
def _adam_element(p, g, m, v, vmax, amsgrad, grad_sign, decoupled, decay, l2, weight_decay, lerp_small, lerp_weight,
                  lerp_weight_minus_one, beta2_f, one_minus_beta2, bc2_sqrt, eps, neg_step_size):
    """adam_element, operation for operation, on float32 values: (param, exp_avg, exp_avg_sq, max_exp_avg_sq)."""
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
    return p, m, v, vmax


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
    p, m, v, vmax = _adam_element(p, g, m, v, vmax, amsgrad, grad_sign, decoupled, decay, l2, weight_decay,
                                  lerp_small, lerp_weight, lerp_weight_minus_one, beta2_f, one_minus_beta2, bc2_sqrt,
                                  eps, neg_step_size)
    _store_param(param_ptr, master_ptr, offs, p, mask, master_mask, stochastic, key, PARAM_DTYPE)
    tl.store(exp_avg_ptr + offs, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
    tl.store(max_exp_avg_sq_ptr + offs, vmax, mask=vmax_mask)


@triton.jit
def _adam_block_formatted(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, master_ptr,
                          remainder_ptr, absmax0_ptr, absmax1_ptr, qmap_ptr, off, end, amsgrad, has_master,
                          has_remainder, grad_scale, clip_coef, grad_sign, decoupled, decay, l2, weight_decay,
                          lerp_small, lerp_weight, lerp_weight_minus_one, beta2_f, one_minus_beta2, bc2_sqrt, eps,
                          neg_step_size, stochastic, key, nearest, PARAM_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                          QBLOCK: tl.constexpr, MOMENTS: tl.constexpr, HAS_SCALE: tl.constexpr,
                          HAS_CLIP: tl.constexpr, FULL: tl.constexpr):
    """_adam_block of a row with low-memory states (docs/state_formats.md): the moments in format MOMENTS
    widened to float32, adam_element unchanged, the results narrowed; the param joined from / split into its
    int16 remainder where the row has one."""
    offs, mask, master_mask, p, g = _formatted_inputs(param_ptr, grad_ptr, master_ptr, remainder_ptr, off, end,
                                                      has_master, has_remainder, grad_scale, clip_coef, PARAM_DTYPE,
                                                      BLOCK, HAS_SCALE, HAS_CLIP, FULL)
    vmax_mask = _state_mask(amsgrad, offs, off, end, BLOCK, FULL)
    if MOMENTS == FORMAT_BLOCKWISE_8BIT:  # never with amsgrad
        m = _dequantize(exp_avg_ptr, absmax0_ptr, qmap_ptr, offs, mask, QMAP_SIGNED_CODES, QBLOCK)
        v = _dequantize(exp_avg_sq_ptr, absmax1_ptr, qmap_ptr, offs, mask, QMAP_UNSIGNED_CODES, QBLOCK)
        vmax = v
    elif MOMENTS == FORMAT_BFLOAT16:
        m = _widen_bf16(tl.load(exp_avg_ptr + offs, mask=mask))
        v = _widen_bf16(tl.load(exp_avg_sq_ptr + offs, mask=mask))
        vmax = _widen_bf16(tl.load(max_exp_avg_sq_ptr + offs, mask=vmax_mask))
    else:
        m = tl.load(exp_avg_ptr + offs, mask=mask)
        v = tl.load(exp_avg_sq_ptr + offs, mask=mask)
        vmax = tl.load(max_exp_avg_sq_ptr + offs, mask=vmax_mask)
    p, m, v, vmax = _adam_element(p, g, m, v, vmax, amsgrad, grad_sign, decoupled, decay, l2, weight_decay,
                                  lerp_small, lerp_weight, lerp_weight_minus_one, beta2_f, one_minus_beta2, bc2_sqrt,
                                  eps, neg_step_size)
    _store_formatted_param(param_ptr, master_ptr, remainder_ptr, offs, off, end, p, mask, master_mask, has_remainder,
                           stochastic, key, PARAM_DTYPE, BLOCK, FULL)
    if MOMENTS == FORMAT_BLOCKWISE_8BIT:
        write = tl.full([], 1, tl.int1)
        _store_quantized(exp_avg_ptr, absmax0_ptr, qmap_ptr, offs, off, end, m, mask, write, QMAP_SIGNED_THRESHOLDS,
                         BLOCK, QBLOCK, FULL)
        _store_quantized(exp_avg_sq_ptr, absmax1_ptr, qmap_ptr, offs, off, end, v, mask, write,
                         QMAP_UNSIGNED_THRESHOLDS, BLOCK, QBLOCK, FULL)
    elif MOMENTS == FORMAT_BFLOAT16:
        _store_bf16_state(exp_avg_ptr, offs, m, mask, nearest, _state_key(key, STATE_SALT0))
        _store_bf16_state(exp_avg_sq_ptr, offs, v, mask, nearest, _state_key(key, STATE_SALT1))
        _store_bf16_state(max_exp_avg_sq_ptr, offs, vmax, vmax_mask, nearest, _state_key(key, STATE_SALT2))
    else:
        tl.store(exp_avg_ptr + offs, m, mask=mask)
        tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
        tl.store(max_exp_avg_sq_ptr + offs, vmax, mask=vmax_mask)


@triton.jit
def _adam_formatted_chunk(entry, fmt, start, end, full_end, amsgrad, master_address, grad_scale, clip_coef,
                          grad_sign, decoupled, decay, l2, weight_decay, lerp_small, lerp_weight,
                          lerp_weight_minus_one, beta2_f, one_minus_beta2, bc2_sqrt, eps, neg_step_size, stochastic,
                          key, flags, PARAM_DTYPE: tl.constexpr, BLOCK: tl.constexpr, QBLOCK: tl.constexpr,
                          MOMENTS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr):
    """The blocks of one chunk of a formatted row (kColFormat != 0) whose moments are in format MOMENTS: the
    vector path up to full_end, the masked path after it, as in adam_kernel."""
    # Half blocks (2 elements per thread at BLOCK 512 and 4 warps, where the float32 path moves 4): the formats'
    # work (dequantization, block absmax, code search, rounding, remainder split) then fits the registers of the
    # float32 path; with whole blocks the Adam kernels of bfloat16 params spilled on sm_90.
    HALF: tl.constexpr = BLOCK // 2
    if MOMENTS == FORMAT_BLOCKWISE_8BIT:
        state_dtype: tl.constexpr = tl.uint8
    elif MOMENTS == FORMAT_BFLOAT16:
        state_dtype: tl.constexpr = tl.bfloat16
    else:
        state_dtype: tl.constexpr = tl.float32
    param_ptr = tl.load(entry + 0).to(tl.pointer_type(PARAM_DTYPE))
    grad_ptr = tl.load(entry + 1).to(tl.pointer_type(PARAM_DTYPE))
    exp_avg_ptr = tl.load(entry + 2).to(tl.pointer_type(state_dtype))
    exp_avg_sq_ptr = tl.load(entry + 3).to(tl.pointer_type(state_dtype))
    max_exp_avg_sq_ptr = tl.load(entry + 4).to(tl.pointer_type(state_dtype))
    master_ptr = master_address.to(tl.pointer_type(tl.float32))
    remainder_ptr = master_address.to(tl.pointer_type(tl.int16))
    absmax0_ptr = tl.load(entry + 11).to(tl.pointer_type(tl.float32))
    absmax1_ptr = tl.load(entry + 12).to(tl.pointer_type(tl.float32))
    qmap_ptr = tl.load(entry + 13).to(tl.pointer_type(tl.float32))
    has_remainder = ((fmt & FORMAT_MASTER_REMAINDER) != 0) & (master_address != 0)
    has_master = (master_address != 0) & ((fmt & FORMAT_MASTER_REMAINDER) == 0)
    nearest = (flags & STATE_ROUND_NEAREST) != 0
    for off in range(start, full_end, HALF):
        off = tl.multiple_of(off, HALF)
        _adam_block_formatted(tl.multiple_of(param_ptr, 16), tl.multiple_of(grad_ptr, 16),
                              tl.multiple_of(exp_avg_ptr, 16), tl.multiple_of(exp_avg_sq_ptr, 16),
                              tl.multiple_of(max_exp_avg_sq_ptr, 16), tl.multiple_of(master_ptr, 16),
                              tl.multiple_of(remainder_ptr, 16), absmax0_ptr, absmax1_ptr, qmap_ptr, off, end,
                              amsgrad, has_master, has_remainder, grad_scale, clip_coef, grad_sign, decoupled, decay,
                              l2, weight_decay, lerp_small, lerp_weight, lerp_weight_minus_one, beta2_f,
                              one_minus_beta2, bc2_sqrt, eps, neg_step_size, stochastic, key, nearest, PARAM_DTYPE,
                              HALF, QBLOCK, MOMENTS, HAS_SCALE, HAS_CLIP, True)
    for off in range(full_end, end, HALF):
        _adam_block_formatted(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, master_ptr,
                              remainder_ptr, absmax0_ptr, absmax1_ptr, qmap_ptr, off, end, amsgrad, has_master,
                              has_remainder, grad_scale, clip_coef, grad_sign, decoupled, decay, l2, weight_decay,
                              lerp_small, lerp_weight, lerp_weight_minus_one, beta2_f, one_minus_beta2, bc2_sqrt, eps,
                              neg_step_size, stochastic, key, nearest, PARAM_DTYPE, HALF, QBLOCK, MOMENTS, HAS_SCALE,
                              HAS_CLIP, False)


@triton.jit
def adam_kernel(table_ptr, chunks_ptr, hyper_ptr, counter_ptr, n_rows, n_chunks, schedule_ptr, segments,
                schedule_step_ptr, grad_scale_ptr, found_inf_ptr, clip_coef_ptr, step_advance_ptr, seed_lo, seed_hi,
                PARAM_DTYPE: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr, QBLOCK: tl.constexpr,
                ROW_BLOCK: tl.constexpr, HAS_SCHEDULE: tl.constexpr, HAS_SCALE: tl.constexpr,
                HAS_FOUND_INF: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_FORMATS: tl.constexpr):
    """Adam / AdamW over every chunk of the bucket; see the module docstring for the tables. A row whose states
    have a low-memory format (kColFormat != 0) takes _adam_formatted_chunk; QBLOCK: the 8-bit rows' block size."""
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
        # HAS_FORMATS (constexpr): whether a row of the bucket has a low-memory format. Without, the kernel is
        # the float32 one alone (its registers and code unchanged by the formatted path).
        # The float32 loops are written out in both branches on purpose: moved into a jit helper, the bfloat16 /
        # float16 kernels lost their 128-bit loads (bench.kernel_resources, triton 3.6 and 3.9, sm_90).
        if HAS_FORMATS:
            fmt = tl.load(entry + 10)
            if fmt == 0:  # float32 states
                for off in range(start, full_end, BLOCK):
                    off = tl.multiple_of(off, BLOCK)
                    _adam_block(tl.multiple_of(param_ptr, 16), tl.multiple_of(grad_ptr, 16),
                                tl.multiple_of(exp_avg_ptr, 16), tl.multiple_of(exp_avg_sq_ptr, 16),
                                tl.multiple_of(max_exp_avg_sq_ptr, 16), tl.multiple_of(master_ptr, 16), off, end,
                                amsgrad, has_master, grad_scale, clip_coef, grad_sign, decoupled, decay, l2,
                                weight_decay, lerp_small, lerp_weight, lerp_weight_minus_one, beta2_f, one_minus_beta2,
                                bc2_sqrt, eps, neg_step_size, stochastic, key, PARAM_DTYPE, BLOCK, HAS_SCALE, HAS_CLIP,
                                True)
                for off in range(full_end, end, BLOCK):
                    _adam_block(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, master_ptr, off,
                                end, amsgrad, has_master, grad_scale, clip_coef, grad_sign, decoupled, decay, l2,
                                weight_decay, lerp_small, lerp_weight, lerp_weight_minus_one, beta2_f, one_minus_beta2,
                                bc2_sqrt, eps, neg_step_size, stochastic, key, PARAM_DTYPE, BLOCK, HAS_SCALE, HAS_CLIP,
                                False)
            else:
                moments = fmt & FORMAT_MASK
                if moments == FORMAT_BLOCKWISE_8BIT:
                    _adam_formatted_chunk(entry, fmt, start, end, full_end, amsgrad, master_address, grad_scale,
                                          clip_coef, grad_sign, decoupled, decay, l2, weight_decay, lerp_small,
                                          lerp_weight, lerp_weight_minus_one, beta2_f, one_minus_beta2, bc2_sqrt,
                                          eps, neg_step_size, stochastic, key, flags, PARAM_DTYPE, BLOCK, QBLOCK,
                                          FORMAT_BLOCKWISE_8BIT, HAS_SCALE, HAS_CLIP)
                elif moments == FORMAT_BFLOAT16:
                    _adam_formatted_chunk(entry, fmt, start, end, full_end, amsgrad, master_address, grad_scale,
                                          clip_coef, grad_sign, decoupled, decay, l2, weight_decay, lerp_small,
                                          lerp_weight, lerp_weight_minus_one, beta2_f, one_minus_beta2, bc2_sqrt,
                                          eps, neg_step_size, stochastic, key, flags, PARAM_DTYPE, BLOCK, QBLOCK,
                                          FORMAT_BFLOAT16, HAS_SCALE, HAS_CLIP)
                else:  # float32 moments, the master in a remainder
                    _adam_formatted_chunk(entry, fmt, start, end, full_end, amsgrad, master_address, grad_scale,
                                          clip_coef, grad_sign, decoupled, decay, l2, weight_decay, lerp_small,
                                          lerp_weight, lerp_weight_minus_one, beta2_f, one_minus_beta2, bc2_sqrt,
                                          eps, neg_step_size, stochastic, key, flags, PARAM_DTYPE, BLOCK, QBLOCK, 0,
                                          HAS_SCALE, HAS_CLIP)
        else:
            for off in range(start, full_end, BLOCK):
                off = tl.multiple_of(off, BLOCK)
                _adam_block(tl.multiple_of(param_ptr, 16), tl.multiple_of(grad_ptr, 16),
                            tl.multiple_of(exp_avg_ptr, 16), tl.multiple_of(exp_avg_sq_ptr, 16),
                            tl.multiple_of(max_exp_avg_sq_ptr, 16), tl.multiple_of(master_ptr, 16), off, end, amsgrad,
                            has_master, grad_scale, clip_coef, grad_sign, decoupled, decay, l2, weight_decay,
                            lerp_small, lerp_weight, lerp_weight_minus_one, beta2_f, one_minus_beta2, bc2_sqrt, eps,
                            neg_step_size, stochastic, key, PARAM_DTYPE, BLOCK, HAS_SCALE, HAS_CLIP, True)
            for off in range(full_end, end, BLOCK):
                _adam_block(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, master_ptr, off,
                            end, amsgrad, has_master, grad_scale, clip_coef, grad_sign, decoupled, decay, l2,
                            weight_decay, lerp_small, lerp_weight, lerp_weight_minus_one, beta2_f, one_minus_beta2,
                            bc2_sqrt, eps, neg_step_size, stochastic, key, PARAM_DTYPE, BLOCK, HAS_SCALE, HAS_CLIP,
                            False)

    _finish(table_ptr, counter_ptr, n_rows, skipped, step_advance_ptr, True, False, ROW_BLOCK)


def launch_adam(table: torch.Tensor, chunks: torch.Tensor, hyper: torch.Tensor, counter: torch.Tensor,
                param_dtype: torch.dtype, num_programs: int, *, schedule: torch.Tensor | None = None,
                schedule_step: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None,
                found_inf: torch.Tensor | None = None, clip_coef: torch.Tensor | None = None,
                step_advance: torch.Tensor | None = None, sr_seed: int = 0, BLOCK: int = DEFAULT_BLOCK,
                CHUNK: int = DEFAULT_CHUNK, num_warps: int = DEFAULT_NUM_WARPS, QBLOCK: int | None = None,
                HAS_FORMATS: bool = True) -> None:
    """One Adam/AdamW step of a bucket, steps included, in one launch.

    table: int64 [n, TABLE_COLUMNS] address table; chunks: int64 [n_chunks, 2] from ``build_chunks(numels,
    CHUNK)``; hyper: float64 [groups, 8]; counter: int32 [1], zero before the first launch (each launch leaves it
    zero). All on the parameters' device. num_programs: persistent programs to run (e.g. min(n_chunks, 4 * SMs)).
    schedule (optional): float64 [groups, segments, 16] schedule programs (schedule_math.h), contiguous, with
    schedule_step: float64 [1], the scheduler's step; the lr and beta1 a group's program sets at that step replace
    the table's. grad_scale / found_inf / clip_coef (optional float32 [1]) and step_advance (optional float64 [1],
    written): see the module docstring; sr_seed: the seed of stochastic rounding (of the param and of bfloat16
    moments); QBLOCK: the block size of every 8-bit row (docs/state_formats.md; None: 256, or BLOCK // 2 when
    smaller, for tables without 8-bit rows).
    """
    _launch(adam_kernel, table, chunks, hyper, counter, param_dtype, num_programs, schedule, schedule_step, BLOCK,
            CHUNK, num_warps, grad_scale, found_inf, clip_coef, step_advance, sr_seed, QBLOCK, HAS_FORMATS)


# The registered ops run the kernels of the optimizers' eager runner on the arguments of fused_sched::adam_step_ /
# sgd_step_; the optimizers' torch.compile path calls them (fused_sched/optim/_compiled.py).
_ADAM_SCHEMA, _ADAM_WRITES = _schema_of("adam_step_")


@torch.library.custom_op("fused_sched::triton_adam_step_", mutates_args=_ADAM_WRITES, schema=_ADAM_SCHEMA)
def triton_adam_step_(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor],
    hyper: torch.Tensor, group_index: list[int], schedule: torch.Tensor | None = None,
    schedule_step: torch.Tensor | None = None, master_params: list[torch.Tensor] | None = None,
    grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
    clip_coef: torch.Tensor | None = None, step_advance: torch.Tensor | None = None,
    param_ids: list[int] = (), sr_seed: int = 0,
) -> None:
    """Adam / AdamW over one bucket with the Triton kernel; arguments as fused_sched::adam_step_."""
    _check_lists(params, grads, master_params, param_ids)
    table = _address_table(params, grads, [exp_avgs, exp_avg_sqs, max_exp_avg_sqs], steps, group_index,
                           master_params, param_ids)
    _launch_from_lists(launch_adam, params, table, hyper, schedule=schedule, schedule_step=schedule_step,
                       grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef, step_advance=step_advance,
                       sr_seed=sr_seed)


@triton_adam_step_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hyper, group_index, schedule=None,
      schedule_step=None, master_params=None, grad_scale=None, found_inf=None, clip_coef=None, step_advance=None,
      param_ids=(), sr_seed=0) -> None:
    return None
