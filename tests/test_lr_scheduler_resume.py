"""A scheduler's state_dict saved mid-schedule and loaded into a fresh optimizer and scheduler (either order),
against the uninterrupted torch run.
"""

from __future__ import annotations

import io

import pytest
import torch

from fused_sched import lr_scheduler as F
from sched_cases import CASES, Pair

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


RESUME = [
    "step", "multistep", "constant", "linear_warmup", "exponential", "polynomial", "cosine_past_t_max",
    "warm_restarts_t_mult_2", "cyclic_triangular2", "one_cycle_linear_three_phase", "lambda", "multiplicative",
    "sequential_warmup_cosine", "sequential_4", "sequential_restarts", "chained_4",
]


@pytest.mark.parametrize("scheduler_first", [False, True])
@pytest.mark.parametrize("name", RESUME)
def test_state_dict_resume_mid_schedule(name, scheduler_first):
    factory = CASES[name][0]
    for stop in (37, 550):
        pair = Pair()
        scheds = pair.make(factory)
        pair.run(scheds, stop)
        state = scheds[0].state_dict()
        assert set(state) == set(scheds[1].state_dict())
        buffer = io.BytesIO()
        torch.save({"optimizer": pair.opt.state_dict(), "scheduler": state}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=False)
        # A fresh process: new parameters, optimizer and scheduler, then the checkpoint (in either order).
        resumed = Pair()
        resumed.ref_opt, resumed.steps = pair.ref_opt, pair.steps
        ours = factory(F, resumed.opt)
        if scheduler_first:
            ours.load_state_dict(saved["scheduler"])
            resumed.opt.load_state_dict(saved["optimizer"])
        else:
            resumed.opt.load_state_dict(saved["optimizer"])
            ours.load_state_dict(saved["scheduler"])
        resumed.run((ours, scheds[1]), 300)
