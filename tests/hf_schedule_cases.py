"""Shared by tests/test_hf_schedules.py and tests/test_hf_schedules_get_scheduler.py: fused_sched.hf_schedules
against transformers.optimization on a probe SGD (the lr a step applied is read back from the parameters); importing
this module skips the importing test module without transformers."""

import pytest
import torch

import fused_sched

hf = pytest.importorskip("transformers.optimization")
HFSchedulerType = pytest.importorskip("transformers.trainer_utils").SchedulerType

LR = 0.1
GROUP_LRS = (LR, 0.0314)  # two param groups, the second with its own lr


def _fused(lrs=GROUP_LRS):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in lrs]
    for p in params:
        p.grad = torch.ones_like(p)
    groups = [{"params": [p], "lr": lr} for p, lr in zip(params, lrs, strict=True)]
    return fused_sched.SGD(groups, lr=LR, backend="cpu"), params


def _torch(lrs=GROUP_LRS):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=LR)


def _run(opt, params, sched, hf_opt, hf_sched, steps):
    """`steps` iterations of opt.step(); sched.step() next to transformers'; checks the host values at every step,
    returns the lrs the kernel applied (float32) and transformers' lrs (float64), [steps, groups] each."""
    applied = torch.empty(steps, len(params), dtype=torch.float32)
    expected = []
    for i in range(steps):
        hf_lrs = hf_sched.get_last_lr()
        assert sched.get_last_lr() == hf_lrs, f"step {i}"
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in hf_opt.param_groups] == hf_lrs, f"step {i}"
        opt.step()
        hf_opt.step()
        with torch.no_grad():
            for g, p in enumerate(params):
                applied[i, g] = -p[0]
                p.zero_()
        expected.append(hf_lrs)
        sched.step()
        hf_sched.step()
    return applied, torch.tensor(expected, dtype=torch.float64)


def _assert_applied(applied, expected):
    want = expected.to(torch.float32)
    bad = (applied != want).nonzero()
    if len(bad):
        i, g = bad[0].tolist()
        raise AssertionError(f"{len(bad)} mismatches; first at step {i} group {g}: kernel {applied[i, g].item()!r}, "
                             f"transformers {expected[i, g].item()!r} -> fp32 {want[i, g].item()!r}")


def _same_error(fn_ours, fn_theirs):
    with pytest.raises(Exception) as theirs:  # noqa: B017
        fn_theirs()
    with pytest.raises(Exception) as mine:  # noqa: B017
        fn_ours()
    assert type(mine.value) is type(theirs.value)
    if not isinstance(theirs.value, TypeError):  # TypeErrors name the function (same name, other module)
        assert str(mine.value) == str(theirs.value)
    return mine.value
