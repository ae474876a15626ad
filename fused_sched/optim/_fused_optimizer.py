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

Large-model options (every backend):

* ``master_weights`` (param-group option): a bfloat16 / float16 parameter gets a float32 copy in its state
  (``master_param``, saved and loaded by state_dict); the update reads and writes the copy and writes the
  parameter, rounded to nearest even, in the same pass. A value written into such a parameter by hand is
  overwritten by its master copy at the next step.
* ``stochastic_rounding`` (Adam / AdamW param-group option): a bfloat16 parameter without a master copy is written
  with stochastic rounding, unbiased, from random bits that depend only on (``rounding_seed``, step, the param's
  index in the optimizer, element index).
* AMP: ``_step_supports_amp_scaling``: ``torch.amp.GradScaler.step`` hands the optimizer its ``grad_scale`` and
  ``found_inf`` tensors, which the kernels read on the device: gradients are divided by the scale, and when
  ``found_inf`` is set the whole step is skipped on the device (parameters, states and steps unchanged). A device
  scheduler bound to the optimizer then does not advance at its next ``step()`` either (the transformers Trainer
  skips the scheduler step on overflow; with fused_sched the decision needs no sync).
* Fused clipping: ``max_grad_norm`` (optimizer option) or ``clip_grad_norm_()`` (folded into the next step): one
  multi-tensor norm pass, whose last program computes torch.nn.utils.clip_grad_norm_'s coefficient on the device,
  then the update pass multiplies every gradient by it.
"""

from __future__ import annotations

import math
from itertools import chain

import torch
from torch.optim import Optimizer

from .. import _hyper, backends
from .._extension import load_extension

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _Bucket:
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
                 "param_ids", "standins")

    def __init__(self, device, dtype, backend, params, group_index):
        self.device = device
        self.dtype = dtype
        self.backend = backend
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
            local.grad = None if grad is None else _local(grad)

    def return_local_grads(self) -> None:
        # A local shard must not keep its gradient alive after zero_grad(set_to_none=True) of the DTensor.
        for _, local in self.sharded:
            local.grad = None

    def lend_standins(self) -> None:
        for param, dense in self.standins:
            dense.copy_(param)  # values written into the parameter by hand since the last step
            grad = param.grad
            dense.grad = None if grad is None else _dense_copy(grad, dense)

    def return_standins(self) -> None:
        for param, dense in self.standins:
            param.copy_(dense)
            dense.grad = None


class _Plan:
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


#: State key of a parameter's float32 master copy (master_weights).
MASTER_KEY = "master_param"

_NONFINITE = ("The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
              "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
              "`error_if_nonfinite=False`")


class FusedOptimizer(Optimizer):
    """Base class: subclasses define the state keys, the validation, the hyper row and the backend call."""

    # torch.amp.GradScaler.step hands grad_scale / found_inf to the optimizer instead of unscaling the gradients
    # and checking them on the host (which would synchronize).
    _step_supports_amp_scaling = True

    #: State tensors in kernel order, named as torch.optim names them.
    _state_keys: tuple[str, ...] = ()
    #: True when the optimizer keeps torch's per-parameter ``step`` tensor.
    _has_step = False
    #: Kernel family: "adam" or "sgd".
    _algorithm = ""
    #: True when the step that creates the first state tensor treats it apart (SGD: the new momentum buffer takes the
    #: gradient as it is, a "fresh" flag handed to the kernel).
    _fresh_first_state = False

    def __init__(self, params, defaults: dict, backend: str = "auto", max_grad_norm: float | None = None,
                 rounding_seed: int = 0):
        backends.check_name(backend)
        _check_max_norm(max_grad_norm, "max_grad_norm", allow_none=True)
        if not isinstance(rounding_seed, int) or isinstance(rounding_seed, bool) or not 0 <= rounding_seed < 2**63:
            raise ValueError(f"rounding_seed must be an int in [0, 2**63), got {rounding_seed!r}")
        self._validate_group(defaults)
        load_extension()
        self.backend = backend
        self.max_grad_norm = max_grad_norm
        self.rounding_seed = rounding_seed
        self._slots = _slots()
        self._plan = None
        self._rows = None
        self._hyper = {}
        self._schedule = None
        self._advance = {}
        self._amp_seen = False  # a GradScaler handed a found_inf to a step: schedulers may lag their host counts
        super().__init__(params, defaults)

    # A fused clip's results live in a dict (_slots) rather than in attributes: under torch.compile (torch 2.13)
    # Dynamo drops the attribute stores of a compiled function on a torch.optim.Optimizer (it does not track the
    # object as it tracks other user objects: no error, the stores are simply lost), while a dict's mutations are
    # replayed after the graph.
    @property
    def last_grad_norm(self) -> torch.Tensor | None:
        """The total gradient norm of the last fused clip (a device tensor; None before the first one)."""
        return self._slots["norm"]

    @last_grad_norm.setter
    def last_grad_norm(self, value: torch.Tensor | None) -> None:
        self._slots["norm"] = value

    @property
    def _pending_clip(self) -> dict | None:
        """{device: clip coefficient} of a clip_grad_norm_() that the next step applies; None when there is none."""
        return self._slots["pending"]

    @_pending_clip.setter
    def _pending_clip(self, value: dict | None) -> None:
        self._slots["pending"] = value

    # -- subclass hooks -------------------------------------------------------------------------------------
    def _validate_group(self, group: dict, at_step: bool = False) -> None:
        raise NotImplementedError

    def _row(self, group: dict) -> tuple:
        raise NotImplementedError

    def _needed_states(self, group: dict) -> tuple[bool, ...]:
        """Which of ``_state_keys`` a param of this group needs."""
        raise NotImplementedError

    def _momentum_column(self) -> int:
        """The hyper column that a schedule's momentum target drives (Adam: beta1, SGD: momentum)."""
        raise NotImplementedError

    def _run_bucket(self, bucket: _Bucket, hyper: torch.Tensor, amp: dict) -> None:
        """One backend call for `bucket`; amp: grad_scale, found_inf, clip_coef, step_advance (tensors or None)."""
        raise NotImplementedError

    def _run_lists(self, bucket: dict, hyper: torch.Tensor, amp: dict) -> None:
        """_run_bucket under torch.compile: one registered operator call on the tensor lists of `bucket`
        (fused_sched/optim/_compiled.py gather())."""
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
        self.__dict__.setdefault("max_grad_norm", None)
        self.__dict__.setdefault("rounding_seed", 0)
        self.__dict__.setdefault("_slots", _slots())
        for key, value in _slots().items():
            self._slots.setdefault(key, value)
        self.__dict__.setdefault("_advance", {})
        self.__dict__.setdefault("_amp_seen", False)
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
        self._slots["states"] = None

    def state_dict(self) -> dict:
        """torch.optim.Optimizer.state_dict. When GradScaler skipped steps that the bound scheduler's host
        bookkeeping counted, the groups' lr (and momentum) are first brought back to the schedule's (a device read,
        as the scheduler's own state_dict() does), so the saved groups hold the values the next step applies."""
        binding = self._schedule
        scheduler = binding.owner() if binding is not None else None
        if scheduler is not None:
            scheduler._sync_skipped_steps()
        return super().state_dict()

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
                    if ((key in self._state_keys or key == MASTER_KEY) and isinstance(value, torch.Tensor)
                            and value.shape != p.shape):
                        raise ValueError(
                            f"loaded state {key!r} of shape {tuple(value.shape)} does not match its parameter of "
                            f"shape {tuple(p.shape)}"
                        )
        # A torch.optim state_dict lacks fused_sched's own group options: __setstate__ fills them in from the
        # constructor's defaults.
        super().load_state_dict(state_dict)
        for saved_id, p in zip(saved_ids, params, strict=True):
            saved = saved_state.get(saved_id)
            if not saved:
                continue
            state = self.state[p]
            for key, value in saved.items():
                if key == "step":
                    state["step"] = torch.tensor(float(value), dtype=torch.float32, device=p.device)
                elif (key in self._state_keys or key == MASTER_KEY) and isinstance(value, torch.Tensor):
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
        if torch.compiler.is_compiling():
            # Traceable: no pybind11 object, one registered operator per bucket (imported only while tracing).
            from . import _compiled

            _compiled.step(self)
            return loss
        rows = self._current_rows()
        plan = self._plan
        if plan is None or not plan.current():
            plan = self._plan = self._build_plan()
        # Set by torch.amp.GradScaler.step for the duration of this call (_step_supports_amp_scaling).
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None:
            self._note_amp_step()
        slots = self._slots
        slots["stepped"] = True
        clip = slots["pending"]
        if clip is not None:
            slots["pending"] = None
        elif self.max_grad_norm is not None and plan.buckets:
            slots["norm"], clip = self._clip_pass(plan, self.max_grad_norm, 2.0, grad_scale)
        elif self.max_grad_norm is not None:
            slots["norm"] = self._clip_without_gradients(self.max_grad_norm, 2.0)
        tables = {}
        for bucket in plan.buckets:
            table, amp = self._bucket_inputs(bucket.device, rows, tables, grad_scale, found_inf, clip)
            self._run_bucket(bucket, table, amp)
            if bucket.sharded:
                bucket.return_local_grads()
            if bucket.standins:
                bucket.return_standins()
        return loss

    def _bucket_inputs(self, device: torch.device, rows: list, tables: dict, grad_scale, found_inf, clip):
        """The hyper table of `device` (built once per step and device in `tables`, tensor lrs copied in) and the
        per-step inputs of a bucket there: grad_scale, found_inf, clip_coef, step_advance (the eager and the
        compiled step)."""
        table = tables.get(device)
        if table is None:
            table = tables[device] = self._hyper_table(device, rows)
            self._device_values(table)
        amp = {
            "grad_scale": _on(grad_scale, device),
            "found_inf": _on(found_inf, device),
            "clip_coef": None if clip is None else clip.get(device),
            "step_advance": self._step_advance(device),
        }
        return table, amp

    def _step_advance(self, device: torch.device) -> torch.Tensor:
        """float64 [1] on `device`: whether an optimizer step ran since the bound scheduler's last step. The kernels
        set it to 1 when a step runs and leave it when GradScaler's found_inf skips one; the scheduler adds it to
        its step counter and clears it (ScheduleBinding.advance), once a GradScaler is in use."""
        advance = self._advance.get(device)
        if advance is None:
            advance = self._advance[device] = torch.zeros(1, dtype=torch.float64, device=device)
        return advance

    def _note_amp_step(self) -> None:
        """A step handed a GradScaler's found_inf. On the first one, the step_advance flags start to count: without
        a GradScaler every step ran, so a flag holds 1 exactly when an optimizer step came since the scheduler's
        last step, a fact the host knows (_slots["stepped"]); it is set so, and from now on the kernels keep it."""
        if self._amp_seen:
            return
        self._amp_seen = True
        if not self._slots["stepped"]:
            for flag in self._advance.values():  # a flag made later starts at 0
                flag.zero_()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim.Optimizer.zero_grad; also drops a pending clip_grad_norm_() coefficient, which belonged to
        the gradients being discarded."""
        self._pending_clip = None
        super().zero_grad(set_to_none)

    # -- fused gradient clipping ------------------------------------------------------------------------------
    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                        foreach: bool | None = None) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ over this optimizer's gradients, folded into the next ``step()``.

        One multi-tensor pass computes the total norm of every gradient the next step would use (as if the
        gradients were concatenated into one vector) and, on the device, the coefficient
        ``min(max_norm / (total_norm + 1e-6), 1)``; the next ``step()`` multiplies the gradients by it inside the
        update (the ``.grad`` tensors themselves are not modified). Non-finite norms behave as in torch: the
        coefficient becomes NaN (or 0 for an infinite norm) and so do the updates, unless ``error_if_nonfinite``,
        which raises a RuntimeError (and reads the norm on the host, which synchronizes).

        Under torch.amp.GradScaler call ``scaler.unscale_(optimizer)`` first, as with torch's function; or use the
        optimizer's ``max_grad_norm`` option, which clips inside ``step()`` after the scale is known.

        Args:
            max_norm (float): max norm of the gradients.
            norm_type (float): type of the p-norm: positive, or ``inf`` (default: 2.0).
            error_if_nonfinite (bool): raise when the total norm is NaN or infinite (default: False).
            foreach: accepted for compatibility with torch's signature; the pass is always fused.

        Returns:
            The total norm (a 0-dim float32 tensor on the parameters' device).
        """
        _check_max_norm(max_norm, "max_norm", allow_none=False)
        norm_type = float(norm_type)
        if not (norm_type > 0.0):
            raise ValueError(f"fused_sched clips with a positive or infinite norm_type, got {norm_type}")
        if torch.compiler.is_compiling():
            from . import _compiled

            result = _compiled.clip_grad_norm(self, float(max_norm), norm_type)
            if result is None:
                return _compiled.eager_clip(self, max_norm, norm_type, error_if_nonfinite)
            total, clip = result
            slots = self._slots  # no attribute store under torch.compile (see last_grad_norm)
            if clip is None:
                slots["pending"] = None
                return total
            if error_if_nonfinite and not bool(torch.isfinite(total)):
                raise RuntimeError(_NONFINITE.format(norm_type=norm_type))
            slots["pending"] = clip
            slots["norm"] = total
            return total
        self._current_rows()
        plan = self._plan
        if plan is None or not plan.current():
            plan = self._plan = self._build_plan()
        if not plan.buckets:
            # A clip with nothing to apply: the next step must not clip again (max_grad_norm), which on a sharded
            # model would be an all-reduce that the ranks holding gradients do not join.
            self._pending_clip = {}
            total = self.last_grad_norm = self._clip_without_gradients(float(max_norm), norm_type)
            return total
        total, clip = self._clip_pass(plan, float(max_norm), norm_type, None)
        if error_if_nonfinite and not bool(torch.isfinite(total)):
            raise RuntimeError(_NONFINITE.format(norm_type=norm_type))
        self._pending_clip = clip
        self.last_grad_norm = total
        return total

    def _clip_without_gradients(self, max_norm: float, norm_type: float) -> torch.Tensor:
        """The total norm of a clip when this optimizer holds no gradient: 0, as torch's clip_grad_norm_ of no
        gradient. With DTensor parameters (FSDP2) this rank still joins the norm's all-reduce with a zero
        accumulation, since the ranks that hold gradients wait for it; the result is then the global norm."""
        params = [p for group in self.param_groups for p in group["params"]]
        if not any(_is_dtensor(p) for p in params):
            return torch.tensor(0.0)
        groups = _shard_groups(params)
        if not groups:
            return torch.tensor(0.0)
        accumulated = torch.zeros(1, dtype=torch.float64, device=_local(params[0]).device)
        return _finalize_sharded_clip(accumulated, groups, norm_type, max_norm)[0]

    def _clip_pass(self, plan: _Plan, max_norm: float, norm_type: float, grad_scale):
        """The norm pass over every bucket: (total norm, {device: clip coefficient}), both on the device.

        With DTensor parameters (FSDP2) every rank accumulates its local shards, the accumulations are all-reduced
        over the mesh dimensions the parameters are sharded on (a device collective, no host read), and the
        coefficient is computed from the reduced value."""
        devices = {b.device for b in plan.buckets}
        if len(devices) != 1:
            raise ValueError("fused gradient clipping needs every parameter with a gradient on one device; got "
                             f"{sorted(map(str, devices))}")
        (device,) = devices
        scale = _on(grad_scale, device)
        groups = _shard_groups([p for b in plan.buckets for p in b.params])
        native = load_extension()
        if all(b.runner is None for b in plan.buckets):
            # C++ CPU buckets: the accumulations are host floats (CPU tensors: reading them costs no sync).
            divide = 1.0 if scale is None else float(scale.reshape(()))
            parts = [b.native.grad_norm_accumulate(norm_type, divide) for b in plan.buckets]
            accumulated = native.combine_norm_parts(parts, norm_type)
            if not groups:
                total, coef = native.clip_coefficients(accumulated, norm_type, max_norm)
                out = torch.tensor([total, coef], dtype=torch.float32, device=device)
                return out[0], {device: out[1:2]}
            accumulated = torch.tensor([accumulated], dtype=torch.float64, device=device)
        else:
            # One device, so one backend: its runners' norm pass (triton_backend / cuda_backend).
            norm_pass = type(plan.buckets[0].runner).norm_pass
            pairs = [(b.native, b.runner) for b in plan.buckets]
            if not groups:
                out = norm_pass(pairs, norm_type, max_norm, scale)
                return out[0], {device: out[1:2]}
            accumulated = norm_pass(pairs, norm_type, max_norm, scale, finalize=False)
        out = _finalize_sharded_clip(accumulated, groups, norm_type, max_norm)
        return out[0], {device: out[1:2]}

    def _device_values(self, table: torch.Tensor) -> None:
        """Copy the learning rates held in tensors, and the betas / weight decays held in accelerator tensors (whose
        row holds 0.0: reading them on the host would synchronize), into `table` with tensor operations: on an
        accelerator device-to-device, no sync, and captured by a CUDA graph like the kernel (torch's fused
        optimizers read tensor hyper-parameters the same way); under torch.compile a traced copy, so a changing lr
        never recompiles."""
        for g, group in enumerate(self.param_groups):
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                table[g, _hyper.LR].copy_(lr.reshape(()), non_blocking=True)
            for column, value in _hyper.device_tensors(group):
                table[g, column].copy_(value.reshape(()), non_blocking=True)

    # -- plan ----------------------------------------------------------------------------------------------
    def _current_rows(self) -> list:
        rows = [self._row(g) for g in self.param_groups]
        binding = self._schedule
        if binding is not None:
            if len(binding.programs) > len(rows):
                raise ValueError(f"the attached scheduler describes {len(binding.programs)} param groups but the "
                                 f"optimizer has {len(rows)}")
            # Groups added after the scheduler was built: the kernels take their values from the groups.
            binding.cover_groups(len(rows))
            # The kernels take these values from the schedule programs: the host copies that the scheduler keeps
            # in the param groups must not cause a table upload at every step.
            momentum_column = self._momentum_column()
            # Under torch.compile the comparison would make Dynamo guard on every new lr value (a recompilation per
            # scheduler step): a compiled step always follows the program.
            compiling = torch.compiler.is_compiling()
            host_lrs = None if compiling else binding.host_lrs
            host_momenta = None if compiling else binding.host_momenta
            for g, row in enumerate(rows):
                if binding.lr_groups[g] or binding.momentum_groups[g]:
                    row = list(row)
                    flags = int(row[_hyper.FLAGS])
                    lr = self.param_groups[g]["lr"]
                    if isinstance(lr, torch.Tensor) or (host_lrs is not None and not _hyper.same_lr(lr, host_lrs[g])):
                        # A tensor lr is always read from the tensor (_device_values; the programs of tensor lrs
                        # are host mode, whose values torch's scheduler writes into the tensor in place, as a user
                        # or SWALR may). A float lr written by hand since the scheduler's last step holds, as it
                        # would in torch.
                        flags |= _hyper.LR_FROM_TABLE
                    elif binding.lr_groups[g]:
                        row[_hyper.LR] = 0.0
                    if binding.momentum_groups[g]:
                        if host_momenta is not None and not _hyper.same_lr(_hyper.momentum_of(self.param_groups[g]),
                                                                    host_momenta[g]):
                            # beta1 / momentum written by hand: the next step uses it, as torch's would.
                            flags |= _hyper.MOMENTUM_FROM_TABLE
                        else:
                            row[momentum_column] = 0.0
                    row[_hyper.FLAGS] = float(flags)
                    rows[g] = tuple(row)
        if rows != self._rows:
            for g in self.param_groups:
                self._validate_group(g, at_step=True)
            if self._rows is not None and len(rows) == len(self._rows):
                # A change of a value that decides which state exists (amsgrad, momentum != 0, master_weights) or
                # what a plan checks (stochastic_rounding: no float16 params) needs a new plan.
                if [self._plan_key(g) for g in self.param_groups] != getattr(self, "_needs", None):
                    self._plan = None
            self._needs = [self._plan_key(g) for g in self.param_groups]
            self._rows = rows
            self._hyper = {}
        return rows

    def _plan_key(self, group: dict) -> tuple:
        return (self._needed_states(group), bool(group.get("master_weights")),
                bool(group.get("stochastic_rounding")))

    def _hyper_table(self, device: torch.device, rows: list) -> torch.Tensor:
        table = self._hyper.get(device)
        if table is None:
            table = torch.tensor(rows, dtype=torch.float64).reshape(len(rows), _hyper.COLUMNS)
            if device.type != "cpu":
                table = table.pin_memory().to(device, non_blocking=True)
            self._hyper[device] = table
        return table

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
        if _is_dtensor(p) or _is_dtensor(g):
            if not (_is_dtensor(p) and _is_dtensor(g)) or g.placements != p.placements:
                raise ValueError("a DTensor parameter needs a DTensor gradient with the same placements (fused_sched "
                                 "updates the local shards), got "
                                 f"{getattr(p, 'placements', 'a plain tensor')} and "
                                 f"{getattr(g, 'placements', 'a plain tensor')}")
            if _local(g).shape != _local(p).shape:
                raise ValueError(f"gradient shard of shape {tuple(_local(g).shape)} differs from the parameter's "
                                 f"{tuple(_local(p).shape)}")
        if group.get("stochastic_rounding") and p.dtype == torch.float16:
            raise ValueError("stochastic_rounding rounds bfloat16 parameters; a float16 parameter needs "
                             "master_weights=True instead")
        if _is_dtensor(p) and not _dense(_local(p)):
            raise ValueError("fused_sched needs DTensor parameters whose local shards are dense in memory (a view "
                             "that skips elements)")
        for key in self._state_keys:
            value = self.state.get(p, {}).get(key)
            if isinstance(value, torch.Tensor) and value.shape != p.shape:
                raise ValueError(f"state {key!r} of shape {tuple(value.shape)} does not match its parameter of "
                                 f"shape {tuple(p.shape)}")

    def _build_plan(self) -> _Plan:
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
            if _local(p.grad).stride() != _walked_strides(_local(p)):
                # The kernels walk a gradient as the flat array of its parameter: a gradient laid out otherwise
                # (a transposed or sliced view) is replaced by an equal one in the parameter's layout, as torch's
                # fused path copies it to a contiguous temporary. Such a plan is rebuilt at every step.
                if _is_dtensor(p):
                    raise ValueError("a DTensor gradient whose local shard is laid out unlike its parameter's is not "
                                     "supported")
                p.grad = torch.empty_like(p, memory_format=torch.preserve_format).copy_(p.grad)
        by_key: dict = {}
        for index, needs, p in with_grad:
            master = bool(self.param_groups[index].get("master_weights")) and p.dtype != torch.float32
            created = self._init_state(p, needs, master)
            by_key.setdefault((p.device, p.dtype), []).append((index, p, created, master))
        buckets = []
        native = load_extension()
        for (device, dtype), members in by_key.items():
            bucket = _Bucket(device, dtype, resolved[device], [m[1] for m in members], [m[0] for m in members])
            states = []
            for key in self._state_keys:
                column = [self.state[p].get(key) for p in bucket.params]
                if any(t is not None for t in column):
                    placeholder = torch.empty(0, dtype=torch.float32, device=device)
                    column = [_local(t) if t is not None else placeholder for t in column]
                    states.append(column)
                else:
                    states.append([])
            steps = [self.state[p]["step"] for p in bucket.params] if self._has_step else []
            if any(m[3] for m in members):
                placeholder = torch.empty(0, dtype=torch.float32, device=device)  # "no master copy"
                masters = [_local(self.state[m[1]][MASTER_KEY]) if m[3] else placeholder for m in members]
            else:
                masters = []
            ids = bucket.param_ids = [param_ids[id(p)] for p in bucket.params]
            locals_ = [_local(p) for p in bucket.params]
            standins = [(i, p) for i, p in enumerate(locals_) if not _dense(p)]
            if standins:
                bucket.standins = []
                for i, p in standins:
                    dense = locals_[i] = torch.empty_like(p, memory_format=torch.preserve_format)
                    bucket.standins.append((p, dense))
                bucket.lend_standins()
            if any(_is_dtensor(p) for p in bucket.params):
                bucket.sharded = [(p, local) for p, local in zip(bucket.params, locals_, strict=True)
                                  if _is_dtensor(p)]
                bucket.lend_local_grads()
            bucket.native = native.OptimBucket(locals_, states, steps, bucket.group_index, masters, ids)
            if bucket.backend == "triton":
                from ..backends.triton_backend import TritonBucketRunner

                bucket.runner = TritonBucketRunner(device, dtype, self._algorithm)
            elif bucket.backend == "cuda":
                from ..backends.cuda_backend import CudaBucketRunner

                bucket.runner = CudaBucketRunner(device, dtype, self._algorithm)
            # SGD: a momentum buffer created by this step takes the gradient as it is (torch clones it).
            bucket.fresh = [int(m[2] or i in fresh_ids) for m, i in zip(members, ids, strict=True)]
            problem = bucket.native.refresh_grads()
            if problem:
                raise RuntimeError(f"fused_sched: internal error, a freshly built bucket is stale ({problem})")
            buckets.append(bucket)
        if fresh_ids:
            self._slots["fresh"] = ()  # the buckets hold them now
        return _Plan(buckets, native.NoGradWatch(without_grad))

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

    def _init_state(self, p: torch.Tensor, needs: tuple[bool, ...], master: bool) -> bool:
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
        if master and MASTER_KEY not in state:
            state[MASTER_KEY] = torch.empty_like(p, dtype=torch.float32, memory_format=torch.preserve_format).copy_(p)
        elif not master:
            # master_weights turned off: the parameter is the value from now on; a copy kept would be stale if the
            # option were turned on again.
            state.pop(MASTER_KEY, None)
        # The kernels walk a state as the flat array of its parameter, so it must have the parameter's strides.
        # A parameter re-laid out since its state was made (p.data = a transposed tensor) gets its states copied
        # into its new layout, element by element as torch indexes them.
        for key in (*self._state_keys, MASTER_KEY):
            value = state.get(key)
            if isinstance(value, torch.Tensor) and _local(value).stride() != _walked_strides(_local(p)):
                state[key] = torch.empty_like(p, dtype=torch.float32, memory_format=torch.preserve_format).copy_(value)
        return created


def _slots() -> dict:
    """FusedOptimizer._slots: the values a step writes that are not attributes (see FusedOptimizer.last_grad_norm):
    a fused clip's total norm ("norm") and pending coefficients ("pending"); for SGD under torch.compile, the param
    ids of the momentum buffers that no step filled yet ("fresh") and of those whose first step was handed a
    GradScaler found_inf, with it ("unfilled": [(param ids, found_inf)], until _settle_fresh() reads it); and for
    the compiled step each param's state dict, by param id ("states", None until a trace builds it; dropped with the
    eager plan by _invalidate); and whether a step ran since the bound scheduler's last step ("stepped",
    ScheduleBinding.advance)."""
    return {"pending": None, "norm": None, "fresh": (), "unfilled": None, "states": None, "stepped": False}


def _is_dtensor(t) -> bool:
    dtensor = _dtensor_class()
    return dtensor is not None and isinstance(t, dtensor)


_DTENSOR = []


def _dtensor_class():
    if not _DTENSOR:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # a torch built without distributed support
            DTensor = None
        _DTENSOR.append(DTensor)
    return _DTENSOR[0]


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose memory a kernel updates: a DTensor's local shard, any other tensor itself."""
    return t._local_tensor if _is_dtensor(t) else t


def _traced_tensor(value) -> bool:
    """A tensor hyper-parameter while Dynamo traces: its value is not compared on the host (that would be a
    data-dependent graph break); it was checked when its param group was added, as a tensor lr's value is checked
    in eager steps too (the row holds 0.0 for it, so a new value never re-runs the checks)."""
    return isinstance(value, torch.Tensor) and torch.compiler.is_compiling()


def _shard_groups(params: list) -> list:
    """The process groups over which a norm of these parameters' local shards must be reduced: one per mesh
    dimension the DTensor parameters are sharded on ([] for plain tensors)."""
    sharded = [p for p in params if _is_dtensor(p)]
    if not sharded:
        return []
    if len(sharded) != len(params):
        raise ValueError("fused gradient clipping over DTensor and plain parameters together is not supported: a "
                         "plain parameter's norm would be counted once per rank")
    mesh, placements = sharded[0].device_mesh, sharded[0].placements
    if any(p.device_mesh != mesh or p.placements != placements for p in sharded):
        raise ValueError("fused gradient clipping needs every DTensor parameter on one mesh with one placement")
    return [mesh.get_group(dim) for dim, placement in enumerate(placements) if placement.is_shard()]


def _finalize_sharded_clip(accumulated: torch.Tensor, groups: list, norm_type: float, max_norm: float):
    """All-reduce the float64 accumulation over `groups`, then optim_math.h total_norm_from and clip_coefficient
    with torch operations: float32 [total_norm, clip_coef]."""
    import torch.distributed as dist

    op = dist.ReduceOp.MAX if norm_type == math.inf else dist.ReduceOp.SUM
    for group in groups:
        dist.all_reduce(accumulated, op=op, group=group)
    if norm_type == math.inf or norm_type == 1.0:
        total = accumulated.float()
    elif norm_type == 2.0:
        total = accumulated.sqrt().float()
    else:
        total = accumulated.pow(1.0 / norm_type).float()
    coef = torch.clamp((total + 1e-6).reciprocal() * max_norm, max=1.0)  # clamp keeps a NaN, as torch's does
    return torch.cat([total.reshape(1), coef.reshape(1)])


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A GradScaler tensor on `device`, as a float32 [1]: a non-blocking copy to an accelerator; a blocking one to
    the CPU, whose kernels read it at once (a non-blocking device-to-host copy may not have landed yet)."""
    if t is None:
        return None
    if t.device != device or t.dtype != torch.float32:
        t = t.to(device=device, dtype=torch.float32, non_blocking=device.type != "cpu")
    return t.reshape(1)


def _check_max_norm(value, name: str, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0.0:
        raise ValueError(f"Invalid {name}: {value!r}; expected a non-negative number")


def _walked_strides(t: torch.Tensor) -> tuple:
    """The strides the kernels walk a parameter's gradient and states with: the parameter's own, or for a parameter
    that is not dense (a stand-in's, see _Bucket) the contiguous ones that empty_like gives it."""
    if _dense(t):
        return t.stride()
    strides, step = [], 1
    for size in reversed(t.shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _dense_copy(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`t` itself when it has the strides of `like`, else a copy of it with them."""
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like).copy_(t)


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
