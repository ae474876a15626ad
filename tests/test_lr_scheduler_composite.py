"""Several schedulers on one optimizer: SequentialLR / ChainedScheduler taking over from their children, a
scheduler anchored on the lr another one left, two schedulers stepping one optimizer, against torch.
"""

from __future__ import annotations

import pytest
import torch
from torch.optim import lr_scheduler as T

import fused_sched
from fused_sched import lr_scheduler as F
from sched_cases import Pair, _applied_lrs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_anchored_on_the_current_lr():
    # A second scheduler on an optimizer another one moved: torch's recursive forms start from the group lr
    # (not from initial_lr); CosineAnnealingLR returns to base_lr one step past its trough.
    for second in (
        lambda M, o: M.CosineAnnealingLR(o, 100, 1e-4),
        lambda M, o: M.StepLR(o, 7, 0.5),
        lambda M, o: M.MultiStepLR(o, [3, 9, 9, 40], 0.5),
        lambda M, o: M.ConstantLR(o, 0.5, 10),
        lambda M, o: M.LinearLR(o, 0.2, 1.0, 20),
        lambda M, o: M.PolynomialLR(o, 60, 2.0),
        lambda M, o: M.ChainedScheduler([M.LinearLR(o, 0.5, 1, 10), M.ExponentialLR(o, 0.95)]),
    ):
        pair = Pair()
        pair.run(pair.make(lambda M, o: M.ExponentialLR(o, 0.97)), 50)
        scheds = pair.make(second)
        assert not scheds[0]._host_mode
        pair.run(scheds, 400)
    # A chain of children whose counters differ (one stepped before chaining): the chain counts the first one's.
    pair = Pair()
    early = pair.make(lambda M, o: M.LinearLR(o, 0.2, 1.0, 40))
    pair.run(early, 10)
    scheds = (F.ChainedScheduler([F.StepLR(pair.opt, 7, 0.5), early[0]]),
              T.ChainedScheduler([T.StepLR(pair.ref_opt, 7, 0.5), early[1]]))
    assert not scheds[0]._host_mode
    pair.run(scheds, 200)
    # torch's constructor with last_epoch = k starts from the group lr at step k + 1.
    pair = Pair()
    for group in pair.opt.param_groups + pair.ref_opt.param_groups:
        group["initial_lr"] = 2 * group["lr"]
    pair.run(pair.make(lambda M, o: M.ExponentialLR(o, 0.9, last_epoch=10)), 100)


def test_composites_take_over_from_their_children():
    pair = Pair()
    children = [F.LinearLR(pair.opt, 0.1, 1, 10), F.ExponentialLR(pair.opt, 0.9)]
    assert pair.opt._schedule is children[1]._binding
    sequential = F.SequentialLR(pair.opt, children, [10])
    assert all(c._binding is None for c in children) and pair.opt._schedule is sequential._binding
    chained = F.ChainedScheduler([F.StepLR(pair.opt, 3), F.ConstantLR(pair.opt)])
    assert pair.opt._schedule is chained._binding
    assert "_binding" not in sequential.state_dict() and "_host_mode" not in chained.state_dict()


def test_two_schedulers_stepping_one_optimizer_like_torch():
    """torch's chaining pattern: two schedulers step the same optimizer; each step's lr is what torch applies."""
    applied = []
    for opt_class, module in ((torch.optim.SGD, T), (fused_sched.SGD, F)):
        p = torch.zeros(2, requires_grad=True)
        opt = opt_class([p], lr=1.0)
        first = module.LinearLR(opt, start_factor=0.25, total_iters=3)
        second = module.ExponentialLR(opt, gamma=0.5)
        applied.append(_applied_lrs(opt, p, 6, [first, second]))
    assert applied[1] == pytest.approx(applied[0], rel=1e-6)
