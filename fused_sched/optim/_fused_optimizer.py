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

from itertools import chain

import torch
from torch.optim import Optimizer

from .. import backends
from .._extension import load_extension
from . import state_format as sf
from ._clip import ClipMixin, check_max_norm
from ._plan import MASTER_KEY, Bucket, PlanMixin
from ._step_inputs import StepInputsMixin

#: The dtypes a loaded state keeps (state formats); other floating dtypes are loaded as float32.
_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.uint8, torch.int16)


class FusedOptimizer(StepInputsMixin, ClipMixin, PlanMixin, Optimizer):
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
    #: False where the compiled step (fused_sched/optim/_compiled.py) runs the eager one instead (Muon, whose
    #: Newton-Schulz matmuls sit between two kernel passes).
    _traceable = True
    #: True when the step that creates the first state tensor treats it apart (SGD: the new momentum buffer takes the
    #: gradient as it is, a "fresh" flag handed to the kernel).
    _fresh_first_state = False

    def __init__(self, params, defaults: dict, backend: str = "auto", max_grad_norm: float | None = None,
                 rounding_seed: int = 0):
        backends.check_name(backend)
        check_max_norm(max_grad_norm, "max_grad_norm", allow_none=True)
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

    def _momentum_column_of(self, group: dict) -> int:
        """_momentum_column for `group` (an optimizer with several families answers per group)."""
        return self._momentum_column()

    def _run_bucket(self, bucket: Bucket, hyper: torch.Tensor, amp: dict) -> None:
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

        States go to the parameter's device in their own format (float32, bfloat16, 8-bit codes with their absmax,
        int16 master remainders; torch would cast them to the parameter dtype; other float dtypes become float32),
        and the next step converts them to the formats the param groups ask (a torch.optim.AdamW state_dict loaded
        into AdamW8bit is quantized then); ``step`` becomes a float32 tensor on that device.
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
                elif (key in self._state_keys or key in (MASTER_KEY, sf.REMAINDER_KEY)) and isinstance(
                        value, torch.Tensor):
                    # Kept in its own format (float32, bfloat16, 8-bit codes, int16 remainders; another float
                    # dtype, as torch saves the states of low-precision params, becomes float32): the next plan
                    # converts what the groups ask otherwise (StateFormatMixin).
                    dtype = value.dtype if value.dtype in _STATE_DTYPES else torch.float32
                    fresh = torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format)
                    state[key] = fresh.copy_(value)
                elif key.endswith(sf.ABSMAX_SUFFIX) and isinstance(value, torch.Tensor):
                    state[key] = value.to(device=p.device, dtype=torch.float32, copy=True)
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
        else:
            self._step_eagerly()
        return loss

    def _step_eagerly(self) -> None:
        """step()'s body outside torch.compile (and the compiled step's fallback, _compiled.eager_step)."""
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

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim.Optimizer.zero_grad; also drops a pending clip_grad_norm_() coefficient, which belonged to
        the gradients being discarded."""
        self._pending_clip = None
        super().zero_grad(set_to_none)

def _slots() -> dict:
    """FusedOptimizer._slots: the values a step writes that are not attributes (see FusedOptimizer.last_grad_norm):
    a fused clip's total norm ("norm") and pending coefficients ("pending"); for SGD under torch.compile, the param
    ids of the momentum buffers that no step filled yet ("fresh") and of those whose first step was handed a
    GradScaler found_inf, with it ("unfilled": [(param ids, found_inf)], until _settle_fresh() reads it); and for
    the compiled step each param's state dict, by param id ("states", None until a trace builds it; dropped with the
    eager plan by _invalidate); and whether a step ran since the bound scheduler's last step ("stepped",
    ScheduleBinding.advance)."""
    return {"pending": None, "norm": None, "fresh": (), "unfilled": None, "states": None, "stepped": False}
