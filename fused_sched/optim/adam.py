"""fused_sched.Adam and fused_sched.AdamW: torch.optim.Adam / AdamW computed by one fused call per
(device, dtype) bucket."""

from __future__ import annotations

import torch

from .. import _hyper
from ._fused_optimizer import FusedOptimizer
from ._plan import Bucket
from ._state_format_plan import state_flags, validate_state_options
from ._tensors import traced_tensor

_ALGORITHM = r"""
    .. math::
       \begin{aligned}
       &g_t \leftarrow \nabla_\theta f_t(\theta_{t-1}) \quad (-g_t \text{ if maximize}) \\
       &\textbf{AdamW: } \theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda) \qquad
        \textbf{Adam: } g_t \leftarrow g_t + \lambda\theta_{t-1} \\
       &m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t \qquad v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
       &\hat v_t \leftarrow \max(\hat v_{t-1}, v_t) \text{ if amsgrad else } v_t \\
       &\theta_t \leftarrow \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}\,
        \frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}
       \end{aligned}

    The arithmetic runs in float32 whatever the parameter dtype (float32, bfloat16, float16); the states
    ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq``) are float32 and ``step`` is a float32 tensor on the
    parameter's device. The scalars (bias corrections, step size) are computed in float64 from the step counter,
    with torch's operation order, so float32 results match torch.optim to a few ulps.
"""

_ARGS = """
    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr (float or Tensor): learning rate (default: 1e-3). A one-element tensor is accepted.
        betas (Tuple[float, float]): coefficients of the running averages of the gradient and its square
            (default: (0.9, 0.999)).
        eps (float): term added to the denominator (default: 1e-8).
        weight_decay (float): weight decay coefficient (default: {wd}).
        amsgrad (bool): use the maximum of past squared-gradient averages (default: False).
        maximize (bool): maximize the objective instead of minimizing it (default: False).
        backend (str): "auto" (cpu for CPU tensors, triton for CUDA tensors), "cpu", "triton" or "cuda".
        foreach, fused, capturable: accepted so that code written for torch.optim runs unchanged; fused_sched
            always runs fused and its steps never synchronize, so they change nothing. They are kept in the param
            groups so a state_dict loads into torch.optim with the same settings.
        differentiable (bool): must be False; fused_sched does not differentiate through the step.
        master_weights (bool or "remainder"): True: keep a float32 copy of every bfloat16 / float16 parameter in
            its state (``master_param``); the update runs on the copy and writes the parameter rounded to nearest
            even in the same pass. "remainder" (bfloat16 parameters): keep only the 16 low bits of that float32
            master (int16 ``master_remainder``, 2 bytes per parameter instead of 4): the parameter holds the high
            half rounded half up, and parameter + remainder is the float32 master exactly, so the update is bit
            for bit that of True; the parameter differs from True's only at exact ties (low half 0x8000), where it
            is the neighbour away from zero instead of the even one (default: False).
        state_dtype (torch.dtype): dtype of ``exp_avg`` / ``exp_avg_sq`` / ``max_exp_avg_sq``: torch.float32, or
            torch.bfloat16 (half the memory; the arithmetic stays float32) (default: torch.float32).
        state_rounding (str): how bfloat16 states are written: "stochastic" (unbiased, bits from (rounding_seed,
            step, parameter index, state, element index), so small updates are not lost to rounding) or
            "nearest" (round to nearest even) (default: "stochastic").
        stochastic_rounding (bool): write bfloat16 parameters (without master_weights) with stochastic rounding,
            unbiased; the random bits depend only on (rounding_seed, step, parameter index, element index)
            (default: False).
        max_grad_norm (float, optional): clip the global gradient norm (2-norm, as
            torch.nn.utils.clip_grad_norm_) inside every ``step()``; the norm is kept in ``last_grad_norm``
            (default: None, no clipping). ``clip_grad_norm_()`` clips the next step only.
        rounding_seed (int): seed of stochastic rounding (default: 0).
"""


def _validate_precision_options(group: dict, name: str = "Adam") -> None:
    if not isinstance(group.get("stochastic_rounding", False), bool):
        raise ValueError(f"stochastic_rounding must be a bool, got {group['stochastic_rounding']!r}")
    validate_state_options(group, name)
    if group.get("master_weights") and group.get("stochastic_rounding"):
        raise ValueError("master_weights and stochastic_rounding exclude each other: with a float32 master copy the "
                         "parameter is rounded to nearest from it")


def adam_row(group: dict) -> tuple:
    """A param group's row of the hyper table (fused_sched/_hyper.py, optim_math.h HyperColumn)."""
    beta1, beta2 = group["betas"]
    flags = (
        (_hyper.AMSGRAD if group["amsgrad"] else 0)
        | (_hyper.MAXIMIZE if group["maximize"] else 0)
        | (_hyper.DECOUPLED_WEIGHT_DECAY if group["decoupled_weight_decay"] else 0)
        | (_hyper.STOCHASTIC_ROUNDING if group.get("stochastic_rounding") else 0)
        | (_hyper.MASTER_WEIGHTS if group.get("master_weights") else 0)
        | state_flags(group)
    )
    return (
        _hyper.lr_scalar(group["lr"]), _hyper.scalar(beta1), _hyper.scalar(beta2), float(group["eps"]),
        _hyper.scalar(group["weight_decay"]), 0.0, 0.0, float(flags),
    )


class Adam(FusedOptimizer):
    __doc__ = (
        "Adam (Kingma & Ba) with L2 weight decay added to the gradient, as torch.optim.Adam; "
        "``decoupled_weight_decay=True`` gives AdamW.\n" + _ALGORITHM + _ARGS.format(wd="0")
        + "        decoupled_weight_decay (bool): decay the weights directly (AdamW) instead of adding L2 to the "
        "gradient (default: False).\n"
    )

    _state_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _has_step = True
    _algorithm = "adam"

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        backend: str = "auto",
        master_weights: bool | str = False,
        stochastic_rounding: bool = False,
        max_grad_norm: float | None = None,
        rounding_seed: int = 0,
        state_dtype: torch.dtype = torch.float32,
        state_rounding: str = "stochastic",
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
            "master_weights": master_weights,
            "stochastic_rounding": stochastic_rounding,
            "state_dtype": state_dtype,
            "state_rounding": state_rounding,
            **self._format_defaults(),
        }
        super().__init__(params, defaults, backend, max_grad_norm, rounding_seed)

    def _format_defaults(self) -> dict:
        """The 8-bit subclasses' own defaults (adam8bit.py)."""
        return {}

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group.setdefault("decoupled_weight_decay", False)
            group.setdefault("master_weights", self.defaults.get("master_weights", False))
            group.setdefault("stochastic_rounding", self.defaults.get("stochastic_rounding", False))
            for key in ("state_dtype", "state_rounding", "optim_bits", "block_size", "min_8bit_size"):
                if key in self.defaults:
                    group.setdefault(key, self.defaults[key])

    def _validate_group(self, group: dict, at_step: bool = False) -> None:
        """torch.optim.Adam's checks, in its order and with its messages. at_step: the re-check of a step after a
        group changed, which leaves out the betas' ranges: torch checks them only when the optimizer is made, and
        schedulers (OneCycleLR, CyclicLR) write beta1 freely."""
        lr = group["lr"]
        foreach_without_capture = group.get("foreach") and not group.get("capturable")
        if isinstance(lr, torch.Tensor):
            if foreach_without_capture:
                raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        if not traced_tensor(lr) and not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        eps = group["eps"]
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        betas = group["betas"]
        if len(betas) != 2:
            raise ValueError(f"betas must hold two values, got {betas!r}")
        if not at_step:
            for i, beta in enumerate(betas):
                if isinstance(beta, torch.Tensor) and beta.numel() != 1:
                    raise ValueError(f"Tensor betas[{i}] must be 1-element")
                if not traced_tensor(beta) and not 0.0 <= beta < 1.0:
                    raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        if not 0.0 <= group["weight_decay"]:
            raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
        if not at_step:
            tensors = [isinstance(beta, torch.Tensor) for beta in betas]
            if any(tensors) and not all(tensors) or not any(tensors) and not all(isinstance(b, float) for b in betas):
                raise ValueError("betas must be either both floats or both Tensors")
        for i, beta in enumerate(betas):
            if isinstance(beta, torch.Tensor):
                if foreach_without_capture:
                    raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
                if beta.numel() != 1:
                    raise ValueError(f"Tensor betas[{i}] must be 1-element")
        if group.get("differentiable"):
            raise ValueError("fused_sched does not support differentiable=True")
        _validate_precision_options(group, type(self).__name__)

    def _row(self, group: dict) -> tuple:
        return adam_row(group)

    def _needed_states(self, group: dict) -> tuple[bool, ...]:
        return (True, True, bool(group["amsgrad"]))

    def _momentum_column(self) -> int:
        return _hyper.BETA1

    def _run_bucket(self, bucket: Bucket, hyper: torch.Tensor, amp: dict) -> None:
        schedule, schedule_step = self._schedule_args(bucket.device)
        if bucket.runner is not None:
            bucket.runner.run(bucket.native, hyper, schedule=schedule, schedule_step=schedule_step,
                              sr_seed=self.rounding_seed, **amp)
        else:
            bucket.native.adam_step(hyper, schedule, schedule_step, sr_seed=self.rounding_seed, **amp)

    def _run_lists(self, bucket: dict, hyper: torch.Tensor, amp: dict) -> None:
        schedule, schedule_step = self._schedule_args(bucket["device"])
        ops = torch.ops.fused_sched
        op = ops.triton_adam_step_ if bucket["backend"] == "triton" else ops.adam_step_
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs = bucket["states"]
        op(bucket["params"], bucket["grads"], exp_avgs, exp_avg_sqs, max_exp_avg_sqs, bucket["steps"], hyper,
           bucket["group_index"], schedule, schedule_step, bucket["masters"], amp["grad_scale"], amp["found_inf"],
           amp["clip_coef"], amp["step_advance"], bucket["param_ids"], self.rounding_seed)


class AdamW(Adam):
    __doc__ = (
        "AdamW (Loshchilov & Hutter): Adam with decoupled weight decay, as torch.optim.AdamW.\n"
        + _ALGORITHM + _ARGS.format(wd="1e-2")
    )

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
        master_weights: bool | str = False,
        stochastic_rounding: bool = False,
        max_grad_norm: float | None = None,
        rounding_seed: int = 0,
        state_dtype: torch.dtype = torch.float32,
        state_rounding: str = "stochastic",
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
            backend=backend, master_weights=master_weights, stochastic_rounding=stochastic_rounding,
            max_grad_norm=max_grad_norm, rounding_seed=rounding_seed, state_dtype=state_dtype,
            state_rounding=state_rounding,
        )

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
