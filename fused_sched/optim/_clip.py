"""Fused gradient clipping: one multi-tensor norm pass whose coefficient the next update applies on the device."""

from __future__ import annotations

import math

import torch

from .._extension import load_extension
from ._plan import Plan
from ._tensors import is_dtensor, local_shard, on_device

_NONFINITE = ("The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
              "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
              "`error_if_nonfinite=False`")


class ClipMixin:
    """FusedOptimizer's clip_grad_norm_ and the norm pass of max_grad_norm."""

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
        check_max_norm(max_norm, "max_norm", allow_none=False)
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
        return self._clip_grad_norm_eagerly(max_norm, norm_type, error_if_nonfinite)

    def _clip_grad_norm_eagerly(self, max_norm: float, norm_type: float, error_if_nonfinite: bool) -> torch.Tensor:
        """clip_grad_norm_'s body outside torch.compile, its arguments checked (and the compiled clip's fallback,
        _compiled.eager_clip)."""
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
        if not any(is_dtensor(p) for p in params):
            return torch.tensor(0.0)
        groups = shard_groups(params)
        if not groups:
            return torch.tensor(0.0)
        accumulated = torch.zeros(1, dtype=torch.float64, device=local_shard(params[0]).device)
        return finalize_sharded_clip(accumulated, groups, norm_type, max_norm)[0]

    def _clip_pass(self, plan: Plan, max_norm: float, norm_type: float, grad_scale):
        """The norm pass over every bucket: (total norm, {device: clip coefficient}), both on the device.

        With DTensor parameters (FSDP2) every rank accumulates its local shards, the accumulations are all-reduced
        over the mesh dimensions the parameters are sharded on (a device collective, no host read), and the
        coefficient is computed from the reduced value."""
        devices = {b.device for b in plan.buckets}
        if len(devices) != 1:
            raise ValueError("fused gradient clipping needs every parameter with a gradient on one device; got "
                             f"{sorted(map(str, devices))}")
        (device,) = devices
        scale = on_device(grad_scale, device)
        groups = shard_groups([p for b in plan.buckets for p in b.params])
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
            # One device, so one backend: its runners' norm pass (backends/triton/runner.py / cuda_backend.py).
            norm_pass = type(plan.buckets[0].runner).norm_pass
            pairs = [(b.native, b.runner) for b in plan.buckets]
            if not groups:
                out = norm_pass(pairs, norm_type, max_norm, scale)
                return out[0], {device: out[1:2]}
            accumulated = norm_pass(pairs, norm_type, max_norm, scale, finalize=False)
        out = finalize_sharded_clip(accumulated, groups, norm_type, max_norm)
        return out[0], {device: out[1:2]}

def shard_groups(params: list) -> list:
    """The process groups over which a norm of these parameters' local shards must be reduced: one per mesh
    dimension the DTensor parameters are sharded on ([] for plain tensors)."""
    sharded = [p for p in params if is_dtensor(p)]
    if not sharded:
        return []
    if len(sharded) != len(params):
        raise ValueError("fused gradient clipping over DTensor and plain parameters together is not supported: a "
                         "plain parameter's norm would be counted once per rank")
    mesh, placements = sharded[0].device_mesh, sharded[0].placements
    if any(p.device_mesh != mesh or p.placements != placements for p in sharded):
        raise ValueError("fused gradient clipping needs every DTensor parameter on one mesh with one placement")
    return [mesh.get_group(dim) for dim, placement in enumerate(placements) if placement.is_shard()]


def finalize_sharded_clip(accumulated: torch.Tensor, groups: list, norm_type: float, max_norm: float):
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


def check_max_norm(value, name: str, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0.0:
        raise ValueError(f"Invalid {name}: {value!r}; expected a non-negative number")
