"""Launching a Triton step kernel: argument checks, the persistent grid (resident programs), launch configuration per
device, and the address tables of the tensor-list custom ops."""

from __future__ import annotations

import functools

import torch

from ..._schedule_program import COLUMNS as _SCHEDULE_COLUMNS
from .. import triton_interpreted
from ..device_tables import COL_NUMEL, TABLE_COLUMNS, build_chunks, to_device
from .step_common import _ROW_BLOCK, _TL_DTYPES, DEFAULT_BLOCK, DEFAULT_CHUNK

#: The block sizes of 8-bit states (state_format.BLOCK_SIZES) and the default: the kernels' QBLOCK.
QBLOCK_SIZES = (32, 64, 128, 256)
DEFAULT_QBLOCK = 256


def _check_schedule(schedule, schedule_step, hyper):
    """effective_hyper's checks (csrc/cpu/step_common.cpp), on the hyper-parameter table's device."""
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
            num_warps, grad_scale=None, found_inf=None, clip_coef=None, step_advance=None, sr_seed=0,
            QBLOCK=None, HAS_FORMATS=True, constexprs=None):
    # constexprs: what one family's kernel alone takes on top of the common arguments (Muon: PHASE); part of the
    # specialization, so each value gets its own resident-program cap.
    constexprs = constexprs or {}
    if QBLOCK is None:
        # No 8-bit rows to fit (the list ops, direct calls): the default block size, or the largest that fits.
        QBLOCK = min(DEFAULT_QBLOCK, max(BLOCK // 2, QBLOCK_SIZES[0]))
    if param_dtype not in _TL_DTYPES:
        raise ValueError(f"parameters must be float32, bfloat16 or float16, got {param_dtype}")
    if BLOCK <= 0 or BLOCK & (BLOCK - 1) or CHUNK % BLOCK:
        raise ValueError(f"BLOCK must be a power of two dividing CHUNK, got BLOCK={BLOCK}, CHUNK={CHUNK}")
    # The 8-bit states' blocks (docs/state_formats.md) never straddle two of the half BLOCKs that formatted rows
    # are updated in.
    if QBLOCK not in QBLOCK_SIZES or (BLOCK // 2) % QBLOCK:
        raise ValueError(f"QBLOCK (the 8-bit block size) must be one of {QBLOCK_SIZES} and divide BLOCK // 2, got "
                         f"QBLOCK={QBLOCK}, BLOCK={BLOCK}")
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
                      clip_coef is None, BLOCK, CHUNK, QBLOCK, HAS_FORMATS, num_warps, hyper.device,
                      tuple(sorted(constexprs.items())))
    cap = _RESIDENT_PROGRAMS.get(specialization)
    if cap is not None:
        grid = min(grid, cap)
    compiled = kernel[(grid,)](
        table, chunks, hyper, counter, n_rows, n_chunks,
        schedule, 0 if schedule is None else schedule.shape[1], schedule_step,
        grad_scale, found_inf, clip_coef, step_advance, *_seed_halves(sr_seed),
        PARAM_DTYPE=_TL_DTYPES[param_dtype], BLOCK=BLOCK, CHUNK=CHUNK, QBLOCK=QBLOCK, ROW_BLOCK=_ROW_BLOCK,
        HAS_SCHEDULE=schedule is not None, HAS_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
        HAS_CLIP=clip_coef is not None, HAS_FORMATS=HAS_FORMATS, **constexprs,
        num_warps=num_warps,
        # optim_math.h rounds a multiply-add once only where it says so (the tl.fma calls); no other may fuse.
        enable_fp_fusion=False,
    )
    if cap is None and hyper.device.type == "cuda":
        _RESIDENT_PROGRAMS[specialization] = resident_programs(compiled, hyper.device)


#: Persistent programs that a specialization's compiled kernel keeps resident on the whole device, by
#: (kernel, dtype, optional inputs, BLOCK, CHUNK, QBLOCK, num_warps, device, the family's own constexprs): found
#: at its first launch.
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


# Under the interpreter every Triton operation is a numpy call with Python overhead, so fewer, larger blocks
# run faster (CI time); three programs still exercise the persistent loop and the last-program ticket.
_INTERPRETER_BLOCK = 8192
_INTERPRETER_CHUNK = 32768
_INTERPRETER_PROGRAMS = 3
# Persistent programs per SM on a GPU. Untuned: no GPU was lent when this was written.
_PROGRAMS_PER_SM = 4


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _launch_config(device: torch.device, numels: list[int]) -> tuple[dict, torch.Tensor]:
    """Block and chunk sizes for `device`, the host chunk map of tensors of `numels` elements, and the number of
    persistent programs (never more than there are chunks, at least one)."""
    if device.type == "cpu" or triton_interpreted():
        programs, block, chunk = _INTERPRETER_PROGRAMS, _INTERPRETER_BLOCK, _INTERPRETER_CHUNK
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        programs, block, chunk = _PROGRAMS_PER_SM * _num_sms(index), DEFAULT_BLOCK, DEFAULT_CHUNK
    chunks = build_chunks(numels, chunk)
    return {"num_programs": max(1, min(programs, chunks.shape[0])), "BLOCK": block, "CHUNK": chunk}, chunks

def _address_table(params, grads, states, steps, group_index, master_params=None, param_ids=None,
                   fresh=None) -> torch.Tensor:
    """The address table of tensor lists (OptimBucket.address_table's layout); steps: one tensor or address per
    param; master_params: None or one per param (an empty tensor for none); param_ids: None (each param's index in
    the call) or one per param; fresh: SGD's fresh-buffer flags, None for none."""
    def addr(t):
        return t.data_ptr() if t is not None and t.numel() > 0 else 0

    rows = []
    for i, p in enumerate(params):
        state_addrs = [addr(column[i]) if column else 0 for column in states]
        state_addrs += [0] * (3 - len(state_addrs))
        step = steps[i] if isinstance(steps[i], int) else addr(steps[i])
        master = addr(master_params[i]) if master_params else 0
        param_id = param_ids[i] if param_ids else i
        # The list ops run float32 states only: format 0, no 8-bit columns.
        rows.append([addr(p), addr(grads[i]), *state_addrs, step, p.numel(), group_index[i], master, param_id,
                     0, 0, 0, 0, int(fresh[i] != 0) if fresh else 0])
    return torch.tensor(rows, dtype=torch.int64).reshape(len(params), TABLE_COLUMNS)


def _check_lists(params, grads, master_params, param_ids) -> None:
    if len(grads) != len(params):
        raise ValueError(f"{len(grads)} grads for {len(params)} params")
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        # The kernels walk a gradient as the flat array of its parameter.
        if g.dtype != p.dtype or g.shape != p.shape or g.stride() != p.stride() or g.device != p.device:
            raise ValueError(f"grads[{i}] must be laid out like its parameter ({p.dtype} {list(p.shape)} strides "
                             f"{p.stride()}), got {g.dtype} {list(g.shape)} strides {g.stride()}")
    if master_params is not None and len(master_params) not in (0, len(params)):
        raise ValueError(f"master_params has {len(master_params)} entries for {len(params)} params")
    if param_ids and len(param_ids) != len(params):
        raise ValueError(f"param_ids has {len(param_ids)} entries for {len(params)} params")
    if master_params:
        for i, (p, m) in enumerate(zip(params, master_params, strict=True)):
            if m.numel() and (m.dtype != torch.float32 or m.shape != p.shape or m.stride() != p.stride()
                              or m.device != p.device or p.dtype == torch.float32):
                raise ValueError(f"master_params[{i}] must be a float32 tensor laid out like its {p.dtype} "
                                 "parameter (or empty for none)")


def _launch_from_lists(launch, params, table_host, hyper, **options):
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    config, chunks = _launch_config(device, table_host[:, COL_NUMEL].tolist())
    counter = torch.zeros(1, dtype=torch.int32, device=device)
    # The list ops' tables hold float32 states only (_address_table): the kernels without the formatted path.
    launch(to_device(table_host, device), to_device(chunks, device), hyper, counter, dtype,
           config["num_programs"], BLOCK=config["BLOCK"], CHUNK=config["CHUNK"], HAS_FORMATS=False, **options)


def _schema_of(name: str) -> tuple[str, tuple[str, ...]]:
    """The schema of the C++ operator fused_sched::<name> (csrc/fused_sched_ops.cpp) without its name, and the
    arguments it writes: the Triton ops take the same arguments and declare the same mutations, whatever the C++
    schema says (it is given explicitly: infer_schema cannot express an optional tensor list)."""
    from ..._extension import load_extension

    load_extension()
    schema = getattr(torch.ops.fused_sched, name).default._schema
    text = str(schema)
    written = tuple(a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write)
    return text[text.index("("):], written
