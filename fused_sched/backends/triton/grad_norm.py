"""The norm pass of fused clipping in Triton: the kernel, its launcher and the custom op
fused_sched::triton_grad_norm_clip."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..device_tables import COL_NUMEL, to_device
from .launch import _address_table, _launch_config
from .step_common import _TL_DTYPES, _W, DEFAULT_BLOCK, DEFAULT_CHUNK, DEFAULT_NUM_WARPS

# Norm kinds of the norm pass (grad_norm_kernel's NORM constexpr).
NORM_TWO, NORM_ONE, NORM_INF, NORM_P = 0, 1, 2, 3


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
@torch.library.custom_op("fused_sched::triton_grad_norm_clip", mutates_args=())
def triton_grad_norm_clip(
    grads: list[torch.Tensor], bucket_sizes: list[int], norm_type: float, max_norm: float,
    grad_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """A fused clip's norm pass with the Triton kernel over the gradients of one or more buckets (bucket_sizes: how
    many of `grads` each holds, in order): float32 [total_norm, clip_coef], as ``DeviceTables.norm_pass`` computes
    it for the same buckets (one launch per bucket, the last finalizing; fused_sched::grad_norm_clip is the C++
    operator)."""
    if sum(bucket_sizes) != len(grads) or any(n <= 0 for n in bucket_sizes):
        raise ValueError(f"bucket_sizes {list(bucket_sizes)} do not cut {len(grads)} grads into non-empty buckets")
    device = grads[0].device
    launches = []
    offset = 0
    for n in bucket_sizes:
        members = grads[offset:offset + n]
        offset += n
        table = _address_table(members, members, [], [0] * n, [0] * n)
        config, chunks = _launch_config(device, table[:, COL_NUMEL].tolist())
        launches.append((members[0].dtype, to_device(table, device), to_device(chunks, device), config))
    slots = sum(max(1, min(config["num_programs"], chunks.shape[0])) for _, _, chunks, config in launches)
    partials = torch.empty(slots, dtype=torch.float64, device=device)
    counter = torch.zeros(1, dtype=torch.int32, device=device)
    out = torch.empty(2, dtype=torch.float32, device=device)
    offset = 0
    for k, (dtype, table, chunks, config) in enumerate(launches):
        offset += launch_grad_norm(
            table, chunks, partials, offset, counter, out, dtype, config["num_programs"], norm_type, max_norm,
            finalize=k == len(launches) - 1, grad_scale=grad_scale, BLOCK=config["BLOCK"], CHUNK=config["CHUNK"],
        )
    return out


@triton_grad_norm_clip.register_fake
def _(grads, bucket_sizes, norm_type, max_norm, grad_scale=None) -> torch.Tensor:
    return torch.empty(2, dtype=torch.float32, device=grads[0].device)
