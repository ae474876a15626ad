"""fused_sched under DistributedDataParallel and ZeroRedundancyOptimizer (2 CPU processes on gloo) against
torch.optim.AdamW in the same processes (tests/distributed_cases.py: the harness).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

import fused_sched
from distributed_cases import (
    STEPS,
    TOLERANCE,
    _assert_params_equal,
    _assert_same_on_every_rank,
    _mlp,
    _run,
    _train,
)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


# -- DistributedDataParallel ------------------------------------------------------------------------------------
def _ddp_worker(rank: int) -> None:
    from torch.nn.parallel import DistributedDataParallel

    base = _mlp()
    runs = {}
    for kind, opt_class, schedulers in (
        ("fused", fused_sched.AdamW, fused_sched.lr_scheduler),
        ("torch", torch.optim.AdamW, torch.optim.lr_scheduler),
    ):
        model = DistributedDataParallel(copy.deepcopy(base))
        extra = {} if kind == "fused" else {"foreach": False}
        opt = opt_class(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, **extra)
        # OneCycleLR drives lr and beta1 every step: with fused_sched both are computed by the update kernel.
        sched = schedulers.OneCycleLR(opt, max_lr=2e-2, total_steps=STEPS)
        losses = _train(model, opt, sched, rank, STEPS)
        runs[kind] = (model.module, losses, sched.get_last_lr())
    (ours, our_losses, our_lr), (theirs, their_losses, their_lr) = runs["fused"], runs["torch"]
    assert our_lr == their_lr
    torch.testing.assert_close(our_losses, their_losses)
    _assert_params_equal(ours, theirs, rank)
    _assert_same_on_every_rank(ours)
    # The models trained: the comparison is not between two untouched copies.
    assert not torch.equal(ours[0].weight, base[0].weight)


def test_ddp_matches_torch_adamw():
    _run(_ddp_worker)


# -- ZeroRedundancyOptimizer ------------------------------------------------------------------------------------
def _zero(model, opt_class, **kw):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    extra = {"foreach": False} if opt_class is torch.optim.AdamW else {}
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=opt_class, lr=1e-2, weight_decay=0.1,
                                  **extra, **kw)
    assert isinstance(opt.optim, opt_class)
    return opt


def _zero_worker(rank: int) -> None:
    from torch.nn.parallel import DistributedDataParallel

    base = _mlp()
    runs = {}
    for kind, opt_class, schedulers in (
        ("fused", fused_sched.AdamW, fused_sched.lr_scheduler),
        ("torch", torch.optim.AdamW, torch.optim.lr_scheduler),
    ):
        model = DistributedDataParallel(copy.deepcopy(base))
        opt = _zero(model, opt_class)
        # The scheduler drives the ZeroRedundancyOptimizer (a torch Optimizer, not a fused_sched one): the lr
        # reaches the local fused_sched.AdamW through its param groups, as a host value, at every step.
        sched = schedulers.CosineAnnealingLR(opt, T_max=STEPS, eta_min=1e-3)
        losses = _train(model, opt, sched, rank, STEPS)
        opt.consolidate_state_dict(to=0)
        state = opt.state_dict() if rank == 0 else None
        runs[kind] = (model, opt, losses, state)
    (ours, _, our_losses, our_state), (theirs, their_opt, their_losses, their_state) = runs["fused"], runs["torch"]
    torch.testing.assert_close(our_losses, their_losses)
    _assert_params_equal(ours.module, theirs.module, rank)
    _assert_same_on_every_rank(ours.module)
    assert not torch.equal(ours.module[0].weight, base[0].weight)
    if rank == 0:
        # Rank 0 holds the whole consolidated state: every parameter's exp_avg / exp_avg_sq / step, equal to torch's.
        assert len(our_state["state"]) == len(their_state["state"]) == len(list(base.parameters()))
        for index, their_entry in their_state["state"].items():
            our_entry = our_state["state"][index]
            assert set(our_entry) == set(their_entry)
            for key, value in their_entry.items():
                torch.testing.assert_close(our_entry[key], value, msg=lambda m, i=index, k=key: f"state {i} {k}: {m}",
                                           **TOLERANCE)
        # Every hyper-parameter torch has, with torch's value (fused_sched's groups may hold options of their own;
        # "foreach" is None for fused_sched, its default, and False as the reference was built).
        for ours_group, theirs_group in zip(our_state["param_groups"], their_state["param_groups"], strict=True):
            assert {k: ours_group[k] for k in theirs_group if k != "foreach"} == {
                k: v for k, v in theirs_group.items() if k != "foreach"
            }
    # The consolidated state loads into a fresh ZeroRedundancyOptimizer of fused_sched.AdamW (every rank takes its
    # shard of it) and training goes on as the uninterrupted torch run does.
    holder = [our_state]
    dist.broadcast_object_list(holder, src=0)
    resumed = DistributedDataParallel(copy.deepcopy(ours.module))
    resumed_opt = _zero(resumed, fused_sched.AdamW)
    resumed_opt.load_state_dict(holder[0])
    torch.testing.assert_close(_train(resumed, resumed_opt, None, rank, 3, start=STEPS),
                               _train(theirs, their_opt, None, rank, 3, start=STEPS))
    _assert_params_equal(resumed.module, theirs.module, rank)


def test_zero_redundancy_optimizer_matches_torch_adamw():
    _run(_zero_worker)
