"""Muon in Triton: the two elementwise passes of a Muon step (csrc/include/fused_sched/muon_math.h), the kernel over a
bucket's chunks, its launcher and the custom op fused_sched::triton_muon_step_.

A Muon step is the momentum pass (PHASE 0: momentum buffer, and the update to orthogonalize written as bfloat16 into
the param's workspace, the table's state1), the batched Newton-Schulz orthogonalization of the workspaces (in
Python, between the launches: fused_sched/optim/muon.py), and the update pass (PHASE 1: weight decay and the
orthogonalized update applied to the param). PHASE is a constexpr: each pass compiles to a kernel of its own, which
loads only the tensors its pass reads. Column 5 of the table holds the address of each param's float64 lr ratio
(adjust_lr_fn). No master weights, stochastic rounding or state formats: the kernel reads none of those columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import _address_table, _check_lists, _launch, _launch_from_lists, _schema_of
from .step_common import (
    _NESTEROV,
    _W,
    DEFAULT_BLOCK,
    DEFAULT_CHUNK,
    DEFAULT_NUM_WARPS,
    _prescale,
    _scheduled,
    _step_inputs,
    _to_param_dtype,
)

MOMENTUM_PASS, UPDATE_PASS = 0, 1  # muon_math.h MuonPass


@triton.jit
def _muon_lerp(start, end, weight, weight_minus_one, small):
    """muon_lerp: torch.lerp with a scalar weight, its formula picked by |weight| < 0.5, one rounding per fma."""
    diff = end - start
    return tl.where(small, tl.fma(weight, diff, start), tl.fma(weight_minus_one, diff, end))


@triton.jit
def _muon_momentum_element(g, buf, buffer_weight, buffer_weight_minus_one, buffer_small, nesterov_weight,
                           nesterov_weight_minus_one, nesterov_small, nesterov):
    """muon_momentum_element on float32 values: (the update to orthogonalize, the new momentum buffer)."""
    buf = _muon_lerp(buf, g, buffer_weight, buffer_weight_minus_one, buffer_small)
    update = tl.where(nesterov, _muon_lerp(g, buf, nesterov_weight, nesterov_weight_minus_one, nesterov_small), buf)
    return update, buf


@triton.jit
def _muon_update_element(p, o, decay, neg_adjusted_lr):
    """muon_update_element on float32 values: param.mul_(1 - lr * weight_decay), then
    param.add_(update, alpha=-adjusted_lr) in one rounding."""
    p = p * decay
    return tl.fma(o, neg_adjusted_lr, p)


@triton.jit
def _muon_offsets(off, end, BLOCK: tl.constexpr, FULL: tl.constexpr):
    """A block's offsets and element mask. FULL: a whole block of 16-byte aligned tensors, offsets hinted
    contiguous and aligned and no mask (a constant the compiler drops), for 16-byte vector loads and stores."""
    offs = off + tl.arange(0, BLOCK)
    if FULL:
        offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
        mask = tl.full([BLOCK], 1, tl.int1)
    else:
        mask = offs < end
    return offs, mask


@triton.jit
def _muon_momentum_block(grad_ptr, buf_ptr, work_ptr, off, end, grad_scale, clip_coef, buffer_weight,
                         buffer_weight_minus_one, buffer_small, nesterov_weight, nesterov_weight_minus_one,
                         nesterov_small, nesterov, PARAM_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                         HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, FULL: tl.constexpr):
    """The momentum pass over the BLOCK elements at `off`: the prescaled gradient (written back when scaled or
    clipped, as the SGD / Adam kernels leave it), the momentum buffer, the update rounded to bfloat16 (nearest
    even) into the workspace."""
    offs, mask = _muon_offsets(off, end, BLOCK, FULL)
    g = _prescale(tl.load(grad_ptr + offs, mask=mask).to(tl.float32), grad_scale, clip_coef, HAS_SCALE, HAS_CLIP)
    if HAS_SCALE or HAS_CLIP:
        tl.store(grad_ptr + offs, _to_param_dtype(g, PARAM_DTYPE), mask=mask)
    buf = tl.load(buf_ptr + offs, mask=mask)
    update, buf = _muon_momentum_element(g, buf, buffer_weight, buffer_weight_minus_one, buffer_small,
                                         nesterov_weight, nesterov_weight_minus_one, nesterov_small, nesterov)
    tl.store(buf_ptr + offs, buf, mask=mask)
    # _to_param_dtype's integer rounding: the interpreter truncates a float32 -> bfloat16 conversion.
    tl.store(work_ptr + offs, _to_param_dtype(update, tl.bfloat16), mask=mask)


@triton.jit
def _muon_update_block(param_ptr, work_ptr, off, end, decay, neg_adjusted_lr, PARAM_DTYPE: tl.constexpr,
                       BLOCK: tl.constexpr, FULL: tl.constexpr):
    """The update pass over the BLOCK elements at `off`: the orthogonalized bfloat16 update applied to the param,
    which is widened to float32 and rounded back to its dtype (nearest even) once."""
    offs, mask = _muon_offsets(off, end, BLOCK, FULL)
    p = tl.load(param_ptr + offs, mask=mask).to(tl.float32)
    o = tl.load(work_ptr + offs, mask=mask).to(tl.float32)  # bfloat16 -> float32 is exact
    p = _muon_update_element(p, o, decay, neg_adjusted_lr)
    tl.store(param_ptr + offs, _to_param_dtype(p, PARAM_DTYPE), mask=mask)


@triton.jit
def muon_kernel(table_ptr, chunks_ptr, hyper_ptr, counter_ptr, n_rows, n_chunks, schedule_ptr, segments,
                schedule_step_ptr, grad_scale_ptr, found_inf_ptr, clip_coef_ptr, step_advance_ptr, seed_lo, seed_hi,
                PARAM_DTYPE: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr, QBLOCK: tl.constexpr,
                ROW_BLOCK: tl.constexpr, HAS_SCHEDULE: tl.constexpr, HAS_SCALE: tl.constexpr,
                HAS_FOUND_INF: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_FORMATS: tl.constexpr,
                PHASE: tl.constexpr):
    """One Muon pass (PHASE, muon_math.h MuonPass) over every chunk of the bucket. The arguments are the step
    kernels' common ones (launch._launch); the seed, QBLOCK, ROW_BLOCK and HAS_FORMATS are unused (no stochastic
    rounding, no state formats, no steps to advance) and the ticket counter is left alone (zero)."""
    grad_scale, clip_coef, skipped = _step_inputs(grad_scale_ptr, found_inf_ptr, clip_coef_ptr, HAS_SCALE,
                                                  HAS_FOUND_INF, HAS_CLIP)
    for c in range(tl.program_id(0), tl.where(skipped, 0, n_chunks), tl.num_programs(0)):
        row = tl.load(chunks_ptr + 2 * c)
        start = tl.load(chunks_ptr + 2 * c + 1)
        entry = table_ptr + row * _W
        group = tl.load(entry + 7)
        h = hyper_ptr + group * 8
        # muon_coeffs: float64, each rounded to float32 once; the schedule first (as in sgd_kernel): its momentum
        # column is kMomentum.
        lr = tl.load(h + 0)
        momentum = tl.load(h + 5)
        if HAS_SCHEDULE:
            lr, momentum = _scheduled(lr, momentum, schedule_ptr, segments, schedule_step_ptr, group,
                                      tl.load(h + 7).to(tl.int32))
        numel = tl.load(entry + 6)
        end = tl.minimum(start + CHUNK, numel)
        work_address = tl.load(entry + 3)
        work_ptr = work_address.to(tl.pointer_type(tl.bfloat16))
        # The loops are written out here rather than in a jit helper, as in sgd_kernel / adam_kernel (the 16-bit
        # kernels lost their 128-bit loads that way). Full blocks of aligned tensors take the vector path.
        if PHASE == 0:
            grad_address = tl.load(entry + 1)
            buf_address = tl.load(entry + 2)
            grad_ptr = grad_address.to(tl.pointer_type(PARAM_DTYPE))
            buf_ptr = buf_address.to(tl.pointer_type(tl.float32))
            flags = tl.load(h + 7).to(tl.int32)
            buffer_weight64 = 1.0 - momentum
            buffer_weight = buffer_weight64.to(tl.float32)
            buffer_weight_minus_one = buffer_weight - 1.0  # in float32, as muon_coeffs
            nesterov_weight = momentum.to(tl.float32)
            nesterov_weight_minus_one = nesterov_weight - 1.0
            buffer_small = tl.abs(buffer_weight64) < 0.5  # torch.lerp's choice, on the float64 weight
            nesterov_small = tl.abs(momentum) < 0.5
            nesterov = (flags & _NESTEROV) != 0
            aligned = ((grad_address | buf_address | work_address) & 15) == 0
            full_end = tl.where(aligned, start + (end - start) // BLOCK * BLOCK, start)
            for off in range(start, full_end, BLOCK):
                off = tl.multiple_of(off, BLOCK)
                _muon_momentum_block(tl.multiple_of(grad_ptr, 16), tl.multiple_of(buf_ptr, 16),
                                     tl.multiple_of(work_ptr, 16), off, end, grad_scale, clip_coef, buffer_weight,
                                     buffer_weight_minus_one, buffer_small, nesterov_weight,
                                     nesterov_weight_minus_one, nesterov_small, nesterov, PARAM_DTYPE, BLOCK,
                                     HAS_SCALE, HAS_CLIP, True)
            for off in range(full_end, end, BLOCK):
                _muon_momentum_block(grad_ptr, buf_ptr, work_ptr, off, end, grad_scale, clip_coef, buffer_weight,
                                     buffer_weight_minus_one, buffer_small, nesterov_weight,
                                     nesterov_weight_minus_one, nesterov_small, nesterov, PARAM_DTYPE, BLOCK,
                                     HAS_SCALE, HAS_CLIP, False)
        else:
            param_address = tl.load(entry + 0)
            param_ptr = param_address.to(tl.pointer_type(PARAM_DTYPE))
            lr_ratio = tl.load(tl.load(entry + 5).to(tl.pointer_type(tl.float64)))
            decay = (1.0 - lr * tl.load(h + 4)).to(tl.float32)
            # -(lr * lr_ratio): a multiply by -1 (Triton's unary minus is 0 - x, which loses the sign of a zero).
            neg_adjusted_lr = ((lr * lr_ratio) * -1.0).to(tl.float32)
            # A 16-bit param leaves the update pass two 16-bit streams: BLOCK elements (4 per thread at 512 and 4
            # warps) would move in 8-byte loads (bench.kernel_resources), so such a pass takes twice as many per
            # iteration, 16 bytes per thread, where the chunks keep those blocks aligned.
            UB: tl.constexpr = 2 * BLOCK if PARAM_DTYPE != tl.float32 and CHUNK % (2 * BLOCK) == 0 else BLOCK
            aligned = ((param_address | work_address) & 15) == 0
            full_end = tl.where(aligned, start + (end - start) // UB * UB, start)
            for off in range(start, full_end, UB):
                off = tl.multiple_of(off, UB)
                _muon_update_block(tl.multiple_of(param_ptr, 16), tl.multiple_of(work_ptr, 16), off, end, decay,
                                   neg_adjusted_lr, PARAM_DTYPE, UB, True)
            for off in range(full_end, end, UB):
                _muon_update_block(param_ptr, work_ptr, off, end, decay, neg_adjusted_lr, PARAM_DTYPE, UB, False)

    # step_advance: "a step ran", written by the update pass alone, and not when found_inf skipped it. No step or
    # flag of the table changes, so no program waits for the others (no ticket): program 0 writes it.
    if PHASE == 1:
        if tl.program_id(0) == 0:
            if not skipped:
                tl.store(step_advance_ptr, tl.full([], 1.0, tl.float64))


def launch_muon(table: torch.Tensor, chunks: torch.Tensor, hyper: torch.Tensor, counter: torch.Tensor,
                param_dtype: torch.dtype, num_programs: int, *, schedule: torch.Tensor | None = None,
                schedule_step: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None,
                found_inf: torch.Tensor | None = None, clip_coef: torch.Tensor | None = None,
                step_advance: torch.Tensor | None = None, sr_seed: int = 0, BLOCK: int = DEFAULT_BLOCK,
                CHUNK: int = DEFAULT_CHUNK, num_warps: int = DEFAULT_NUM_WARPS, QBLOCK: int | None = None,
                HAS_FORMATS: bool = True, phase: int = MOMENTUM_PASS) -> None:
    """One Muon pass of a bucket in one launch: phase 0 (the momentum pass) or 1 (the update pass).

    Arguments as for ``launch_adam``; the table's state0 is the float32 momentum buffer, state1 the bfloat16
    workspace (laid out like the param) and column 5 the address of the param's float64 lr ratio. A schedule sets
    lr and momentum. grad_scale / clip_coef prescale the gradient in phase 0 (written back); found_inf skips both
    phases; phase 1 alone writes step_advance. sr_seed, QBLOCK and HAS_FORMATS are accepted for the runner and
    ignored: Muon never rounds stochastically and has no state formats. The counter is not used.
    """
    if phase not in (MOMENTUM_PASS, UPDATE_PASS):
        raise ValueError(f"phase must be 0 (momentum pass) or 1 (update pass), got {phase}")
    # The kernel has no formatted path: QBLOCK left to _launch's default (the runner's block size need not fit a
    # small BLOCK) and HAS_FORMATS False, so that one specialization serves every bucket.
    _launch(muon_kernel, table, chunks, hyper, counter, param_dtype, num_programs, schedule, schedule_step, BLOCK,
            CHUNK, num_warps, grad_scale, found_inf, clip_coef, step_advance, 0, None, False,
            constexprs={"PHASE": phase})


_MUON_SCHEMA, _MUON_WRITES = _schema_of("muon_step_")


def _check_muon_lists(params, momentum_buffers, updates, lr_ratios) -> None:
    # The kernel walks each state as the flat array of its param, and reads lr_ratios[i] through its address.
    for name, states, dtype in (("momentum_buffers", momentum_buffers, torch.float32),
                                ("updates", updates, torch.bfloat16)):
        if len(states) != len(params):
            raise ValueError(f"{len(states)} {name} for {len(params)} params")
        for i, (p, s) in enumerate(zip(params, states, strict=True)):
            if s.dtype != dtype or s.shape != p.shape or s.stride() != p.stride() or s.device != p.device:
                raise ValueError(f"{name}[{i}] must be a {dtype} tensor laid out like its parameter "
                                 f"({list(p.shape)} strides {p.stride()}), got {s.dtype} {list(s.shape)} strides "
                                 f"{s.stride()}")
    if params and (lr_ratios.dtype != torch.float64 or lr_ratios.dim() != 1 or lr_ratios.numel() != len(params)
                   or lr_ratios.device != params[0].device):
        raise ValueError(f"lr_ratios must be a float64 [{len(params)}] tensor on {params[0].device}, got "
                         f"{lr_ratios.dtype} {list(lr_ratios.shape)} on {lr_ratios.device}")


@torch.library.custom_op("fused_sched::triton_muon_step_", mutates_args=_MUON_WRITES, schema=_MUON_SCHEMA)
def triton_muon_step_(
    params: list[torch.Tensor], grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor],
    updates: list[torch.Tensor], lr_ratios: torch.Tensor, hyper: torch.Tensor, group_index: list[int], phase: int,
    schedule: torch.Tensor | None = None, schedule_step: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
    clip_coef: torch.Tensor | None = None, step_advance: torch.Tensor | None = None,
) -> None:
    """One Muon pass over one bucket with the Triton kernel; arguments as fused_sched::muon_step_ (column 5 of the
    table: the address of lr_ratios[i])."""
    _check_lists(params, grads, None, None)
    _check_muon_lists(params, momentum_buffers, updates, lr_ratios)
    # One-element views: _address_table writes each one's address (that of lr_ratios[i]) into column 5.
    steps = [lr_ratios[i] for i in range(len(params))]
    table = _address_table(params, grads, [momentum_buffers, updates], steps, group_index)
    _launch_from_lists(launch_muon, params, table, hyper, schedule=schedule, schedule_step=schedule_step,
                       grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef, step_advance=step_advance,
                       phase=phase)


@triton_muon_step_.register_fake
def _(params, grads, momentum_buffers, updates, lr_ratios, hyper, group_index, phase, schedule=None,
      schedule_step=None, grad_scale=None, found_inf=None, clip_coef=None, step_advance=None) -> None:
    return None
