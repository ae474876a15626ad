"""SGD in Triton: the block update, the kernel over a bucket's chunks, its launcher and the custom op
fused_sched::triton_sgd_step_."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import _address_table, _check_lists, _launch, _launch_from_lists, _schema_of
from .state_format import (
    FORMAT_BFLOAT16,
    FORMAT_BLOCKWISE_8BIT,
    FORMAT_MASK,
    FORMAT_MASTER_REMAINDER,
    QMAP_SIGNED_CODES,
    QMAP_SIGNED_THRESHOLDS,
    STATE_ROUND_NEAREST,
    STATE_SALT0,
    _dequantize,
    _formatted_inputs,
    _state_key,
    _store_bf16_state,
    _store_formatted_param,
    _store_quantized,
    _widen_bf16,
)
from .step_common import (
    _MAXIMIZE,
    _NESTEROV,
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
def _sgd_element(p, g, buf, has_momentum, fresh, grad_sign, has_wd, weight_decay, one_minus_dampening, momentum_f,
                 nesterov, neg_lr):
    """sgd_element, operation for operation, on float32 values: (param, momentum_buffer)."""
    g = g * grad_sign
    g = tl.where(has_wd, tl.fma(p, weight_decay, g), g)  # grad.add(param, alpha=weight_decay)
    buf = tl.where(fresh, g, tl.fma(g, one_minus_dampening, buf * momentum_f))
    g = tl.where(has_momentum, tl.where(nesterov, tl.fma(buf, momentum_f, g), buf), g)
    p = tl.fma(g, neg_lr, p)  # param.add_(grad, alpha=-lr)
    return p, buf


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
    p, buf = _sgd_element(p, g, buf, has_momentum, fresh, grad_sign, has_wd, weight_decay, one_minus_dampening,
                          momentum_f, nesterov, neg_lr)
    _store_param(param_ptr, master_ptr, offs, p, mask, master_mask, False, tl.full([], 0, tl.uint32), PARAM_DTYPE)
    tl.store(buf_ptr + offs, buf, mask=buf_write_mask)


@triton.jit
def _sgd_block_formatted(param_ptr, grad_ptr, buf_ptr, master_ptr, remainder_ptr, absmax_ptr, qmap_ptr, off, end,
                         read_buf, has_momentum, has_master, has_remainder, fresh, grad_scale, clip_coef, grad_sign,
                         has_wd, weight_decay, one_minus_dampening, momentum_f, nesterov, neg_lr, nearest, state_key,
                         PARAM_DTYPE: tl.constexpr, BLOCK: tl.constexpr, QBLOCK: tl.constexpr, MOMENTS: tl.constexpr,
                         HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, FULL: tl.constexpr):
    """_sgd_block of a row with low-memory states (docs/state_formats.md): an 8-bit momentum buffer (MOMENTS 2)
    dequantized or a bfloat16 one (MOMENTS 1) widened, sgd_element unchanged, the buffer narrowed again (8-bit:
    quantized; bfloat16: to nearest even when `nearest`, else stochastically under `state_key`); the param joined
    from / split into its int16 remainder where the row has one. A fresh buffer reads nothing (it is the
    gradient)."""
    offs, mask, master_mask, p, g = _formatted_inputs(param_ptr, grad_ptr, master_ptr, remainder_ptr, off, end,
                                                      has_master, has_remainder, grad_scale, clip_coef, PARAM_DTYPE,
                                                      BLOCK, HAS_SCALE, HAS_CLIP, FULL)
    read_mask = _state_mask(read_buf, offs, off, end, BLOCK, FULL)
    if MOMENTS == FORMAT_BLOCKWISE_8BIT:
        buf = _dequantize(buf_ptr, absmax_ptr, qmap_ptr, offs, read_mask, QMAP_SIGNED_CODES, QBLOCK)
    elif MOMENTS == FORMAT_BFLOAT16:
        buf = _widen_bf16(tl.load(buf_ptr + offs, mask=read_mask))
    else:
        buf = tl.load(buf_ptr + offs, mask=read_mask)
    p, buf = _sgd_element(p, g, buf, has_momentum, fresh, grad_sign, has_wd, weight_decay, one_minus_dampening,
                          momentum_f, nesterov, neg_lr)
    _store_formatted_param(param_ptr, master_ptr, remainder_ptr, offs, off, end, p, mask, master_mask, has_remainder,
                           False, tl.full([], 0, tl.uint32), PARAM_DTYPE, BLOCK, FULL)
    if MOMENTS == FORMAT_BLOCKWISE_8BIT:
        _store_quantized(buf_ptr, absmax_ptr, qmap_ptr, offs, off, end, buf, mask, has_momentum,
                         QMAP_SIGNED_THRESHOLDS, BLOCK, QBLOCK, FULL)
    elif MOMENTS == FORMAT_BFLOAT16:
        _store_bf16_state(buf_ptr, offs, buf, _state_mask(has_momentum, offs, off, end, BLOCK, FULL), nearest,
                          state_key)
    else:
        tl.store(buf_ptr + offs, buf, mask=_state_mask(has_momentum, offs, off, end, BLOCK, FULL))


@triton.jit
def _sgd_formatted_chunk(entry, fmt, start, end, full_end, read_buf, has_momentum, master_address, fresh,
                         grad_scale, clip_coef, grad_sign, has_wd, weight_decay, one_minus_dampening, momentum_f,
                         nesterov, neg_lr, flags, seed_lo, seed_hi, PARAM_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                         QBLOCK: tl.constexpr, MOMENTS: tl.constexpr, HAS_SCALE: tl.constexpr,
                         HAS_CLIP: tl.constexpr):
    """The blocks of one chunk of a formatted row (kColFormat != 0) whose buffer is in format MOMENTS, as in
    sgd_kernel. A bfloat16 buffer rounded stochastically draws its bits under the state key of
    rounding_key(seed, step after its increment, param id), the step being the float32 one column 5 points to."""
    # Half blocks (2 elements per thread at BLOCK 512 and 4 warps, where the float32 path moves 4): the formats'
    # work (dequantization, block absmax, code search, rounding, remainder split) then fits the registers of the
    # float32 path; with whole blocks the Adam kernels of bfloat16 params spilled on sm_90.
    HALF: tl.constexpr = BLOCK // 2
    if MOMENTS == FORMAT_BLOCKWISE_8BIT:
        buf_ptr = tl.load(entry + 2).to(tl.pointer_type(tl.uint8))
    elif MOMENTS == FORMAT_BFLOAT16:
        buf_ptr = tl.load(entry + 2).to(tl.pointer_type(tl.bfloat16))
    else:
        buf_ptr = tl.load(entry + 2).to(tl.pointer_type(tl.float32))
    nearest = (flags & STATE_ROUND_NEAREST) != 0
    if MOMENTS == FORMAT_BFLOAT16:
        step_address = tl.load(entry + 5)
        # Python gives every such row a step; a missing one keys the bits on step 1 (as the CUDA kernel).
        step = tl.load(step_address.to(tl.pointer_type(tl.float32)), mask=step_address != 0, other=0.0)
        state_key = _state_key(_rounding_key(seed_lo, seed_hi, (step + 1.0).to(tl.uint32),
                                             tl.load(entry + 9).to(tl.uint32)), STATE_SALT0)
    else:
        state_key = tl.full([], 0, tl.uint32)
    param_ptr = tl.load(entry + 0).to(tl.pointer_type(PARAM_DTYPE))
    grad_ptr = tl.load(entry + 1).to(tl.pointer_type(PARAM_DTYPE))
    master_ptr = master_address.to(tl.pointer_type(tl.float32))
    remainder_ptr = master_address.to(tl.pointer_type(tl.int16))
    absmax_ptr = tl.load(entry + 11).to(tl.pointer_type(tl.float32))
    qmap_ptr = tl.load(entry + 13).to(tl.pointer_type(tl.float32))
    has_remainder = ((fmt & FORMAT_MASTER_REMAINDER) != 0) & (master_address != 0)
    has_master = (master_address != 0) & ((fmt & FORMAT_MASTER_REMAINDER) == 0)
    for off in range(start, full_end, HALF):
        off = tl.multiple_of(off, HALF)
        _sgd_block_formatted(tl.multiple_of(param_ptr, 16), tl.multiple_of(grad_ptr, 16), tl.multiple_of(buf_ptr, 16),
                             tl.multiple_of(master_ptr, 16), tl.multiple_of(remainder_ptr, 16), absmax_ptr, qmap_ptr,
                             off, end, read_buf, has_momentum, has_master, has_remainder, fresh, grad_scale,
                             clip_coef, grad_sign, has_wd, weight_decay, one_minus_dampening, momentum_f, nesterov,
                             neg_lr, nearest, state_key, PARAM_DTYPE, HALF, QBLOCK, MOMENTS, HAS_SCALE, HAS_CLIP,
                             True)
    for off in range(full_end, end, HALF):
        _sgd_block_formatted(param_ptr, grad_ptr, buf_ptr, master_ptr, remainder_ptr, absmax_ptr, qmap_ptr, off, end,
                             read_buf, has_momentum, has_master, has_remainder, fresh, grad_scale, clip_coef,
                             grad_sign, has_wd, weight_decay, one_minus_dampening, momentum_f, nesterov, neg_lr,
                             nearest, state_key, PARAM_DTYPE, HALF, QBLOCK, MOMENTS, HAS_SCALE, HAS_CLIP, False)


@triton.jit
def sgd_kernel(table_ptr, chunks_ptr, hyper_ptr, counter_ptr, n_rows, n_chunks, schedule_ptr, segments,
               schedule_step_ptr, grad_scale_ptr, found_inf_ptr, clip_coef_ptr, step_advance_ptr, seed_lo, seed_hi,
               PARAM_DTYPE: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr, QBLOCK: tl.constexpr,
               ROW_BLOCK: tl.constexpr, HAS_SCHEDULE: tl.constexpr, HAS_SCALE: tl.constexpr,
               HAS_FOUND_INF: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_FORMATS: tl.constexpr):
    """SGD (momentum, dampening, Nesterov) over every chunk of the bucket; see the module docstring. A row whose
    states have a low-memory format (kColFormat != 0) takes _sgd_formatted_chunk; QBLOCK: the 8-bit block size."""
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
        fresh_flag = tl.load(entry + 14)
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
        # HAS_FORMATS (constexpr): whether a row of the bucket has a low-memory format (see adam_kernel).
        # The float32 loops are written out in both branches on purpose: moved into a jit helper, the bfloat16 /
        # float16 kernels lost their 128-bit loads (bench.kernel_resources, triton 3.6 and 3.9, sm_90).
        if HAS_FORMATS:
            fmt = tl.load(entry + 10)
            if fmt == 0:  # a float32 buffer
                for off in range(start, full_end, BLOCK):
                    off = tl.multiple_of(off, BLOCK)
                    _sgd_block(tl.multiple_of(param_ptr, 16), tl.multiple_of(grad_ptr, 16), tl.multiple_of(buf_ptr, 16),
                               tl.multiple_of(master_ptr, 16), off, end, read_buf, has_momentum, has_master, fresh,
                               grad_scale, clip_coef, grad_sign, has_wd, weight_decay, one_minus_dampening, momentum_f,
                               nesterov, neg_lr, PARAM_DTYPE, BLOCK, HAS_SCALE, HAS_CLIP, True)
                for off in range(full_end, end, BLOCK):
                    _sgd_block(param_ptr, grad_ptr, buf_ptr, master_ptr, off, end, read_buf, has_momentum, has_master,
                               fresh, grad_scale, clip_coef, grad_sign, has_wd, weight_decay, one_minus_dampening,
                               momentum_f, nesterov, neg_lr, PARAM_DTYPE, BLOCK, HAS_SCALE, HAS_CLIP, False)
            elif (fmt & FORMAT_MASK) == FORMAT_BLOCKWISE_8BIT:
                _sgd_formatted_chunk(entry, fmt, start, end, full_end, read_buf, has_momentum, master_address, fresh,
                                     grad_scale, clip_coef, grad_sign, has_wd, weight_decay, one_minus_dampening,
                                     momentum_f, nesterov, neg_lr, flags, seed_lo, seed_hi, PARAM_DTYPE, BLOCK,
                                     QBLOCK, FORMAT_BLOCKWISE_8BIT, HAS_SCALE, HAS_CLIP)
            elif (fmt & FORMAT_MASK) == FORMAT_BFLOAT16:
                _sgd_formatted_chunk(entry, fmt, start, end, full_end, read_buf, has_momentum, master_address, fresh,
                                     grad_scale, clip_coef, grad_sign, has_wd, weight_decay, one_minus_dampening,
                                     momentum_f, nesterov, neg_lr, flags, seed_lo, seed_hi, PARAM_DTYPE, BLOCK,
                                     QBLOCK, FORMAT_BFLOAT16, HAS_SCALE, HAS_CLIP)
            else:  # a float32 buffer, the master in a remainder
                _sgd_formatted_chunk(entry, fmt, start, end, full_end, read_buf, has_momentum, master_address, fresh,
                                     grad_scale, clip_coef, grad_sign, has_wd, weight_decay, one_minus_dampening,
                                     momentum_f, nesterov, neg_lr, flags, seed_lo, seed_hi, PARAM_DTYPE, BLOCK,
                                     QBLOCK, 0, HAS_SCALE, HAS_CLIP)
        else:
            for off in range(start, full_end, BLOCK):
                off = tl.multiple_of(off, BLOCK)
                _sgd_block(tl.multiple_of(param_ptr, 16), tl.multiple_of(grad_ptr, 16), tl.multiple_of(buf_ptr, 16),
                           tl.multiple_of(master_ptr, 16), off, end, read_buf, has_momentum, has_master, fresh,
                           grad_scale, clip_coef, grad_sign, has_wd, weight_decay, one_minus_dampening, momentum_f,
                           nesterov, neg_lr, PARAM_DTYPE, BLOCK, HAS_SCALE, HAS_CLIP, True)
            for off in range(full_end, end, BLOCK):
                _sgd_block(param_ptr, grad_ptr, buf_ptr, master_ptr, off, end, read_buf, has_momentum, has_master,
                           fresh, grad_scale, clip_coef, grad_sign, has_wd, weight_decay, one_minus_dampening,
                           momentum_f, nesterov, neg_lr, PARAM_DTYPE, BLOCK, HAS_SCALE, HAS_CLIP, False)

    # Steps only where a bfloat16 momentum buffer is rounded stochastically: a formatted row, so a bucket without
    # formats has none (and its kernel, without the step advance, keeps the registers of the float32 one).
    _finish(table_ptr, counter_ptr, n_rows, skipped, step_advance_ptr, HAS_FORMATS, True, ROW_BLOCK)


def launch_sgd(table: torch.Tensor, chunks: torch.Tensor, hyper: torch.Tensor, counter: torch.Tensor,
               param_dtype: torch.dtype, num_programs: int, *, schedule: torch.Tensor | None = None,
               schedule_step: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None,
               found_inf: torch.Tensor | None = None, clip_coef: torch.Tensor | None = None,
               step_advance: torch.Tensor | None = None, sr_seed: int = 0, BLOCK: int = DEFAULT_BLOCK,
               CHUNK: int = DEFAULT_CHUNK, num_warps: int = DEFAULT_NUM_WARPS, QBLOCK: int | None = None,
               HAS_FORMATS: bool = True) -> None:
    """One SGD step of a bucket in one launch; clears the table's fresh-buffer flags (column 14) and advances
    the steps of column 5 (bfloat16 momentum buffers) afterwards, unless found_inf skipped the step.

    Arguments as for ``launch_adam``; a schedule sets lr and momentum; sr_seed: the seed of the stochastic
    rounding of bfloat16 momentum buffers (params are written to nearest even).
    """
    _launch(sgd_kernel, table, chunks, hyper, counter, param_dtype, num_programs, schedule, schedule_step, BLOCK,
            CHUNK, num_warps, grad_scale, found_inf, clip_coef, step_advance, sr_seed, QBLOCK, HAS_FORMATS)


_SGD_SCHEMA, _SGD_WRITES = _schema_of("sgd_step_")


@torch.library.custom_op("fused_sched::triton_sgd_step_", mutates_args=_SGD_WRITES, schema=_SGD_SCHEMA)
def triton_sgd_step_(
    params: list[torch.Tensor], grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor],
    hyper: torch.Tensor, group_index: list[int], fresh_buffers: list[int], schedule: torch.Tensor | None = None,
    schedule_step: torch.Tensor | None = None, master_params: list[torch.Tensor] | None = None,
    grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
    clip_coef: torch.Tensor | None = None, step_advance: torch.Tensor | None = None,
) -> None:
    """SGD over one bucket with the Triton kernel; arguments as fused_sched::sgd_step_ (fresh_buffers go to the
    table's column 14)."""
    if len(fresh_buffers) != len(params):
        raise ValueError(f"fresh_buffers has {len(fresh_buffers)} entries for {len(params)} params")
    _check_lists(params, grads, master_params, None)
    table = _address_table(params, grads, [momentum_buffers], [0] * len(params), group_index, master_params,
                           fresh=list(fresh_buffers))
    _launch_from_lists(launch_sgd, params, table, hyper, schedule=schedule, schedule_step=schedule_step,
                       grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef, step_advance=step_advance)


@triton_sgd_step_.register_fake
def _(params, grads, momentum_buffers, hyper, group_index, fresh_buffers, schedule=None, schedule_step=None,
      master_params=None, grad_scale=None, found_inf=None, clip_coef=None, step_advance=None) -> None:
    return None
