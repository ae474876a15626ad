"""A step's plan: the (device, dtype) buckets of the parameters with a gradient, their checks and their state."""

from __future__ import annotations

from itertools import chain

import torch

from .. import backends
from .._extension import load_extension
from . import state_format as sf
from ._state_format_plan import MASTER_KEY, StateFormatMixin, absmax_view, master_mode
from ._tensors import dense_copy, is_dense, is_dtensor, local_shard, walked_strides

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Bucket:
    """The parameters of one (device, dtype) bucket, their state and the backend that updates them.

    ``sharded``: (DTensor param, its local shard) pairs when the parameters are DTensors (FSDP2): the C++ bucket
    holds the local shards, and the gradients' local shards are handed to them before every check
    (``lend_local_grads``) and taken back once the step is launched (``return_local_grads``).

    ``standins``: (param, dense copy) pairs for parameters whose elements are not dense in memory (a view that skips
    elements, ``w[:, ::2]``), which a kernel walking flat memory cannot update in place: the C++ bucket holds a
    dense copy, which takes the parameter's values and gradient before every check (``lend_standins``), and whose
    updated values are scattered back into the parameter once the step is launched (``return_standins``): two
    extra copies of such parameters per step, the others untouched."""

    __slots__ = ("device", "dtype", "backend", "params", "group_index", "native", "fresh", "runner", "sharded",
                 "param_ids", "standins", "family", "extra")

    def __init__(self, device, dtype, backend, params, group_index, family=""):
        self.device = device
        self.dtype = dtype
        self.backend = backend
        self.family = family  # the kernel family that updates it (FusedOptimizer._algorithm, or a group's)
        self.extra = None  # what one family keeps beside the C++ bucket (Muon: its Newton-Schulz work)
        self.params = params
        self.group_index = group_index
        self.native = None
        self.fresh = None
        self.runner = None
        self.sharded = None
        self.param_ids = None
        self.standins = None

    def lend_local_grads(self) -> None:
        for param, local in self.sharded:
            grad = param.grad
            local.grad = None if grad is None else local_shard(grad)

    def return_local_grads(self) -> None:
        # A local shard must not keep its gradient alive after zero_grad(set_to_none=True) of the DTensor.
        for _, local in self.sharded:
            local.grad = None

    def lend_standins(self) -> None:
        for param, dense in self.standins:
            dense.copy_(param)  # values written into the parameter by hand since the last step
            grad = param.grad
            dense.grad = None if grad is None else dense_copy(grad, dense)

    def return_standins(self) -> None:
        for param, dense in self.standins:
            param.copy_(dense)
            dense.grad = None


class Plan:
    __slots__ = ("buckets", "watch")

    def __init__(self, buckets, watch):
        self.buckets = buckets
        self.watch = watch

    def current(self) -> bool:
        if not self.watch.still_none():
            return False
        for b in self.buckets:
            if b.sharded:
                b.lend_local_grads()
            if b.standins:
                b.lend_standins()
            if b.native.refresh_grads() != "":
                return False
        return True


class PlanMixin(StateFormatMixin):
    """FusedOptimizer's plan: the checks of a step's parameters, the missing state created as torch creates it, and
    the buckets handed to the C++ side and the backends."""

    def _check_param(self, p: torch.Tensor, group: dict) -> None:
        g = p.grad
        name = type(self).__name__
        if g.is_sparse:
            raise RuntimeError(f"{name} does not support sparse gradients")
        if p.is_complex():
            raise ValueError(f"fused_sched.{name} does not support complex parameters; view them as real pairs "
                             "with torch.view_as_real")
        if p.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"fused_sched.{name} supports float32, bfloat16 and float16 parameters, got {p.dtype}")
        if g.dtype != p.dtype:
            raise ValueError(f"gradient dtype {g.dtype} differs from parameter dtype {p.dtype}")
        if g.shape != p.shape:
            raise ValueError(f"gradient shape {tuple(g.shape)} differs from parameter shape {tuple(p.shape)}")
        if g.device != p.device:
            raise ValueError(f"gradient on {g.device} but parameter on {p.device}")
        if is_dtensor(p) or is_dtensor(g):
            if not (is_dtensor(p) and is_dtensor(g)) or g.placements != p.placements:
                raise ValueError("a DTensor parameter needs a DTensor gradient with the same placements (fused_sched "
                                 "updates the local shards), got "
                                 f"{getattr(p, 'placements', 'a plain tensor')} and "
                                 f"{getattr(g, 'placements', 'a plain tensor')}")
            if local_shard(g).shape != local_shard(p).shape:
                raise ValueError(f"gradient shard of shape {tuple(local_shard(g).shape)} differs from the parameter's "
                                 f"{tuple(local_shard(p).shape)}")
        if group.get("stochastic_rounding") and p.dtype == torch.float16:
            raise ValueError("stochastic_rounding rounds bfloat16 parameters; a float16 parameter needs "
                             "master_weights=True instead")
        if is_dtensor(p) and not is_dense(local_shard(p)):
            raise ValueError("fused_sched needs DTensor parameters whose local shards are dense in memory (a view "
                             "that skips elements)")
        for key in self._state_keys:
            value = self.state.get(p, {}).get(key)
            if isinstance(value, torch.Tensor) and value.shape != p.shape:
                raise ValueError(f"state {key!r} of shape {tuple(value.shape)} does not match its parameter of "
                                 f"shape {tuple(p.shape)}")

    def _build_plan(self) -> Plan:
        # Momentum buffers that compiled steps left unfilled (fused_sched/optim/_compiled.py): this plan's to fill.
        self._settle_fresh()
        fresh_ids = self._slots["fresh"]
        with_grad, without_grad = [], []
        param_ids = {id(p): i for i, p in enumerate(chain.from_iterable(g["params"] for g in self.param_groups))}
        for index, group in enumerate(self.param_groups):
            needs = self._needed_states(group)
            for p in group["params"]:
                if p.grad is None:
                    without_grad.append(p)
                else:
                    with_grad.append((index, needs, p))
        # Validate everything first: a rejected step must not leave half-created state behind.
        resolved = {}
        for index, _, p in with_grad:
            self._check_param(p, self.param_groups[index])
            if p.device not in resolved:
                resolved[p.device] = backends.resolve(self.backend, p.device)
        for _, _, p in with_grad:
            if local_shard(p.grad).stride() != walked_strides(local_shard(p)):
                # The kernels walk a gradient as the flat array of its parameter: a gradient laid out otherwise
                # (a transposed or sliced view) is replaced by an equal one in the parameter's layout, as torch's
                # fused path copies it to a contiguous temporary. Such a plan is rebuilt at every step.
                if is_dtensor(p):
                    raise ValueError("a DTensor gradient whose local shard is laid out unlike its parameter's is not "
                                     "supported")
                p.grad = torch.empty_like(p, memory_format=torch.preserve_format).copy_(p.grad)
        block_size = self._block_size()
        formats = {}
        for index, _, p in with_grad:
            formats[id(p)] = self._moment_format(self.param_groups[index], p)
            if master_mode(self.param_groups[index], p) == "remainder" and p.dtype != torch.bfloat16:
                raise ValueError(f"master_weights='remainder' keeps the low 16 bits of bfloat16 parameters; a "
                                 f"{p.dtype} parameter needs master_weights=True")
        by_key: dict = {}
        for index, needs, p in with_grad:
            created, mode = self._init_state(p, self.param_groups[index], needs, formats[id(p)], block_size)
            family = self._group_family(self.param_groups[index])
            by_key.setdefault((p.device, p.dtype, family), []).append((index, p, created, mode))
        buckets = []
        native = load_extension()
        for (device, dtype, family), members in by_key.items():
            bucket = Bucket(device, dtype, resolved[device], [m[1] for m in members], [m[0] for m in members], family)
            placeholder = torch.empty(0, dtype=torch.float32, device=device)  # "no such tensor"
            states = []
            for key in self._family_state_keys(family):
                column = [self.state[p].get(key) for p in bucket.params]
                if any(t is not None for t in column):
                    states.append([local_shard(t) if t is not None else placeholder for t in column])
                else:
                    states.append([])
            if self._family_has_step(family):
                steps = [self.state[p]["step"] for p in bucket.params]
            elif any(self._needs_step(self.param_groups[m[0]], formats[id(m[1])]) for m in members):
                # SGD: the steps of bfloat16 momentum buffers rounded stochastically (a step left from an earlier
                # setting of the group is kept as it is, not advanced)
                steps = [self.state[m[1]]["step"] if self._needs_step(self.param_groups[m[0]], formats[id(m[1])])
                         else placeholder for m in members]
            else:
                steps = []
            masters = []
            if any(m[3] for m in members):
                keys = {"copy": MASTER_KEY, "remainder": sf.REMAINDER_KEY}
                masters = [local_shard(self.state[m[1]][keys[m[3]]]) if m[3] else placeholder for m in members]
            column_of = [sf.format_column(formats[id(m[1])], m[3] == "remainder", block_size) for m in members]
            absmax, qmap = [], None
            if any(formats[id(p)] == sf.BLOCKWISE_8BIT for p in bucket.params):
                qmap = sf.qmap(device)
                for key in self._state_keys[:2]:
                    column = [self.state[p].get(key + sf.ABSMAX_SUFFIX) for p in bucket.params]
                    absmax.append([placeholder if a is None else absmax_view(a, p, block_size)
                                   for a, p in zip(column, bucket.params, strict=True)])
                absmax += [[]] * (2 - len(absmax))  # SGD: no second state
            ids = bucket.param_ids = [param_ids[id(p)] for p in bucket.params]
            locals_ = [local_shard(p) for p in bucket.params]
            standins = [(i, p) for i, p in enumerate(locals_) if not is_dense(p)]
            if standins:
                bucket.standins = []
                for i, p in standins:
                    dense = locals_[i] = torch.empty_like(p, memory_format=torch.preserve_format)
                    bucket.standins.append((p, dense))
                bucket.lend_standins()
            if any(is_dtensor(p) for p in bucket.params):
                bucket.sharded = [(p, local) for p, local in zip(bucket.params, locals_, strict=True)
                                  if is_dtensor(p)]
                bucket.lend_local_grads()
            states, steps = self._family_tensors(bucket, locals_, states, steps)
            bucket.native = native.OptimBucket(locals_, states, steps, bucket.group_index, masters, ids,
                                               column_of if any(column_of) else [], absmax, qmap)
            if bucket.backend == "triton":
                from ..backends.triton.runner import TritonBucketRunner

                bucket.runner = TritonBucketRunner(device, dtype, family, block_size=block_size)
            elif bucket.backend == "cuda":
                from ..backends.cuda_backend import CudaBucketRunner

                bucket.runner = CudaBucketRunner(device, dtype, family)
            # SGD: a momentum buffer created by this step takes the gradient as it is (torch clones it).
            bucket.fresh = [int(m[2] or i in fresh_ids) for m, i in zip(members, ids, strict=True)]
            problem = bucket.native.refresh_grads()
            if problem:
                raise RuntimeError(f"fused_sched: internal error, a freshly built bucket is stale ({problem})")
            buckets.append(bucket)
        if fresh_ids:
            self._slots["fresh"] = ()  # the buckets hold them now
        return Plan(buckets, native.NoGradWatch(without_grad))

    # -- optimizer families: one kernel family per optimizer, or per param group (MuonWithAdamW) --------------
    def _group_family(self, group: dict) -> str:
        """The kernel family that updates `group`'s params (its buckets' runner and state keys)."""
        return self._algorithm

    def _family_state_keys(self, family: str) -> tuple[str, ...]:
        """The state keys a bucket of `family` hands its kernels, in kernel order."""
        return self._state_keys

    def _family_has_step(self, family: str) -> bool:
        return self._has_step

    def _needs_step(self, group: dict, moment_format: int) -> bool:
        """Whether a param of `group` whose states are in `moment_format` keeps a ``step`` (every param of a
        family that has one; SGD: only a bfloat16 momentum buffer rounded stochastically)."""
        return self._family_has_step(self._group_family(group))

    def _family_tensors(self, bucket: Bucket, locals_: list, states: list, steps: list) -> tuple[list, list]:
        """The state lists and step tensors of the C++ bucket; a family that keeps more beside its state (Muon's
        workspaces and lr ratios) adds them here and may set ``bucket.extra``."""
        return states, steps

    def _settle_fresh(self) -> None:
        """Settles the fresh flags that compiled SGD steps left open (_slots["unfilled"]: param ids of momentum
        buffers that a step handed a GradScaler found_inf was the first to fill): where found_inf skipped that step
        the buffers were not filled and are fresh again (_slots["fresh"]). Reads found_inf on the host (a sync on
        an accelerator), once, when an eager plan or a new trace is built (fused_sched/optim/_compiled.py)."""
        slots = self._slots
        pending = slots["unfilled"]
        if pending is None:
            return
        slots["unfilled"] = None
        skipped = {i for ids, found_inf in pending if bool(found_inf.reshape(()) != 0) for i in ids}
        if skipped:
            slots["fresh"] = tuple(sorted(skipped.union(slots["fresh"])))

    def _init_state(self, p: torch.Tensor, group: dict, needs: tuple[bool, ...], moment_format: int,
                    block_size: int) -> tuple[bool, str | None]:
        """Create the missing state of `p` as torch does at its first step, in the formats the group asks
        (StateFormatMixin: a state held in another format is converted); returns (whether the first state tensor,
        SGD's momentum buffer, was created now, the master mode)."""
        state = self.state[p]
        if self._needs_step(group, moment_format) and "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        created = self._format_states(p, group, needs, moment_format, block_size)
        mode = self._format_master(p, group)
        # The kernels walk a state as the flat array of its parameter, so it must have the parameter's strides.
        # A parameter re-laid out since its state was made (p.data = a transposed tensor) gets its states copied
        # into its new layout, element by element as torch indexes them. (8-bit codes are re-quantized instead: their
        # blocks follow the flat layout.)
        for key in (*self._state_keys, MASTER_KEY, sf.REMAINDER_KEY):
            value = state.get(key)
            if isinstance(value, torch.Tensor) and local_shard(value).stride() != walked_strides(local_shard(p)):
                if value.dtype == torch.uint8:
                    raise ValueError(f"state {key!r} of 8-bit codes is laid out unlike its parameter (the parameter "
                                     "was re-laid out after its state was made); 8-bit states cannot follow it")
                state[key] = torch.empty_like(p, dtype=value.dtype, memory_format=torch.preserve_format).copy_(value)
        return created, mode
