"""fused_sched.MuonWithAdamW: Muon for a model's hidden matrices and AdamW for the rest, in one optimizer, so that one
scheduler drives both; and ``muon_param_groups``, the usual split of a model's parameters between the two."""

from __future__ import annotations

import torch
from torch import nn

from .. import _hyper
from ._fused_optimizer import FusedOptimizer
from ._plan import Bucket
from .adam import AdamW, adam_row
from .muon import EPS, NS_COEFFICIENTS, NS_STEPS, Muon, muon_row, validate_muon_group

#: Module names (the last part of a qualified name) taken for an output head: AdamW, not Muon.
HEAD_NAMES = ("lm_head", "head", "output", "classifier", "fc_out")


def muon_param_groups(model: nn.Module, *, flatten: bool = False, head_names=HEAD_NAMES) -> list[dict]:
    """The usual split of `model`'s parameters for MuonWithAdamW: the 2-D weights of hidden layers to Muon
    (``use_muon=True``); embeddings, the output head (a module named in `head_names`, or a weight tied to an
    embedding) and every 1-D or scalar parameter (biases, norms, gains) to AdamW (``use_muon=False``). flatten:
    weights of more dimensions (convolutions) go to Muon too, as (out, rest) matrices; otherwise to AdamW.

    Returns the param groups (empty ones left out); add any option to them before handing them to the optimizer.
    """
    adamw_ids = set()
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Embedding) or (name and last in head_names):
            adamw_ids.update(id(p) for p in module.parameters(recurse=False))
    muon, adamw = [], []
    for _, p in model.named_parameters():  # a tied weight comes once, under its first name
        if not p.requires_grad:
            continue
        matrix = p.ndim == 2 or (flatten and p.ndim > 2)
        (muon if matrix and id(p) not in adamw_ids else adamw).append(p)
    groups = [{"params": muon, "use_muon": True}, {"params": adamw, "use_muon": False}]
    return [g for g in groups if g["params"]]


def _is_muon(group: dict) -> bool:
    """A Muon group of MuonWithAdamW (the constructor's own defaults, checked before any group exists, count as
    Muon's)."""
    return group.get("use_muon", True)


class MuonWithAdamW(Muon):
    r"""Muon (fused_sched.Muon) for the param groups flagged ``use_muon=True`` and AdamW (fused_sched.AdamW) for those
    flagged ``use_muon=False``, in one optimizer: one ``step()``, one state_dict, one scheduler (the torch schedulers
    and transformers' schedule factories work on it unchanged, each group following its own lr), both parts
    reading the schedule on the device. Each Muon bucket runs Muon's two passes and batched Newton-Schulz; each
    AdamW bucket one AdamW launch. Fused clipping (``max_grad_norm``, ``clip_grad_norm_``) and GradScaler cover
    both parts at once.

    Every param group must say ``use_muon``; :func:`muon_param_groups` makes the usual split of a model. A group takes
    its own kind's defaults below for what it leaves out: a Muon group Muon's (lr, weight_decay, momentum, nesterov,
    ns_coefficients, eps, ns_steps, adjust_lr_fn, flatten), an AdamW group AdamW's (``adamw_lr`` or else lr,
    ``adamw_betas``, ``adamw_eps``, ``adamw_weight_decay``, amsgrad False). Schedules of the momentum
    (OneCycleLR's cycle_momentum) are not supported: the two parts' momenta differ in meaning.

    Args:
        params: param groups, each with ``use_muon``.
        lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn, flatten: the Muon groups'
            defaults (as fused_sched.Muon; "match_rms_adamw" lets both parts share one lr and weight decay).
        adamw_lr (float, optional): the AdamW groups' lr (default: None, the same as lr).
        adamw_betas, adamw_eps, adamw_weight_decay: the AdamW groups' defaults (default: (0.9, 0.999), 1e-8, 0.01).
        backend, max_grad_norm: as fused_sched.Muon.
    """

    _state_keys = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _families = {"muon": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}

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
        adamw_lr: float | torch.Tensor | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.01,
        backend: str = "auto",
        max_grad_norm: float | None = None,
    ) -> None:
        self.adamw_defaults = {
            "lr": lr if adamw_lr is None else adamw_lr, "betas": adamw_betas, "eps": adamw_eps,
            "weight_decay": adamw_weight_decay, "amsgrad": False, "maximize": False, "foreach": None,
            "capturable": False, "differentiable": False, "fused": None, "decoupled_weight_decay": True,
            "master_weights": False, "stochastic_rounding": False,
        }
        AdamW._validate_group(self, self.adamw_defaults)
        super().__init__(params, lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn,
                         flatten=flatten, backend=backend, max_grad_norm=max_grad_norm)

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict) or not isinstance(param_group.get("use_muon"), bool):
            raise ValueError("MuonWithAdamW needs use_muon=True (Muon) or False (AdamW) in every param group; "
                             "fused_sched.muon_param_groups(model) makes the usual split")
        if param_group["use_muon"]:
            Muon.add_param_group(self, param_group)
            return
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        # AdamW's defaults first; torch then fills in Muon's keys, which an AdamW group ignores.
        FusedOptimizer.add_param_group(self, {**self.adamw_defaults, **param_group, "params": params})

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("adamw_defaults", {})

    def _muon_settings(self, group: dict):
        return super()._muon_settings(group) if _is_muon(group) else None

    def _attach_schedule(self, binding) -> None:
        if any(binding.momentum_groups):
            raise ValueError("MuonWithAdamW takes no schedule of the momentum (cycle_momentum): Muon's momentum and "
                             "AdamW's beta1 differ in meaning; pass cycle_momentum=False")
        super()._attach_schedule(binding)

    def _group_family(self, group: dict) -> str:
        return "muon" if _is_muon(group) else "adam"

    def _family_state_keys(self, family: str) -> tuple[str, ...]:
        return self._families[family]

    def _family_has_step(self, family: str) -> bool:
        return family == "adam"

    def _validate_group(self, group: dict, at_step: bool = False) -> None:
        if _is_muon(group):
            validate_muon_group(group, at_step)
        else:
            AdamW._validate_group(self, group, at_step)

    def _check_param(self, p: torch.Tensor, group: dict) -> None:
        if _is_muon(group):
            super()._check_param(p, group)
        else:
            FusedOptimizer._check_param(self, p, group)

    def _row(self, group: dict) -> tuple:
        return muon_row(group) if _is_muon(group) else adam_row(group)

    def _needed_states(self, group: dict) -> tuple[bool, ...]:
        if _is_muon(group):
            return (True, False, False, False)
        return (False, True, True, bool(group["amsgrad"]))

    def _momentum_column_of(self, group: dict) -> int:
        return _hyper.MOMENTUM if _is_muon(group) else _hyper.BETA1

    def _run_bucket(self, bucket: Bucket, hyper: torch.Tensor, amp: dict) -> None:
        if bucket.family == "adam":
            AdamW._run_bucket(self, bucket, hyper, amp)
        else:
            super()._run_bucket(bucket, hyper, amp)

