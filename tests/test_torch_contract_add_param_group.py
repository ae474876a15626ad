"""``add_param_group`` after a scheduler is attached follows torch's rule for a group the scheduler did not
know.
"""

from __future__ import annotations

import pytest
import torch
from torch.optim import lr_scheduler as T

import fused_sched
from fused_sched import lr_scheduler as F
from torch_contract_cases import SCHEDULERS, Probe, _transformers, assert_lrs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- 3. add_param_group after a scheduler -------------------------------------------------------------------------
def _outcome(run):
    try:
        return run()
    except (ValueError, KeyError, RuntimeError, IndexError) as error:
        return type(error)


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("name", [*sorted(SCHEDULERS), "ReduceLROnPlateau", "hf_cosine"])
def test_add_param_group_after_the_scheduler_follows_torch(name, tensor_lr):
    def factory(module, opt):
        if name == "ReduceLROnPlateau":
            return module.ReduceLROnPlateau(opt, factor=0.5, patience=0)
        if name == "hf_cosine":
            if module is T:
                return _transformers("get_cosine_schedule_with_warmup")(opt, 2, 10)
            return fused_sched.get_cosine_schedule_with_warmup(opt, 2, 10)
        return SCHEDULERS[name](module, opt)

    def run(module, cls):
        probe = Probe(cls, [0.1], tensor_lr)
        sched = factory(module, probe.opt)
        applied = [probe.step()]
        sched.step(*([1.0] if name == "ReduceLROnPlateau" else []))
        probe.add_group(0.3, tensor_lr)
        for _ in range(6):
            applied.append(probe.step())
            sched.step(*([1.0] if name == "ReduceLROnPlateau" else []))
        return applied

    ours = _outcome(lambda: run(F, fused_sched.SGD))
    ref = _outcome(lambda: run(T, torch.optim.SGD))
    if isinstance(ref, type):  # torch raises: so must fused_sched, with the same error
        assert ours is ref
        return
    assert isinstance(ours, list), ours
    for t, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert_lrs(a, b, tensor_lr, f"step {t}")
