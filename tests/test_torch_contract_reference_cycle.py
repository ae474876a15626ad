"""Neither optimizer nor scheduler keeps the other alive through a reference cycle."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import fused_sched
from fused_sched import lr_scheduler as F
from torch_contract_cases import SCHEDULERS, Probe

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- 4. no reference cycle -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_optimizer_and_scheduler_are_freed_without_gc(name):
    gc.collect()
    gc.disable()
    try:
        probe = Probe(fused_sched.SGD, [0.1, 0.05])
        sched = SCHEDULERS[name](F, probe.opt)
        probe.step()
        sched.step()
        opt_ref, sched_ref = weakref.ref(probe.opt), weakref.ref(sched)
        state_ref = weakref.ref(probe.params[0])
        del probe, sched
        assert opt_ref() is None and sched_ref() is None and state_ref() is None
    finally:
        gc.enable()


def test_deleting_the_scheduler_leaves_no_referrer_of_the_optimizer():
    """torch's test_no_cyclic_references, with fused_sched's classes."""
    p = torch.nn.Parameter(torch.empty(10))
    opt = fused_sched.SGD([p], lr=0.5)
    sched = F.LambdaLR(opt, lambda epoch: 1.0)
    del sched
    assert gc.get_referrers(opt) == []
