"""A scheduler whose state alone is loaded applies the group's lr, as torch's does."""

from __future__ import annotations

import pytest
import torch
from torch.optim import lr_scheduler as T

import fused_sched
from fused_sched import lr_scheduler as F
from torch_contract_cases import SCHEDULERS, Probe, assert_lrs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- 5. a scheduler's state loaded alone -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["LambdaLR", "MultiplicativeLR", "StepLR", "CyclicLR"])
def test_scheduler_state_loaded_alone_applies_the_groups_lr(name):
    def run(module, cls):
        probe = Probe(cls, [1.0])
        sched = SCHEDULERS[name](module, probe.opt)
        for _ in range(3):
            probe.step()
            sched.step()
        state = sched.state_dict()
        probe = Probe(cls, [1.0])
        sched = SCHEDULERS[name](module, probe.opt)
        sched.load_state_dict(state)
        applied = []
        for _ in range(3):
            applied.append(probe.step())
            sched.step()
        return applied

    ours, ref = run(F, fused_sched.SGD), run(T, torch.optim.SGD)
    for a, b in zip(ours, ref, strict=True):
        assert_lrs(a, b, name in ("LambdaLR", "MultiplicativeLR", "CyclicLR"), f"{ours} vs {ref}")
