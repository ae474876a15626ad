"""fused_sched.Muon: torch.optim.Muon with its elementwise work fused per bucket, its Newton-Schulz iteration batched
by matrix shape, and the learning rate read from a device schedule.

A step is, per (device, dtype) bucket: one kernel pass that updates every momentum buffer and writes each param's
update (Nesterov or not) as bfloat16 into a workspace (csrc/include/fused_sched/muon_math.h); then, for each group
of matrices of one shape (and one set of Newton-Schulz settings), the Newton-Schulz iteration as batched bfloat16
matmuls on the stacked workspaces (``newton_schulz``: the same operations as torch's, batched); then one kernel pass
that applies weight decay and the orthogonalized update. Launches grow with the number of distinct shapes, not of
tensors, and nothing is read on the host.
"""

from __future__ import annotations

import math

import torch

from .. import _hyper
from ._fused_optimizer import FusedOptimizer
from ._muon_work import MuonWork, matrix_shape
from ._plan import Bucket
from ._tensors import traced_tensor

#: torch.optim.Muon's defaults (Keller Jordan's quintic Newton-Schulz coefficients).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
EPS = 1e-7
ADJUST_LR_FNS = (None, "original", "match_rms_adamw", "spectral_unclamped")
#: muon_math.h MuonPass.
MOMENTUM_PASS, UPDATE_PASS = 0, 1


def adjusted_lr_ratio(adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    """torch.optim.Muon's _adjust_lr as a factor of lr: sqrt(max(1, A / B)) ("original", the default),
    0.2 sqrt(max(A, B)) ("match_rms_adamw", Moonshot's: the update's RMS matches AdamW's) or sqrt(A / B)
    ("spectral_unclamped", Bernstein's; torch >= 2.14 has it, fused_sched on every supported torch)."""
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "spectral_unclamped":
        return math.sqrt(rows / cols)
    return 0.2 * math.sqrt(max(rows, cols))


def muon_row(group: dict) -> tuple:
    """A Muon param group's row of the hyper table (SGD's layout: lr, weight_decay, momentum, the Nesterov flag)."""
    flags = _hyper.NESTEROV if group["nesterov"] else 0
    return (_hyper.lr_scalar(group["lr"]), 0.0, 0.0, 0.0, _hyper.scalar(group["weight_decay"]),
            float(group["momentum"]), 0.0, float(flags))


def validate_muon_group(group: dict, at_step: bool = False) -> None:
    """torch.optim.Muon's checks, in its order and with its messages, then those torch makes only inside a step
    (Newton-Schulz's), made here before anything is written. at_step: the re-check of a step, which leaves out the
    momentum's range (schedulers write the momentum freely)."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not traced_tensor(lr) and not 0.0 <= lr:
        raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
    if not at_step and not 0.0 <= group["momentum"]:
        raise ValueError(f"momentum should be >= 0 but is: {group['momentum']}")
    if not 0.0 <= group["weight_decay"]:
        raise ValueError(f"weight decay should be >= 0 but is: {group['weight_decay']}")
    if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
        raise ValueError(f"Adjust learning rate function {group['adjust_lr_fn']} is not supported")
    steps = group["ns_steps"]
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"ns_steps must be a non-negative int, got {steps!r}")
    if steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if len(group["ns_coefficients"]) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    if not group["eps"] >= 0.0:
        raise ValueError(f"eps must be >= 0, got {group['eps']}")
    if not isinstance(group.get("flatten", False), bool):
        raise ValueError(f"flatten must be a bool, got {group['flatten']!r}")


def check_muon_params(params, flatten: bool) -> None:
    """torch.optim.Muon's constructor check of the param shapes (flatten: >2-D weights are taken as (out, rest))."""
    for p in params:
        if p.ndim != 2 and not (flatten and p.ndim > 2):
            hint = "" if flatten else " (flatten=True takes a weight of more dimensions as (out, rest))"
            raise ValueError(f"Muon only supports 2D parameters whereas we found a parameter with size: {p.size()}"
                             + hint)


class Muon(FusedOptimizer):
    r"""Muon: momentum, Newton-Schulz orthogonalization of each matrix's update, decoupled weight decay, as
    torch.optim.Muon.

    .. math::
       \begin{aligned}
       &g_t \leftarrow \nabla_\theta f_t(\theta_{t-1}) \\
       &B_t \leftarrow B_{t-1} + (1 - \mu)(g_t - B_{t-1}) \qquad
        \widetilde{B}_t \leftarrow g_t + \mu (B_t - g_t) \text{ if nesterov else } B_t \\
       &O_t \leftarrow \mathrm{NS}^{(a,b,c)}_k(\widetilde{B}_t; \varepsilon) \text{ (bfloat16)} \\
       &\theta_t \leftarrow \theta_{t-1}(1 - \gamma\lambda) - \gamma\, r(A, B)\, O_t
       \end{aligned}

    :math:`\mathrm{NS}` transposes a tall matrix, divides it by ``max(norm, eps)`` and runs ``ns_steps`` times
    :math:`X \leftarrow aX + (bA + cA^2)X` with :math:`A = XX^\top`, in bfloat16 as torch does; matrices of one shape
    (and one group's settings) run it together as batched matmuls. :math:`r(A, B)` is ``adjust_lr_fn``'s ratio for
    an A x B matrix: :math:`\sqrt{\max(1, A/B)}` ("original", default), :math:`0.2\sqrt{\max(A, B)}`
    ("match_rms_adamw") or :math:`\sqrt{A/B}` ("spectral_unclamped").

    The momentum buffer is float32 and the elementwise arithmetic float32 whatever the parameter dtype (torch keeps
    the buffer in the gradient's dtype); the update's bfloat16 workspace (2 bytes per element) lives beside the state,
    not in it. State dicts load into torch.optim.Muon and back.

    Args:
        params: iterable of 2-D parameters or dicts defining parameter groups. Use AdamW (or MuonWithAdamW) for
            embeddings, heads, biases and norms.
        lr (float or Tensor): learning rate (default: 1e-3).
        weight_decay (float): decoupled weight decay (default: 0.1).
        momentum (float): momentum factor (default: 0.95).
        nesterov (bool): Nesterov momentum (default: True).
        ns_coefficients (tuple of three floats): (a, b, c) of the Newton-Schulz polynomial
            (default: (3.4445, -4.7750, 2.0315)).
        eps (float): floor of the norm the update is divided by (default: 1e-7).
        ns_steps (int): Newton-Schulz iterations, fewer than 100 (default: 5).
        adjust_lr_fn (str, optional): "original", "match_rms_adamw" or "spectral_unclamped" (default: None, i.e.
            "original").
        flatten (bool): accept parameters of more than two dimensions (convolutions) and orthogonalize them as
            (out, rest) matrices, as the reference Muon does; the lr ratio uses that matrix's shape (default: False).
        backend (str): "auto", "cpu", "triton" or "cuda".
        max_grad_norm (float, optional): clip the global gradient 2-norm inside every ``step()`` (default: None).
    """

    _state_keys = ("momentum_buffer",)
    _has_step = False
    _algorithm = "muon"
    _traceable = False

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = EPS,
        ns_steps: int = NS_STEPS,
        adjust_lr_fn: str | None = None,
        *,
        flatten: bool = False,
        backend: str = "auto",
        max_grad_norm: float | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": ns_coefficients,
            "eps": eps,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
            "flatten": flatten,
        }
        self._muon_keys = None
        super().__init__(params, defaults, backend, max_grad_norm)

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        # Named params come as (name, tensor); anything else that is not a tensor is torch's to refuse.
        tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]
        check_muon_params([p for p in tensors if isinstance(p, torch.Tensor)],
                          param_group.get("flatten", self.defaults["flatten"]))
        super().add_param_group({**param_group, "params": params})

    def __setstate__(self, state):
        super().__setstate__(state)
        self._muon_keys = None
        for group in self.param_groups:
            group.setdefault("flatten", False)

    def _validate_group(self, group: dict, at_step: bool = False) -> None:
        validate_muon_group(group, at_step)

    def _check_param(self, p: torch.Tensor, group: dict) -> None:
        if p.is_complex():
            raise RuntimeError("Muon does not support complex parameters")
        check_muon_params([p], group["flatten"])
        super()._check_param(p, group)

    def _current_rows(self) -> list:
        # The Newton-Schulz settings, adjust_lr_fn and flatten are in no hyper row: the plan (its shape groups and
        # lr ratios) follows them through their own key, checked at every step like the rows.
        rows = super()._current_rows()
        keys = [self._muon_settings(g) for g in self.param_groups]
        if keys != self._muon_keys:
            for group in self.param_groups:
                self._validate_group(group, at_step=True)
            if self._muon_keys is not None:
                self._plan = None
            self._muon_keys = keys
        return rows

    def _muon_settings(self, group: dict):
        """What of a Muon group's settings decides its plan (shape groups, lr ratios) beside its row."""
        return (tuple(group["ns_coefficients"]), group["ns_steps"], group["eps"], group["adjust_lr_fn"],
                group["flatten"])

    def _row(self, group: dict) -> tuple:
        return muon_row(group)

    def _needed_states(self, group: dict) -> tuple[bool, ...]:
        return (True,)

    def _momentum_column(self) -> int:
        return _hyper.MOMENTUM

    def _family_tensors(self, bucket: Bucket, locals_: list, states: list, steps: list) -> tuple[list, list]:
        if bucket.family != "muon":
            return super()._family_tensors(bucket, locals_, states, steps)
        groups = [self.param_groups[i] for i in bucket.group_index]
        shapes = [matrix_shape(p) for p in bucket.params]
        ratios = [adjusted_lr_ratio(g["adjust_lr_fn"], *shape) for g, shape in zip(groups, shapes, strict=True)]
        work = bucket.extra = MuonWork(bucket.params, locals_, groups, ratios, bucket.device)
        return [*states, work.workspaces], work.lr_ratio_views

    def _run_bucket(self, bucket: Bucket, hyper: torch.Tensor, amp: dict) -> None:
        if bucket.family != "muon":
            super()._run_bucket(bucket, hyper, amp)
            return
        schedule, schedule_step = self._schedule_args(bucket.device)
        for phase in (MOMENTUM_PASS, UPDATE_PASS):
            if phase == UPDATE_PASS:
                bucket.extra.orthogonalize()
            if bucket.runner is not None:
                bucket.runner.run(bucket.native, hyper, schedule=schedule, schedule_step=schedule_step, phase=phase,
                                  release_grads=phase == UPDATE_PASS, **amp)
            else:
                bucket.native.muon_step(hyper, phase, schedule, schedule_step, **amp)

    def _run_lists(self, bucket: dict, hyper: torch.Tensor, amp: dict) -> None:
        raise AssertionError("Muon's compiled step runs the eager one (_traceable is False)")
