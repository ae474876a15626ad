"""fused_sched's SGD against torch.optim.SGD (foreach=False), float32, step after step, every flag."""

import pytest

from optim_reference import twin_run

SGD_CASES = [
    {},
    {"momentum": 0.9},
    {"momentum": 0.9, "dampening": 0.5},
    {"momentum": 0.9, "nesterov": True},
    {"momentum": 0.8, "weight_decay": 0.1, "maximize": True},
    {"weight_decay": 0.05},
    {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01, "maximize": True},
]


@pytest.mark.parametrize("flags", SGD_CASES, ids=str)
def test_sgd_matches_torch(flags):
    twin_run("SGD", {"lr": 1e-2, **flags}, [{}], steps=20)
