"""fused_sched's Adam and AdamW against torch.optim (foreach=False), float32, step after step, every flag."""

import pytest

from optim_reference import twin_run

ADAM_CASES = [
    {},
    {"amsgrad": True},
    {"maximize": True},
    {"weight_decay": 0.0},
    {"weight_decay": 0.3, "amsgrad": True, "maximize": True},
    {"betas": (0.5, 0.99), "eps": 1e-3},
    {"betas": (0.0, 0.0)},
]


@pytest.mark.parametrize("name", ["AdamW", "Adam"])
@pytest.mark.parametrize("flags", ADAM_CASES, ids=str)
def test_adam_family_matches_torch(name, flags):
    defaults = {"lr": 1e-2, "weight_decay": 0.1, **flags}
    twin_run(name, defaults, [{}], steps=20)
