"""Muon's work between its two kernel passes: the bfloat16 workspaces of a bucket, grouped by matrix shape, and the
batched Newton-Schulz iteration over each group (fused_sched/optim/muon.py).

Each group of matrices of one shape and one set of Newton-Schulz settings owns one bfloat16 buffer [n, numel]; the
workspace of its j-th param is row j of it, laid out like the param (the kernels walk both as flat arrays), so that
the group's matrices are one strided batch for ``torch.bmm`` / ``torch.baddbmm``. The buffers live as long as the
plan, so their addresses (and a CUDA graph that captured them) stay valid from step to step.

FSDP2 (DTensor parameters sharded on dim 0): a param's workspace holds its local rows, padded to the largest shard.
Newton-Schulz needs whole matrices, so each group's buffer is all-gathered (one collective per shape group), every
rank runs the iteration on the full batch, and keeps its own rows of the result: the communication is one
all-gather of 2 bytes per element of the group's matrices, and the Newton-Schulz work is repeated on every rank.
"""

from __future__ import annotations

import math

import torch

from ._tensors import is_dtensor


def _all_gather(output: torch.Tensor, input_: torch.Tensor, group) -> None:
    """torch.distributed.all_gather_single (torch 2.13's name; all_gather_into_tensor before, deprecated since)."""
    gather = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor
    gather(output, input_, group=group)


def matrix_shape(p: torch.Tensor) -> tuple[int, int]:
    """The matrix Muon orthogonalizes for param `p` (its global shape for a DTensor): (out, rest)."""
    return p.shape[0], math.prod(p.shape[1:])


def newton_schulz(x: torch.Tensor, coefficients, steps: int, eps: float) -> torch.Tensor:
    """torch.optim.Muon's _zeropower_via_newtonschulz on a batch [n, rows, cols] of bfloat16 matrices: the same
    operations in the same dtype, with bmm / baddbmm in place of mm / addmm."""
    a, b, c = coefficients
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    # ortho_grad.div_(ortho_grad.norm().clamp(min=eps)): the norm of each matrix, in bfloat16.
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, gram_update, x, beta=a)
    return x.mT if tall else x


class _ShapeGroup:
    """The params of one matrix shape and Newton-Schulz settings within a bucket."""

    def __init__(self, settings, rows, cols, shape, batch, sharded=None):
        self.coefficients, self.steps, self.eps = settings
        self.rows, self.cols = rows, cols
        self.shape = shape  # the params' (global) shape
        self.batch = batch  # the workspaces as one strided tensor [n, *local shape] (sharded: [n, padded rows, rest])
        self.sharded = sharded  # (process group, world size, first row, local rows) of an FSDP2 group, else None

    def orthogonalize(self) -> None:
        n = self.batch.shape[0]
        if self.sharded is None:
            x = self.batch.reshape(n, self.rows, self.cols)
            self.batch.copy_(newton_schulz(x, self.coefficients, self.steps, self.eps).reshape(self.batch.shape))
            return
        group, world, first, local_rows = self.sharded
        padded = self.batch.shape[1]
        # The output as the concatenation of the ranks' buffers along dim 0 ([world * n, ...]): gloo rejects the
        # stacked form [world, n, ...] that the collective's documentation also allows.
        gathered = self.batch.new_empty((world * n, padded, self.batch.shape[2]))
        _all_gather(gathered, self.batch, group=group)
        # Shards follow torch.chunk: full shards first, so every padding row comes after the last real one.
        gathered = gathered.view(world, n, padded, -1)
        full = gathered.permute(1, 0, 2, 3).reshape(n, world * padded, -1)[:, :self.shape[0]]
        o = newton_schulz(full.reshape(n, self.rows, self.cols), self.coefficients, self.steps, self.eps)
        mine = o.reshape(n, self.shape[0], -1)[:, first:first + local_rows]
        self.batch[:, :local_rows].copy_(mine)


class MuonWork:
    """A Muon bucket's workspaces, lr ratios and shape groups. params: the bucket's params (DTensors under FSDP2);
    locals_: the tensors its kernels update (their local shards); groups: each param's param group; ratios: each
    param's adjust_lr_fn factor."""

    def __init__(self, params: list, locals_: list, groups: list, ratios: list[float], device: torch.device):
        self.lr_ratios = torch.tensor(ratios, dtype=torch.float64, device=device)
        # One-element views: the C++ bucket writes their addresses into the table's column 5.
        self.lr_ratio_views = [self.lr_ratios[i:i + 1] for i in range(len(params))]
        members: dict = {}
        for i, (p, group) in enumerate(zip(params, groups, strict=True)):
            settings = (tuple(float(v) for v in group["ns_coefficients"]), int(group["ns_steps"]), float(group["eps"]))
            sharded = is_dtensor(p)
            # A sharded group's collective must be the same on every rank: its key holds only what every rank
            # agrees on (the global shape; the local shards' layout, which an empty or one-row shard leaves loose,
            # is checked to be contiguous in _sharded_group).
            key = (settings, tuple(p.shape), None if sharded else tuple(locals_[i].stride()), sharded)
            members.setdefault(key, []).append(i)
        self.workspaces = [None] * len(params)
        self.groups = []
        for (settings, shape, _, sharded), indices in members.items():
            rows, cols = matrix_shape(params[indices[0]])
            local = locals_[indices[0]]
            if sharded:
                self.groups.append(self._sharded_group(settings, rows, cols, shape, params[indices[0]], local,
                                                       indices, device))
                continue
            numel = local.numel()
            buffer = torch.zeros((len(indices), numel), dtype=torch.bfloat16, device=device)
            for j, i in enumerate(indices):
                self.workspaces[i] = torch.as_strided(buffer, local.shape, local.stride(), j * numel)
            batch = torch.as_strided(buffer, (len(indices), *local.shape), (numel, *local.stride()))
            self.groups.append(_ShapeGroup(settings, rows, cols, shape, batch))

    def _sharded_group(self, settings, rows, cols, shape, param, local, indices, device) -> _ShapeGroup:
        from torch.distributed.tensor import Shard

        mesh = param.device_mesh
        if mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
            raise ValueError("Muon gathers sharded matrices for Newton-Schulz along dim 0 of a 1-D mesh (FSDP2's "
                             f"default); got placements {param.placements} on a {mesh.ndim}-D mesh")
        if not local.is_contiguous():
            raise ValueError("Muon needs contiguous local shards of its DTensor parameters")
        world = mesh.size()
        rank = mesh.get_local_rank()
        padded = -(-shape[0] // world)  # torch.chunk's shard size
        first = min(rank * padded, shape[0])
        local_rows = local.shape[0] if local.dim() else 0
        rest = cols if len(shape) > 1 else 1
        buffer = torch.zeros((len(indices), padded, rest), dtype=torch.bfloat16, device=device)
        for j, i in enumerate(indices):
            self.workspaces[i] = torch.as_strided(buffer, local.shape, local.stride(), j * padded * rest)
        return _ShapeGroup(settings, rows, cols, shape, buffer, (mesh.get_group(), world, first, local_rows))

    def orthogonalize(self) -> None:
        """The Newton-Schulz iteration over every shape group: the workspaces then hold the orthogonalized updates."""
        for group in self.groups:
            group.orthogonalize()
