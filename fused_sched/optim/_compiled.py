"""The optimizer step under torch.compile: the same kernels as the eager step, reached through the dispatcher.

The eager step keeps its buckets on the C++ side (``OptimBucket``, pybind11), which Dynamo cannot trace: every
call into them would be a graph break, with the update running outside the graph. While
``torch.compiler.is_compiling()``, ``FusedOptimizer.step`` and ``clip_grad_norm_`` take this path instead:

* ``_prepare`` (``torch._dynamo.assume_constant_result``: run for real while Dynamo traces, as torch.optim's
  ``_init_group`` is) does the host work of a first step: the eager step's checks, the missing state, hyper table,
  step counters and schedule tables, so the graph takes them as inputs from its first call on and the second call
  reuses it;
* the traced code groups the parameters with a gradient into (device, dtype) buckets in the eager plan's order
  (Dynamo runs this Python once and guards on what it read) and makes one operator call per bucket with the
  arguments the eager bucket would pass: ``torch.ops.fused_sched.adam_step_`` / ``sgd_step_`` (C++: the CPU
  kernels for CPU tensors, the CUDA kernels for CUDA tensors with backend "cuda") or ``triton_adam_step_`` /
  ``triton_sgd_step_`` (the Triton kernels, custom ops in backends/triton/adam.py and sgd.py); fake implementations let
  Dynamo trace them without running them;
* a fused clip's norm pass is one operator call over every bucket, ``fused_sched::grad_norm_clip`` (C++, CPU or
  CUDA) or ``fused_sched::triton_grad_norm_clip``, returning float32 [total_norm, clip_coef] computed as the eager
  path computes them;
* what a step writes besides tensors goes to the dict ``FusedOptimizer._slots``, never to an attribute of the
  optimizer: Dynamo (torch 2.13) silently drops attribute stores on a torch.optim.Optimizer.

No lr is read on the host: a scheduled lr is evaluated by the kernels from the schedule program at the device step
counter, and a tensor lr is copied into the hyper table by a traced tensor operation
(``FusedOptimizer._device_values``). A float lr in a param group is still guarded on, as Dynamo guards on every
param-group value of an optimizer: the scheduler's first change recompiles once, after which automatic dynamic
shapes make it an (unused) input, as with torch.optim.

Not traced: DTensor parameters (FSDP2), whose local shards and their gradients the eager buckets lend and take back
around the call; their step runs the eager path through ``torch.compiler.disable`` (one deliberate graph break). A
rejected step takes the same way, so that the eager step raises its error as it is.
"""

from __future__ import annotations

import torch
import torch._dynamo

from .. import backends
from . import _plan, _tensors


def step(opt) -> None:
    """FusedOptimizer.step's body (after the closure) under torch.compile."""
    if opt._uses_state_formats() or not opt._traceable:
        # The list ops take float32 states only: low-memory formats run the eager step (one graph break), as does
        # Muon (its Newton-Schulz matmuls run between two kernel passes on the eager plan's workspaces).
        eager_step(opt)
        return
    relayout = _prepare(opt, True)
    if relayout is None:
        eager_step(opt)  # rejected: the eager step raises its error
        return
    rows = opt._current_rows()
    buckets = gather(opt, relayout, with_state=True)
    if buckets is None:
        eager_step(opt)
        return
    # No attribute of opt is written from here on: Dynamo would drop the store (see FusedOptimizer.last_grad_norm).
    # _prepare wrote _rows, _plan, _amp_seen and the cached tables eagerly; the clip's results go to a dict.
    grad_scale = getattr(opt, "grad_scale", None)
    found_inf = getattr(opt, "found_inf", None)
    slots = opt._slots
    slots["stepped"] = True
    clip = slots["pending"]
    if clip is not None:
        slots["pending"] = None
    elif opt.max_grad_norm is not None and buckets:
        slots["norm"], clip = clip_pass(buckets, opt.max_grad_norm, 2.0, grad_scale)
    tables = {}
    for bucket in buckets:
        table, amp = opt._bucket_inputs(bucket["device"], rows, tables, grad_scale, found_inf, clip)
        opt._run_lists(bucket, table, amp)
        for param, dense in bucket["standins"]:
            param.copy_(dense)


def clip_grad_norm(opt, max_norm: float, norm_type: float):
    """FusedOptimizer.clip_grad_norm_'s norm pass under torch.compile: (total norm, {device: clip coefficient}),
    or None where the eager path must run (DTensor parameters, a rejected call)."""
    relayout = _prepare(opt, False)
    if relayout is None:
        return None  # rejected: the eager clip_grad_norm_ raises its error
    opt._current_rows()
    buckets = gather(opt, relayout, with_state=False)
    if buckets is None:
        return None
    if not buckets:
        return torch.tensor(0.0), None
    return clip_pass(buckets, max_norm, norm_type, None)


def gather(opt, relayout: tuple, with_state: bool = True) -> list[dict] | None:
    """The buckets of this step, as FusedOptimizer._build_plan forms them (same order), as dicts of tensor lists;
    None when a parameter with a gradient is a DTensor (the eager path handles those). relayout: the ids of the
    params whose gradient is laid out otherwise (from _prepare). with_state: with the state tensors, which _prepare
    created (the step); without, the gradients only (a clip's norm pass)."""
    with_grad = []
    param_id = 0
    for index, group in enumerate(opt.param_groups):
        master_group = bool(group.get("master_weights"))
        for p in group["params"]:
            if p.grad is not None:
                with_grad.append((index, master_group, p, param_id))
            param_id += 1
    for _, _, p, _ in with_grad:
        if _tensors.is_dtensor(p) or _tensors.is_dtensor(p.grad):
            return None
    resolved = {}
    for _, _, p, _ in with_grad:
        if p.device not in resolved:
            resolved[p.device] = backends.resolve(opt.backend, p.device)
    if "triton" in resolved.values():
        from ..backends.triton import runner  # noqa: F401  (registers the Triton custom ops)
    buckets = []
    by_key = {}
    for index, master_group, p, pid in with_grad:
        grad = p.grad
        if pid in relayout:
            # The kernels walk a gradient as the flat array of its parameter: a gradient laid out otherwise is
            # replaced by an equal one in the parameter's layout, as _build_plan does. Decided by _prepare: Dynamo
            # cannot compare strides that automatic dynamic shapes made symbolic. Should a later gradient's layout
            # differ from the trace's without a guard noticing, the operators refuse it.
            grad = torch.empty_like(p, memory_format=torch.preserve_format).copy_(grad)
            p.grad = grad
        key = (p.device, p.dtype)
        bucket = by_key.get(key)
        if bucket is None:
            bucket = by_key[key] = {
                "device": p.device, "dtype": p.dtype, "backend": resolved[p.device], "params": [], "grads": [],
                "group_index": [], "param_ids": [], "master": [], "standins": [],
            }
            buckets.append(bucket)
        if not _tensors.is_dense(p):
            # Elements not dense in memory (a view that skips some): the kernels update a dense copy, written back
            # after the launch (FusedOptimizer's Bucket.standins).
            dense = p.contiguous()
            bucket["standins"].append((p, dense))
            p = dense
        bucket["params"].append(p)
        bucket["grads"].append(grad)
        bucket["group_index"].append(index)
        bucket["param_ids"].append(pid)
        bucket["master"].append(master_group and p.dtype != torch.float32)
    if not with_state:
        return buckets
    # Each param's state dict by param id, listed by _prepare: reading opt.state[p] here would make Dynamo fetch it
    # at every call by its position among the keys of opt.state (keys are tensors), a walk over the keys each time.
    states_of = opt._slots["states"]
    for bucket in buckets:
        device = bucket["device"]
        param_states = [states_of[i] for i in bucket["param_ids"]]
        states = []
        for key in opt._state_keys:
            column = [state.get(key) for state in param_states]
            if any([t is not None for t in column]):
                # An empty tensor where a param has no such state (a mutable list must not repeat a tensor).
                column = [_empty(device) if t is None else t for t in column]
            else:
                column = []
            states.append(column)
        bucket["states"] = states
        bucket["steps"] = [state["step"] for state in param_states] if opt._has_step else []
        if any(bucket["master"]):
            bucket["masters"] = [state[_plan.MASTER_KEY] if m else _empty(device)
                                 for state, m in zip(param_states, bucket["master"], strict=True)]
        else:
            bucket["masters"] = None
    return buckets


@torch._dynamo.assume_constant_result
def _prepare(opt, with_state: bool) -> tuple | None:
    """The host-side work of a step's first trace, run eagerly while Dynamo traces (as torch.optim's _init_group
    is) and before the traced code reads what it writes: _current_rows (the group checks, the cached rows),
    _build_plan's checks, then (with_state) the missing state, created as the eager step creates it, and the hyper
    tables, step_advance flags and schedule tables and counters of the step's devices. The graph takes all of these
    as inputs from its first call on, so the second call finds what the first was traced with: no recompilation
    (but for SGD's new momentum buffers, see below). Guards: the traced code reads again what these read (the param
    groups, every gradient and state tensor). Returns the ids of the params whose gradient is laid out unlike the
    param (a tuple), or None for a rejected step, before anything is written: the caller then runs the eager step,
    which raises the error.

    SGD's fresh flags (a momentum buffer's first step takes the gradient as it is) are held in _slots["fresh"] (param
    ids), which the traced step reads (a guard) and clears: the step after a buffer's first is traced anew, as with
    torch.optim.SGD, whose compiled step creates its buffers. A buffer counts as fresh until a step fills it: one an
    eager plan created is carried over from the plan, and _settle_fresh() puts back those whose step GradScaler's
    found_inf skipped (found out here, on the host, instead of in the graph)."""
    if torch.compiler.is_dynamo_compiling():
        # Traced, not run: Dynamo compiles this function as a frame of its own only when a caller's frame was given
        # up (a graph break inside a loop), and its attribute stores would then be dropped. Run it eagerly instead.
        # (is_dynamo_compiling() is False whenever Python really runs this, at trace time included.)
        return _prepare_eagerly(opt, with_state)
    try:
        return _prepare_or_raise(opt, with_state)
    except (ValueError, RuntimeError):
        # An exception raised here would reach the user wrapped in Dynamo's InternalTorchDynamoError: the step
        # runs eagerly instead (a graph break), which raises it as the eager step does. Nothing was written.
        return None


def _prepare_or_raise(opt, with_state: bool) -> tuple:
    rows = opt._current_rows()
    if getattr(opt, "found_inf", None) is not None:
        opt._note_amp_step()  # the traced code reads found_inf: a new one makes a new trace
    with_grad = []
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                with_grad.append((group, p))
    devices = []
    for group, p in with_grad:
        opt._check_param(p, group)
        backends.resolve(opt.backend, p.device)
        if p.device not in devices:
            devices.append(p.device)
    # Accepted: from here on state may be written.
    opt._settle_fresh()
    params = [p for group in opt.param_groups for p in group["params"]]
    param_ids = {id(p): i for i, p in enumerate(params)}
    fresh = set(opt._slots["fresh"])
    plan, opt._plan = opt._plan, None  # the eager path builds a new plan after compiled steps
    if plan is not None and opt._fresh_first_state:
        for bucket in plan.buckets:
            fresh.update(param_ids[id(p)] for p, flag in zip(bucket.params, bucket.fresh, strict=True) if flag)
    if with_state:
        block_size = opt._block_size()
        for group, p in with_grad:
            created, _ = opt._init_state(p, group, opt._needed_states(group), opt._moment_format(group, p),
                                         block_size)
            if created and opt._fresh_first_state:
                fresh.add(param_ids[id(p)])
        for device in devices:
            opt._hyper_table(device, rows)
            opt._step_advance(device)
            opt._schedule_args(device)
        # The same dicts as in opt.state (a state tensor replaced in one is seen); load_state_dict drops the list.
        opt._slots["states"] = [opt.state.get(p) for p in params]
    opt._slots["fresh"] = tuple(sorted(fresh))
    return tuple(param_ids[id(p)] for _, p in with_grad
                 if _tensors.local_shard(p.grad).stride() != _tensors.walked_strides(_tensors.local_shard(p)))


def clip_pass(buckets: list[dict], max_norm: float, norm_type: float, grad_scale):
    """FusedOptimizer._clip_pass over gathered buckets: (total norm, {device: clip coefficient})."""
    devices = []
    for bucket in buckets:
        if bucket["device"] not in devices:
            devices.append(bucket["device"])
    if len(devices) != 1:
        raise ValueError("fused gradient clipping needs every parameter with a gradient on one device; got "
                         f"{sorted(map(str, devices))}")
    device = devices[0]
    scale = _tensors.on_device(grad_scale, device)
    grads = [g for bucket in buckets for g in bucket["grads"]]
    sizes = [len(bucket["grads"]) for bucket in buckets]
    if buckets[0]["backend"] == "triton":  # one device, so one backend
        out = torch.ops.fused_sched.triton_grad_norm_clip(grads, sizes, float(norm_type), float(max_norm), scale)
    else:  # the C++ operator: CPU or CUDA kernels, as the gradients' device dispatches
        out = torch.ops.fused_sched.grad_norm_clip(grads, sizes, float(norm_type), float(max_norm), scale)
    return out[0], {device: out[1:2]}


def _empty(device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.float32, device=device)


def _eager_step(opt) -> None:
    # Not opt.step(): the optimizer hooks of the patched step already ran around the compiled call.
    opt._step_eagerly()


def _eager_clip(opt, max_norm: float, norm_type: float, error_if_nonfinite: bool) -> torch.Tensor:
    return opt._clip_grad_norm_eagerly(max_norm, norm_type, error_if_nonfinite)


# This module is imported only while Dynamo traces (FusedOptimizer.step imports it then), so torch.compiler.disable
# (which imports torch._dynamo, seconds) costs `import fused_sched` nothing.
_REASON = ("fused_sched: the eager step runs what the compiled one does not handle: DTensor parameters (FSDP2), "
           "updated through their local shards, low-memory state formats, Muon, and a rejected step, whose error it "
           "raises")
eager_step = torch.compiler.disable(_eager_step, reason=_REASON)
_prepare_eagerly = torch.compiler.disable(_prepare, reason="fused_sched: the host side of a compiled step")
eager_clip = torch.compiler.disable(_eager_clip, reason=_REASON)

# Resolved now, not first while Dynamo traces: _prepare (run eagerly during a trace) would resolve it between two
# analysis passes of one frame, and Dynamo requires a restarted pass to take the path of the first.
_tensors.dtensor_class()
