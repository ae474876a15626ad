"""fused_sched.Muon and MuonWithAdamW under torch.distributed (2 CPU processes on gloo, tests/distributed_cases.py:
the harness): DistributedDataParallel and FSDP2 (``fully_shard``: every shape group's bfloat16 workspaces
all-gathered for Newton-Schulz, fused_sched/optim/_muon_work.py) each equal to one process stepping the averaged
gradients, bit for bit, on every rank; a torch.distributed.checkpoint resume equal to the uninterrupted run, bit for
bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fused_sched
from distributed_cases import STEPS, _assert_same_on_every_rank, _batches, _local, _run, _train

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")

MUON = {"lr": 2e-2, "weight_decay": 0.1}
MIXED = {"lr": 2e-2, "weight_decay": 0.1, "adamw_lr": 1e-2, "adamw_betas": (0.9, 0.95)}


class _Net(nn.Module):
    """Matrices of several shapes for Muon: 24x16 (tall), two 24x24 (one shape group of two), 8x24 (wide), 5x8 and
    7x5 (dim 0 odd: FSDP2's shards are 3 + 2 and 4 + 3 rows, padded to 3 and 4) and a 4x7 head (AdamW under
    muon_param_groups, as are the biases of the first and last layers)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.Linear(16, 24), nn.Linear(24, 24, bias=False), nn.Linear(24, 24, bias=False),
            nn.Linear(24, 8, bias=False), nn.Linear(8, 5, bias=False), nn.Linear(5, 7, bias=False),
        ])
        self.head = nn.Linear(7, 4)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


class _Edge(nn.Module):
    """A convolution (flatten=True: its 5x1x3x3 weight is a 5x9 matrix, sharded 3 + 2), two 5x8 matrices (one
    shape group of two uneven shards: the gathered batch is sliced out of its padding) and a 1x5 matrix, of which
    rank 1 holds no row (an empty local shard, padded to one row)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.Conv2d(1, 5, 3, bias=False), nn.Linear(20, 8, bias=False), nn.Linear(8, 5, bias=False),
            nn.Linear(8, 5, bias=False), nn.Linear(5, 1, bias=False), nn.Linear(1, 4, bias=False),
        ])

    def forward(self, x):
        conv, wide, gate, value, narrow, head = self.layers
        x = torch.tanh(wide(torch.tanh(conv(x.reshape(-1, 1, 4, 4))).flatten(1)))
        return head(torch.tanh(narrow(torch.tanh(gate(x)) * torch.tanh(value(x)))))


def _net(seed: int = 0, kind: str = "muon") -> nn.Module:
    torch.manual_seed(seed)
    return _Edge() if kind == "edge" else _Net()


def _sharded_net(seed: int = 0, kind: str = "muon") -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _net(seed, kind)
    for layer in model.children():
        for sub in layer if isinstance(layer, nn.ModuleList) else [layer]:
            fully_shard(sub)
    fully_shard(model)
    return model


def _optimizer(kind: str, model: nn.Module):
    if kind == "muon":
        return fused_sched.Muon([p for p in model.parameters() if p.ndim == 2], **MUON)
    if kind == "edge":
        return fused_sched.Muon(model.parameters(), flatten=True, **MUON)
    return fused_sched.MuonWithAdamW(fused_sched.muon_param_groups(model), **MIXED)


def _one_process(kind: str, steps: int = STEPS):
    """The same optimizer in one process stepping the average of the ranks' gradients (each rank's batch through
    the unsharded model, summed, divided by the world size, as the collectives average them: exact for 2 ranks)."""
    model = _net(kind=kind)
    opt = _optimizer(kind, model)
    world = dist.get_world_size()
    for step in range(steps):
        grads = None
        for r in range(world):
            (x, y), = _batches(r, 1, step)
            model.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x), y).backward()
            g = [p.grad.clone() for p in model.parameters()]
            grads = g if grads is None else [a + b for a, b in zip(grads, g, strict=True)]
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g / world
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def _full(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _assert_equals_one_process(model, opt, single, single_opt, rank: int, kind: str) -> None:
    """Every parameter and every state tensor equal to the one process's, bit for bit (DTensors gathered)."""
    for (name, a), b in zip(model.named_parameters(), single.parameters(), strict=True):
        where = f"{kind}, rank {rank}, {name}"
        torch.testing.assert_close(_full(a), b.detach(), rtol=0, atol=0, msg=lambda m, w=where: f"{w}: {m}")
        ours, theirs = opt.state[a], single_opt.state[b]
        assert set(ours) == set(theirs), where
        for key, value in theirs.items():
            torch.testing.assert_close(_full(ours[key]), value, rtol=0, atol=0,
                                       msg=lambda m, w=where, k=key: f"{w}, state {k}: {m}")
    # The models trained: the comparison is not between two untouched copies.
    assert not torch.equal(single.layers[-2].weight, _net(kind=kind).layers[-2].weight)


# -- DistributedDataParallel ------------------------------------------------------------------------------------
def _ddp_worker(rank: int) -> None:
    from torch.nn.parallel import DistributedDataParallel

    for kind in ("muon", "mixed"):
        model = DistributedDataParallel(_net())
        opt = _optimizer(kind, model.module)
        _train(model, opt, None, rank, STEPS)
        _assert_same_on_every_rank(model.module)
        single, single_opt = _one_process(kind)
        _assert_equals_one_process(model.module, opt, single, single_opt, rank, kind)


def test_ddp_muon_equals_one_process():
    """DDP averages the gradients; every rank then runs the whole Muon step on its full replica: fused_sched.Muon
    and MuonWithAdamW (muon_param_groups) equal one process stepping the averaged gradients, bit for bit."""
    _run(_ddp_worker)


# -- FSDP2 --------------------------------------------------------------------------------------------------------
def _group_sizes(opt) -> list[int]:
    """The number of matrices of each shape group of the Muon bucket, all of them gathered (sharded)."""
    work = [b.extra for b in opt._plan.buckets if b.family == "muon"]
    assert len(work) == 1 and all(g.sharded is not None for g in work[0].groups)
    return sorted(g.batch.shape[0] for g in work[0].groups)


def _fsdp_worker(rank: int) -> None:
    from torch.distributed.tensor import DTensor

    for kind in ("muon", "mixed"):
        model = _sharded_net()
        assert all(isinstance(p, DTensor) for p in model.parameters())
        # The odd matrices are sharded unevenly: 5 rows as 3 + 2, 7 as 4 + 3.
        assert _local(model.layers[4].weight).shape[0] == (3, 2)[rank]
        assert _local(model.layers[5].weight).shape[0] == (4, 3)[rank]
        opt = _optimizer(kind, model)
        _train(model, opt, None, rank, STEPS)
        # One all-gathered shape group per shape: 24x16, 24x24 (two matrices), 8x24, 5x8, 7x5 (and 4x7 for Muon).
        assert _group_sizes(opt) == ([1] * 5 if kind == "muon" else [1] * 4) + [2]
        single, single_opt = _one_process(kind)
        # Bit for bit: the gathered batch of each shape group holds the same bfloat16 matrices as the one process's
        # workspaces (the momentum pass is elementwise on the local rows; the all-gather copies bytes), and Newton-
        # Schulz runs on the same batch of the same shape, so the same bmm / baddbmm calls give the same bits;
        # the averaged gradients are those of the one process too ((a + b) / 2 and a / 2 + b / 2 round alike: a
        # division by 2 is exact).
        _assert_equals_one_process(model, opt, single, single_opt, rank, kind)
    # A flattened convolution, two uneven 5x8 in one group, and a 1x5 matrix: rank 1's shard of it is empty, yet
    # it joins that group's gather.
    model = _sharded_net(kind="edge")
    assert _local(model.layers[4].weight).shape == ((1, 5), (0, 5))[rank]
    opt = _optimizer("edge", model)
    _train(model, opt, None, rank, STEPS)
    assert _group_sizes(opt) == [1, 1, 1, 1, 2]  # 5x9, 8x20, 1x5, 4x1; 5x8 (two)
    single, single_opt = _one_process("edge")
    _assert_equals_one_process(model, opt, single, single_opt, rank, "edge")


def test_fsdp2_muon_equals_one_process():
    """FSDP2 (DTensor parameters sharded on dim 0, uneven shards and an empty one included): fused_sched.Muon (also
    with flatten=True on a convolution) and MuonWithAdamW equal one unsharded process with the same initialization
    stepping the averaged gradients, bit for bit."""
    _run(_fsdp_worker)


# -- torch.distributed.checkpoint -----------------------------------------------------------------------------------
def _dcp_worker(rank: int, directory: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    first, rest = 5, 4
    for kind in ("muon", "mixed"):
        checkpoint = f"{directory}/{kind}"

        def build(seed: int = 0, kind=kind):
            model = _sharded_net(seed)
            opt = _optimizer(kind, model)
            return model, opt, fused_sched.lr_scheduler.CosineAnnealingLR(opt, T_max=first + rest, eta_min=1e-3)

        straight, opt, sched = build()
        straight_losses = _train(straight, opt, sched, rank, first + rest)

        model, opt, sched = build()
        losses = _train(model, opt, sched, rank, first)
        saved_sched = sched.state_dict()
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=checkpoint)
        saved = copy.deepcopy(get_optimizer_state_dict(model, opt))
        del model, opt, sched

        # A fresh model (other weights) and optimizer load the checkpoint and train the rest.
        model, opt, sched = build(seed=123)
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=checkpoint)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        sched.load_state_dict(saved_sched)
        restored = get_optimizer_state_dict(model, opt)
        assert set(restored["state"]) == set(saved["state"])
        for name, entry in saved["state"].items():
            assert set(restored["state"][name]) == set(entry), name
            for key, value in entry.items():
                torch.testing.assert_close(_local(restored["state"][name][key]), _local(value), rtol=0, atol=0)
        losses += _train(model, opt, sched, rank, rest, start=first)

        torch.testing.assert_close(losses, straight_losses, rtol=0, atol=0)
        for (name, a), (_, b) in zip(model.named_parameters(), straight.named_parameters(), strict=True):
            torch.testing.assert_close(_local(a), _local(b), rtol=0, atol=0,
                                       msg=lambda m, w=f"{kind}, rank {rank}, {name}": f"{w}: {m}")


def test_fsdp2_muon_checkpoint_resume_is_bit_exact(tmp_path):
    """Muon's momentum buffers (and the AdamW part's moments and steps) saved and loaded as DTensor shards with
    torch.distributed.checkpoint: the resumed run equals the uninterrupted one, bit for bit."""
    _run(_dcp_worker, str(tmp_path / "checkpoint"))
