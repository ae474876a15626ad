"""The Triton backend: the launch on a bucket's device tables; the registered custom ops.

Eager path (the optimizers): ``TritonBucketRunner`` keeps the bucket's address table, chunk map and ticket
counter on the device (``device_tables.DeviceTables``: uploaded only when an address changes), and one launch
updates the whole bucket.

Registered ops: ``torch.ops.fused_sched.triton_adam_step_`` / ``triton_sgd_step_`` take the C++ ops' arguments
(tensor lists, schedule, master weights, GradScaler and clipping inputs) and declare what they mutate, and
``triton_grad_norm_clip`` runs a fused clip's norm pass: torch.compile treats them as opaque custom ops, and the
optimizers' compiled step calls them (fused_sched/optim/_compiled.py). They build the tables on every call, so the
eager step uses the runner instead.
"""

from __future__ import annotations

import functools

import torch

from . import triton_interpreted
from . import triton_kernels as kernels
from .device_tables import DeviceTables, NormWorkspace, build_chunks, to_device

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
        programs, block, chunk = _PROGRAMS_PER_SM * _num_sms(index), kernels.DEFAULT_BLOCK, kernels.DEFAULT_CHUNK
    chunks = build_chunks(numels, chunk)
    return {"num_programs": max(1, min(programs, chunks.shape[0])), "BLOCK": block, "CHUNK": chunk}, chunks


class TritonBucketRunner(DeviceTables):
    """One bucket's device tables and its Triton launch."""

    def __init__(self, device: torch.device, dtype: torch.dtype, algorithm: str):
        super().__init__(device, dtype, algorithm)
        self.launch = kernels.launch_adam if algorithm == "adam" else kernels.launch_sgd
        self.config = None

    def _configure(self, numels: list[int]) -> torch.Tensor:
        self.config, chunks = _launch_config(self.device, numels)
        return chunks

    def _launch(self, hyper: torch.Tensor, **options) -> None:
        """triton_kernels.launch_adam / launch_sgd."""
        self.launch(self.table, self.chunks, hyper, self.counter, self.dtype, self.config["num_programs"],
                    BLOCK=self.config["BLOCK"], CHUNK=self.config["CHUNK"], **options)

    def _norm_slots(self) -> int:
        return max(1, min(self.config["num_programs"], self.chunks.shape[0]))

    def _launch_norm(self, workspace: NormWorkspace, offset: int, out: torch.Tensor, norm_type: float,
                     max_norm: float, finalize: bool, grad_scale: torch.Tensor | None) -> int:
        """triton_kernels.launch_grad_norm."""
        return kernels.launch_grad_norm(
            self.table, self.chunks, workspace.partials, offset, workspace.counter, out, self.dtype,
            self.config["num_programs"], norm_type, max_norm, finalize=finalize, grad_scale=grad_scale,
            BLOCK=self.config["BLOCK"], CHUNK=self.config["CHUNK"],
        )


def _address_table(params, grads, states, steps, group_index, master_params=None, param_ids=None) -> torch.Tensor:
    """The address table of tensor lists (OptimBucket.address_table's layout); master_params: None or one per
    param (an empty tensor for none); param_ids: None (each param's index in the call) or one per param."""
    def addr(t):
        return t.data_ptr() if t is not None and t.numel() > 0 else 0

    rows = []
    for i, p in enumerate(params):
        state_addrs = [addr(column[i]) if column else 0 for column in states]
        state_addrs += [0] * (3 - len(state_addrs))
        step = steps[i] if isinstance(steps[i], int) else addr(steps[i])  # SGD passes its fresh flags here
        master = addr(master_params[i]) if master_params else 0
        param_id = param_ids[i] if param_ids else i
        rows.append([addr(p), addr(grads[i]), *state_addrs, step, p.numel(), group_index[i], master, param_id])
    return torch.tensor(rows, dtype=torch.int64).reshape(len(params), kernels.TABLE_COLUMNS)


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
    config, chunks = _launch_config(device, table_host[:, kernels.COL_NUMEL].tolist())
    counter = torch.zeros(1, dtype=torch.int32, device=device)
    launch(to_device(table_host, device), to_device(chunks, device), hyper, counter, dtype,
           config["num_programs"], BLOCK=config["BLOCK"], CHUNK=config["CHUNK"], **options)


def _schema_of(name: str) -> tuple[str, tuple[str, ...]]:
    """The schema of the C++ operator fused_sched::<name> (csrc/fused_sched_ops.cpp) without its name, and the
    arguments it writes: the Triton ops take the same arguments and declare the same mutations, whatever the C++
    schema says (it is given explicitly: infer_schema cannot express an optional tensor list)."""
    from .._extension import load_extension

    load_extension()
    schema = getattr(torch.ops.fused_sched, name).default._schema
    text = str(schema)
    written = tuple(a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write)
    return text[text.index("("):], written


# The registered ops run the kernels of the optimizers' eager runner on the arguments of fused_sched::adam_step_ /
# sgd_step_; the optimizers' torch.compile path calls them (fused_sched/optim/_compiled.py).
_ADAM_SCHEMA, _ADAM_WRITES = _schema_of("adam_step_")
_SGD_SCHEMA, _SGD_WRITES = _schema_of("sgd_step_")


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
    _launch_from_lists(kernels.launch_adam, params, table, hyper, schedule=schedule, schedule_step=schedule_step,
                       grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef, step_advance=step_advance,
                       sr_seed=sr_seed)


@triton_adam_step_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hyper, group_index, schedule=None,
      schedule_step=None, master_params=None, grad_scale=None, found_inf=None, clip_coef=None, step_advance=None,
      param_ids=(), sr_seed=0) -> None:
    return None


@torch.library.custom_op("fused_sched::triton_sgd_step_", mutates_args=_SGD_WRITES, schema=_SGD_SCHEMA)
def triton_sgd_step_(
    params: list[torch.Tensor], grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor],
    hyper: torch.Tensor, group_index: list[int], fresh_buffers: list[int], schedule: torch.Tensor | None = None,
    schedule_step: torch.Tensor | None = None, master_params: list[torch.Tensor] | None = None,
    grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
    clip_coef: torch.Tensor | None = None, step_advance: torch.Tensor | None = None,
) -> None:
    """SGD over one bucket with the Triton kernel; arguments as fused_sched::sgd_step_ (fresh_buffers go to the
    table's column 5)."""
    if len(fresh_buffers) != len(params):
        raise ValueError(f"fresh_buffers has {len(fresh_buffers)} entries for {len(params)} params")
    _check_lists(params, grads, master_params, None)
    table = _address_table(params, grads, [momentum_buffers], list(fresh_buffers), group_index, master_params)
    _launch_from_lists(kernels.launch_sgd, params, table, hyper, schedule=schedule, schedule_step=schedule_step,
                       grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef, step_advance=step_advance)


@triton_sgd_step_.register_fake
def _(params, grads, momentum_buffers, hyper, group_index, fresh_buffers, schedule=None, schedule_step=None,
      master_params=None, grad_scale=None, found_inf=None, clip_coef=None, step_advance=None) -> None:
    return None


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
        config, chunks = _launch_config(device, table[:, kernels.COL_NUMEL].tolist())
        launches.append((members[0].dtype, to_device(table, device), to_device(chunks, device), config))
    slots = sum(max(1, min(config["num_programs"], chunks.shape[0])) for _, _, chunks, config in launches)
    partials = torch.empty(slots, dtype=torch.float64, device=device)
    counter = torch.zeros(1, dtype=torch.int32, device=device)
    out = torch.empty(2, dtype=torch.float32, device=device)
    offset = 0
    for k, (dtype, table, chunks, config) in enumerate(launches):
        offset += kernels.launch_grad_norm(
            table, chunks, partials, offset, counter, out, dtype, config["num_programs"], norm_type, max_norm,
            finalize=k == len(launches) - 1, grad_scale=grad_scale, BLOCK=config["BLOCK"], CHUNK=config["CHUNK"],
        )
    return out


@triton_grad_norm_clip.register_fake
def _(grads, bucket_sizes, norm_type, max_norm, grad_scale=None) -> torch.Tensor:
    return torch.empty(2, dtype=torch.float32, device=grads[0].device)
