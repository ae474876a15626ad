"""Machinery shared by fused_sched's optimizers: buckets, lazy state, the hyper-parameter table, state_dict.

A step runs in three parts:

1. ``_current_plan()``: the plan groups every parameter that has a gradient into (device, dtype) buckets held
   on the C++ side (``OptimBucket``). A plan is built once and reused while every bucket reports that its
   gradients are present and laid out like their parameters and no parameter without a gradient got one; any
   other change (a grad appearing or vanishing, a dtype or device change, ``add_param_group``,
   ``load_state_dict``) rebuilds it. Building validates everything before it creates any state.
2. ``_hyper_table(device)``: one float64 row per param group (``fused_sched._hyper``), rebuilt only when a
   group's values change.
3. One backend call per bucket.

A rejected step raises before anything is written: parameters and state are untouched.
"""

from __future__ import annotations

from itertools import chain

import torch
from torch.optim import Optimizer

from .. import _hyper, backends
from .._extension import load_extension

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _Bucket:
    """The parameters of one (device, dtype) bucket, their state and the backend that updates them."""

    __slots__ = ("device", "dtype", "backend", "params", "group_index", "native", "fresh", "runner")

    def __init__(self, device, dtype, backend, params, group_index):
        self.device = device
        self.dtype = dtype
        self.backend = backend
        self.params = params
        self.group_index = group_index
        self.native = None
        self.fresh = None
        self.runner = None


class _Plan:
    __slots__ = ("buckets", "watch")

    def __init__(self, buckets, watch):
        self.buckets = buckets
        self.watch = watch

    def current(self) -> bool:
        if not self.watch.still_none():
            return False
        return all(b.native.refresh_grads() == "" for b in self.buckets)


class FusedOptimizer(Optimizer):
    """Base class: subclasses define the state keys, the validation, the hyper row and the backend call."""

    #: State tensors in kernel order, named as torch.optim names them.
    _state_keys: tuple[str, ...] = ()
    #: True when the optimizer keeps torch's per-parameter ``step`` tensor.
    _has_step = False
    #: Kernel family: "adam" or "sgd".
    _algorithm = ""

    def __init__(self, params, defaults: dict, backend: str = "auto"):
        backends.check_name(backend)
        self._validate_group(defaults)
        load_extension()
        self.backend = backend
        self._plan = None
        self._rows = None
        self._hyper = {}
        self._schedule = None
        super().__init__(params, defaults)

    # -- subclass hooks -------------------------------------------------------------------------------------
    def _validate_group(self, group: dict) -> None:
        raise NotImplementedError

    def _row(self, group: dict) -> tuple:
        raise NotImplementedError

    def _needed_states(self, group: dict) -> tuple[bool, ...]:
        """Which of ``_state_keys`` a param of this group needs."""
        raise NotImplementedError

    def _momentum_column(self) -> int:
        """The hyper column that a schedule's momentum target drives (Adam: beta1, SGD: momentum)."""
        raise NotImplementedError

    def _run_bucket(self, bucket: _Bucket, hyper: torch.Tensor) -> None:
        raise NotImplementedError

    # -- torch.optim.Optimizer API -------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        candidate = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._validate_group(candidate)
        super().add_param_group(param_group)
        self._invalidate()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")
        self.__dict__.setdefault("_schedule", None)
        self._invalidate()

    # -- device schedules (fused_sched._scheduler_base) ------------------------------------------------------
    def _attach_schedule(self, binding) -> None:
        """Make `binding` (a scheduler's programs and step counters) the source of the learning rates."""
        if len(binding.programs) != len(self.param_groups):
            raise ValueError(f"the scheduler describes {len(binding.programs)} param groups but the optimizer has "
                             f"{len(self.param_groups)}")
        self._schedule = binding
        self._rows = None
        self._hyper = {}

    def _detach_schedule(self, binding) -> None:
        if self._schedule is binding:
            self._schedule = None
            self._rows = None
            self._hyper = {}

    def _schedule_args(self, device: torch.device) -> tuple:
        binding = self._schedule
        if binding is None:
            return None, None
        return binding.table(device), binding.counter(device)

    def _invalidate(self) -> None:
        self._plan = None
        self._rows = None
        self._hyper = {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict saved by this class or by its torch.optim counterpart.

        States are kept in float32 on the parameter's device whatever the parameter dtype (torch would cast them
        to the parameter dtype), and ``step`` becomes a float32 tensor on that device.
        """
        saved_state = state_dict["state"]
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        if len(saved_ids) == len(params):
            for saved_id, p in zip(saved_ids, params, strict=True):
                for key, value in saved_state.get(saved_id, {}).items():
                    if key in self._state_keys and isinstance(value, torch.Tensor) and value.shape != p.shape:
                        raise ValueError(
                            f"loaded state {key!r} of shape {tuple(value.shape)} does not match its parameter of "
                            f"shape {tuple(p.shape)}"
                        )
        super().load_state_dict(state_dict)
        for saved_id, p in zip(saved_ids, params, strict=True):
            saved = saved_state.get(saved_id)
            if not saved:
                continue
            state = self.state[p]
            for key, value in saved.items():
                if key == "step":
                    state["step"] = torch.tensor(float(value), dtype=torch.float32, device=p.device)
                elif key in self._state_keys and isinstance(value, torch.Tensor):
                    fresh = torch.empty_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                    state[key] = fresh.copy_(value)
        self._invalidate()

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rows = self._current_rows()
        plan = self._plan
        if plan is None or not plan.current():
            plan = self._plan = self._build_plan()
        tables = {}
        for bucket in plan.buckets:
            table = tables.get(bucket.device)
            if table is None:
                table = tables[bucket.device] = self._hyper_table(bucket.device, rows)
                self._device_values(table)
            self._run_bucket(bucket, table)
        return loss

    def _device_values(self, table: torch.Tensor) -> None:
        """Copy the learning rates held in accelerator tensors into `table` on the device: device-to-device,
        no sync, and captured by a CUDA graph like the kernel (torch's fused optimizers read a tensor lr the same
        way)."""
        for g, group in enumerate(self.param_groups):
            lr = group["lr"]
            if _hyper.is_device_tensor(lr):
                table[g, _hyper.LR].copy_(lr.reshape(()), non_blocking=True)

    # -- plan ----------------------------------------------------------------------------------------------
    def _current_rows(self) -> list:
        rows = [self._row(g) for g in self.param_groups]
        binding = self._schedule
        if binding is not None:
            if len(binding.programs) != len(rows):
                raise ValueError(f"the attached scheduler describes {len(binding.programs)} param groups but the "
                                 f"optimizer has {len(rows)} (a group was added after the scheduler was built)")
            # The kernels take these values from the schedule programs: the host copies that the scheduler keeps
            # in the param groups must not cause a table upload at every step.
            momentum_column = self._momentum_column()
            for g, row in enumerate(rows):
                if binding.lr_groups[g] or binding.momentum_groups[g]:
                    row = list(row)
                    if binding.lr_groups[g]:
                        row[_hyper.LR] = 0.0
                    if binding.momentum_groups[g]:
                        row[momentum_column] = 0.0
                    rows[g] = tuple(row)
        if rows != self._rows:
            for g in self.param_groups:
                self._validate_group(g)
            if self._rows is not None and len(rows) == len(self._rows):
                # A change of a value that decides which state exists (amsgrad, momentum != 0) needs a new plan.
                if [self._needed_states(g) for g in self.param_groups] != getattr(self, "_needs", None):
                    self._plan = None
            self._needs = [self._needed_states(g) for g in self.param_groups]
            self._rows = rows
            self._hyper = {}
        return rows

    def _hyper_table(self, device: torch.device, rows: list) -> torch.Tensor:
        table = self._hyper.get(device)
        if table is None:
            table = torch.tensor(rows, dtype=torch.float64).reshape(len(rows), _hyper.COLUMNS)
            if device.type != "cpu":
                table = table.pin_memory().to(device, non_blocking=True)
            self._hyper[device] = table
        return table

    def _check_param(self, p: torch.Tensor) -> None:
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
        if not _dense(p):
            raise ValueError("fused_sched needs parameters whose elements are dense in memory (a view that skips "
                             "elements cannot be updated in place by a fused kernel)")
        for key in self._state_keys:
            value = self.state.get(p, {}).get(key)
            if isinstance(value, torch.Tensor) and value.shape != p.shape:
                raise ValueError(f"state {key!r} of shape {tuple(value.shape)} does not match its parameter of "
                                 f"shape {tuple(p.shape)}")

    def _build_plan(self) -> _Plan:
        with_grad, without_grad = [], []
        for index, group in enumerate(self.param_groups):
            needs = self._needed_states(group)
            for p in group["params"]:
                if p.grad is None:
                    without_grad.append(p)
                else:
                    with_grad.append((index, needs, p))
        # Validate everything first: a rejected step must not leave half-created state behind.
        resolved = {}
        for _, _, p in with_grad:
            self._check_param(p)
            if p.device not in resolved:
                resolved[p.device] = backends.resolve(self.backend, p.device)
        for _, _, p in with_grad:
            if p.grad.stride() != p.stride():
                # The kernels walk a gradient as the flat array of its parameter: a gradient laid out otherwise
                # (a transposed or sliced view) is replaced by an equal one in the parameter's layout, as torch's
                # fused path copies it to a contiguous temporary. Such a plan is rebuilt at every step.
                p.grad = torch.empty_like(p, memory_format=torch.preserve_format).copy_(p.grad)
        by_key: dict = {}
        for index, needs, p in with_grad:
            created = self._init_state(p, needs)
            by_key.setdefault((p.device, p.dtype), []).append((index, p, created))
        buckets = []
        native = load_extension()
        for (device, dtype), members in by_key.items():
            bucket = _Bucket(device, dtype, resolved[device], [m[1] for m in members], [m[0] for m in members])
            states = []
            for key in self._state_keys:
                column = [self.state[p].get(key) for p in bucket.params]
                if any(t is not None for t in column):
                    placeholder = torch.empty(0, dtype=torch.float32, device=device)
                    column = [t if t is not None else placeholder for t in column]
                    states.append(column)
                else:
                    states.append([])
            steps = [self.state[p]["step"] for p in bucket.params] if self._has_step else []
            bucket.native = native.OptimBucket(bucket.params, states, steps, bucket.group_index)
            if bucket.backend == "triton":
                from ..backends.triton_backend import TritonBucketRunner

                bucket.runner = TritonBucketRunner(device, dtype, self._algorithm)
            # SGD: a momentum buffer created by this step takes the gradient as it is (torch clones it).
            bucket.fresh = [int(m[2]) for m in members]
            problem = bucket.native.refresh_grads()
            if problem:
                raise RuntimeError(f"fused_sched: internal error, a freshly built bucket is stale ({problem})")
            buckets.append(bucket)
        return _Plan(buckets, native.NoGradWatch(without_grad))

    def _init_state(self, p: torch.Tensor, needs: tuple[bool, ...]) -> bool:
        """Create the missing state of `p` as torch does at its first step; True when the first state tensor
        (SGD's momentum buffer) was created now."""
        state = self.state[p]
        if self._has_step and "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        created = False
        for k, (key, needed) in enumerate(zip(self._state_keys, needs, strict=True)):
            if needed and key not in state:
                state[key] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                created = created or k == 0
        return created


def _dense(t: torch.Tensor) -> bool:
    """True when the elements of `t` fill a contiguous block of memory in some order (no gaps, no overlap)."""
    if t.numel() <= 1:
        return True
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape, strict=True) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True
