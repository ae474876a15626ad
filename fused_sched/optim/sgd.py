"""fused_sched.SGD: torch.optim.SGD computed by one fused call per (device, dtype) bucket."""

from __future__ import annotations

import torch

from .. import _hyper
from . import state_format as sf
from ._fused_optimizer import FusedOptimizer
from ._plan import Bucket
from ._state_format_plan import state_flags, validate_state_options
from ._tensors import traced_tensor


def sgd_row(group: dict) -> tuple:
    """A param group's row of the hyper table (fused_sched/_hyper.py, optim_math.h HyperColumn)."""
    flags = (
        (_hyper.MAXIMIZE if group["maximize"] else 0)
        | (_hyper.NESTEROV if group["nesterov"] else 0)
        | (_hyper.MASTER_WEIGHTS if group.get("master_weights") else 0)
        | state_flags(group)
    )
    return (
        _hyper.lr_scalar(group["lr"]), 0.0, 0.0, 0.0, _hyper.scalar(group["weight_decay"]), float(group["momentum"]),
        float(group["dampening"]), float(flags),
    )


class SGD(FusedOptimizer):
    r"""Stochastic gradient descent with optional momentum, dampening, Nesterov momentum and weight decay, as
    torch.optim.SGD.

    .. math::
       \begin{aligned}
       &g_t \leftarrow \nabla_\theta f_t(\theta_{t-1}) \quad (-g_t \text{ if maximize}) \\
       &g_t \leftarrow g_t + \lambda\theta_{t-1} \quad \text{if } \lambda \neq 0 \\
       &b_t \leftarrow g_t \text{ at the first step, else } \mu b_{t-1} + (1-\tau) g_t
        \quad \text{if } \mu \neq 0 \\
       &g_t \leftarrow g_t + \mu b_t \text{ if nesterov else } b_t \quad \text{if } \mu \neq 0 \\
       &\theta_t \leftarrow \theta_{t-1} - \gamma g_t
       \end{aligned}

    Float32 arithmetic whatever the parameter dtype; ``momentum_buffer`` is float32 (created only when
    momentum is not 0, as in torch), or bfloat16 with ``state_dtype=torch.bfloat16``: widened to float32 for the
    update and written back rounded stochastically (unbiased: the small increments that round-to-nearest loses in
    a long-lived buffer are kept on average) or to nearest even. Stochastic rounding draws its bits from
    (``rounding_seed``, the param's ``step``, its index in the optimizer, the element's index), so a run is
    reproducible bit for bit; the param's state then holds a float32 ``step`` (torch.optim.SGD keeps none and
    ignores it on load; ``to_torch_state_dict`` drops it).

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr (float or Tensor): learning rate (default: 1e-3).
        momentum (float): momentum factor (default: 0).
        dampening (float): dampening for momentum (default: 0).
        weight_decay (float): L2 penalty (default: 0).
        nesterov (bool): Nesterov momentum; needs momentum > 0 and zero dampening (default: False).
        maximize (bool): maximize the objective instead of minimizing it (default: False).
        backend (str): "auto", "cpu", "triton" or "cuda".
        foreach, fused: accepted for compatibility with torch.optim code; they change nothing.
        differentiable (bool): must be False.
        master_weights (bool or "remainder"): True: keep a float32 copy of every bfloat16 / float16 parameter in
            its state (``master_param``), updated in place of the parameter, which is written rounded to nearest
            even in the same pass. "remainder" (bfloat16 parameters): keep only the 16 low bits of that master
            (``master_remainder``, int16), as Adam's master_weights="remainder" (default: False).
        max_grad_norm (float, optional): clip the global gradient 2-norm inside every ``step()`` (default: None).
        state_dtype (torch.dtype): torch.float32 or torch.bfloat16, the dtype of ``momentum_buffer``
            (default: torch.float32).
        state_rounding (str): how a bfloat16 ``momentum_buffer`` is written: "stochastic" or "nearest" (round to
            nearest even) (default: "stochastic").
        rounding_seed (int): seed of stochastic rounding (default: 0).
    """

    _state_keys = ("momentum_buffer",)
    _has_step = False
    _algorithm = "sgd"
    _fresh_first_state = True

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
        master_weights: bool | str = False,
        max_grad_norm: float | None = None,
        rounding_seed: int = 0,
        state_dtype: torch.dtype = torch.float32,
        state_rounding: str = "stochastic",
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
            "master_weights": master_weights,
            "state_dtype": state_dtype,
            "state_rounding": state_rounding,
            **self._format_defaults(),
        }
        super().__init__(params, defaults, backend, max_grad_norm, rounding_seed)

    def _format_defaults(self) -> dict:
        """The 8-bit subclass's own defaults (sgd8bit.py)."""
        return {}

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", False)
            group.setdefault("master_weights", self.defaults.get("master_weights", False))
            for key in ("state_dtype", "state_rounding", "optim_bits", "block_size", "min_8bit_size"):
                if key in self.defaults:
                    group.setdefault(key, self.defaults[key])

    def _validate_group(self, group: dict, at_step: bool = False) -> None:
        """torch.optim.SGD's checks, in its order and with its messages. at_step: the re-check of a step after a
        group changed, which leaves out what torch checks only when the optimizer is made (the momentum's range
        and Nesterov's condition): schedulers (OneCycleLR, CyclicLR) write the momentum freely."""
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not traced_tensor(lr) and lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not at_step and group["momentum"] < 0.0:
            raise ValueError(f"Invalid momentum value: {group['momentum']}")
        if group["weight_decay"] < 0.0:
            raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
        if not at_step and group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if group.get("differentiable"):
            raise ValueError("fused_sched does not support differentiable=True")
        validate_state_options(group, type(self).__name__)
        if group.get("stochastic_rounding"):
            raise ValueError("SGD does not round its parameters stochastically; use master_weights=True (or "
                             "master_weights='remainder' for bfloat16 parameters)")

    def _row(self, group: dict) -> tuple:
        return sgd_row(group)

    def _needed_states(self, group: dict) -> tuple[bool, ...]:
        return (group["momentum"] != 0,)

    def _needs_step(self, group: dict, moment_format: int) -> bool:
        # A bfloat16 momentum buffer rounded stochastically keys its bits on a step of its own (an 8-bit buffer of
        # SGD8bit, a float32 one, or none at momentum 0, keep no step).
        return (group["momentum"] != 0 and moment_format == sf.BFLOAT16
                and group.get("state_rounding", "stochastic") == "stochastic")

    def _momentum_column(self) -> int:
        return _hyper.MOMENTUM

    def _run_bucket(self, bucket: Bucket, hyper: torch.Tensor, amp: dict) -> None:
        schedule, schedule_step = self._schedule_args(bucket.device)
        fresh = any(bucket.fresh)
        if bucket.runner is not None:
            bucket.runner.run(bucket.native, hyper, bucket.fresh, schedule=schedule, schedule_step=schedule_step,
                              sr_seed=self.rounding_seed, **amp)
        else:
            bucket.native.sgd_step(hyper, bucket.fresh, schedule, schedule_step, sr_seed=self.rounding_seed, **amp)
        # A momentum buffer created by a step that GradScaler's found_inf skipped was not filled: it stays fresh
        # for the next step. Knowing that needs found_inf on the host: read only on a step that creates buffers.
        if fresh:
            if amp["found_inf"] is not None and bool(amp["found_inf"].reshape(()) != 0):
                # Skipped: the buffers stay fresh, also for a plan rebuilt before the next step (_build_plan
                # consults _slots["fresh"]).
                unfilled = {i for i, flag in zip(bucket.param_ids, bucket.fresh, strict=True) if flag}
                self._slots["fresh"] = tuple(sorted(set(self._slots["fresh"]) | unfilled))
            else:
                if self._slots["fresh"]:
                    filled = {i for i, flag in zip(bucket.param_ids, bucket.fresh, strict=True) if flag}
                    self._slots["fresh"] = tuple(i for i in self._slots["fresh"] if i not in filled)
                bucket.fresh = [0] * len(bucket.fresh)

    def _run_lists(self, bucket: dict, hyper: torch.Tensor, amp: dict) -> None:
        schedule, schedule_step = self._schedule_args(bucket["device"])
        ops = torch.ops.fused_sched
        op = ops.triton_sgd_step_ if bucket["backend"] == "triton" else ops.sgd_step_
        # Momentum buffers that no step filled yet take the gradient as it is (torch clones it): _compiled._prepare.
        slots = self._slots
        fresh_ids = slots["fresh"]
        fresh = [int(i in fresh_ids) for i in bucket["param_ids"]]
        (momentum_buffers,) = bucket["states"]
        op(bucket["params"], bucket["grads"], momentum_buffers, hyper, bucket["group_index"], fresh, schedule,
           schedule_step, bucket["masters"], amp["grad_scale"], amp["found_inf"], amp["clip_coef"],
           amp["step_advance"])
        if any(fresh):
            filled = [i for i, flag in zip(bucket["param_ids"], fresh, strict=True) if flag]
            slots["fresh"] = tuple(i for i in fresh_ids if i not in filled)
            if amp["found_inf"] is not None:
                # Unless found_inf skipped this step: settled by the next trace (FusedOptimizer._settle_fresh),
                # which the change of _slots makes, so that no host read of found_inf breaks this graph.
                entry = (filled, amp["found_inf"].clone())
                pending = slots["unfilled"]
                slots["unfilled"] = [entry] if pending is None else [*pending, entry]
