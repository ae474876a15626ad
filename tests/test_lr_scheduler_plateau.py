"""ReduceLROnPlateau against torch: float metrics on the host, tensor metrics decided on the device."""

from __future__ import annotations

import pytest
import torch
from torch.optim import lr_scheduler as T

import fused_sched
from fused_sched import lr_scheduler as F
from sched_cases import LRS, Pair, _applied_lrs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("metric_type", [float, torch.tensor])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"mode": "max", "factor": 0.5, "patience": 2, "threshold_mode": "abs", "cooldown": 3},
        {"patience": 0, "min_lr": [0.01, 0.001], "eps": 1e-3},
    ],
)
def test_reduce_on_plateau(kwargs, metric_type):
    pair = Pair()
    scheds = pair.make(lambda M, o: M.ReduceLROnPlateau(o, **kwargs))
    assert scheds[0]._host_mode and isinstance(scheds[0], T.ReduceLROnPlateau)
    metrics = [1.0 / (1 + k // 40) + 0.01 * (k % 3) for k in range(160)]  # plateaus of 40 steps
    for metric in metrics:
        pair.check(scheds)
        metric = metric_type(metric)
        scheds[0].step(metric)  # a tensor metric is read with float(): a sync (documented)
        scheds[1].step(metric)
        assert scheds[0].state_dict() == scheds[1].state_dict()
    assert pair.opt.param_groups[0]["lr"] < LRS[0]


# -- ReduceLROnPlateau deciding on the device ------------------------------------------------------------------
PLATEAU_CASES = {
    "min_rel": {"factor": 0.5, "patience": 2},
    "min_abs_cooldown": {"threshold_mode": "abs", "threshold": 0.05, "patience": 1, "cooldown": 2, "factor": 0.3},
    "max_rel_min_lr": {"mode": "max", "patience": 0, "factor": 0.5, "min_lr": [0.02, 0.001]},
    "max_abs_eps": {"mode": "max", "threshold_mode": "abs", "patience": 1, "eps": 0.03, "factor": 0.7},
}


def _plateau_metrics(n=80):
    g = torch.Generator().manual_seed(3)
    values, level = [], 1.0
    for i in range(n):
        level = level * 0.97 if i % 11 < 4 else level  # improvements, then plateaus
        values.append(level + 0.01 * float(torch.rand((), generator=g)))
    return values


@pytest.mark.parametrize("case", sorted(PLATEAU_CASES))
def test_plateau_tensor_metric_decides_on_the_device_like_torch(case, monkeypatch):
    import fused_sched
    from fused_sched import lr_scheduler as M

    kwargs = PLATEAU_CASES[case]
    probes = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = fused_sched.SGD([{"params": [probes[0]], "lr": 0.1}, {"params": [probes[1]], "lr": 0.04}], backend="cpu")
    ref_opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1},
                               {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.04}])
    sched = M.ReduceLROnPlateau(opt, **kwargs)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(ref_opt, **kwargs)
    for metric in _plateau_metrics():
        for p in probes:
            p.grad = torch.ones(1)
        opt.step()
        applied = [-p.detach().clone() for p in probes]
        with torch.no_grad():
            for p in probes:
                p.zero_()
        expected = [torch.tensor([g["lr"]], dtype=torch.float32) for g in ref_opt.param_groups]
        assert all(torch.equal(a, e) for a, e in zip(applied, expected, strict=True))
        # the device decision reads nothing back to the host
        metric = torch.tensor(metric)  # a float32 loss tensor, as a training loop has it
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "item", lambda self: pytest.fail("step() read a tensor on the host"))
            m.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("step() read a tensor on the host"))
            sched.step(metric)
        ref_opt.step()
        ref.step(metric)  # torch reads it with float()
    assert sched.get_last_lr() == ref.get_last_lr()
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref_opt.param_groups]
    assert (sched.best, sched.num_bad_epochs, sched.cooldown_counter) == (ref.best, ref.num_bad_epochs,
                                                                          ref.cooldown_counter)
    assert sched.state_dict() == ref.state_dict()


def test_plateau_mixing_tensor_and_float_metrics_follows_torch():
    import fused_sched
    from fused_sched import lr_scheduler as M

    p = torch.nn.Parameter(torch.zeros(1))
    opt = fused_sched.SGD([p], lr=0.1, backend="cpu")
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched, ref = M.ReduceLROnPlateau(opt, patience=1, factor=0.5), torch.optim.lr_scheduler.ReduceLROnPlateau(
        ref_opt, patience=1, factor=0.5)
    for i, value in enumerate(_plateau_metrics(40)):
        metric = torch.tensor(value)
        sched.step(metric if i % 3 else float(metric))
        ref.step(metric)
        if i % 7 == 0:
            assert sched.get_last_lr() == ref.get_last_lr()
    assert sched.state_dict() == ref.state_dict()


def test_plateau_keeps_reducing_after_its_state_was_read():
    """A tensor metric is decided on the device; reading get_last_lr() / state_dict() in between brings the host
    copies up to date and must not freeze the device's later reductions."""
    applied = []
    for opt_class, module in ((torch.optim.SGD, T), (fused_sched.SGD, F)):
        p = torch.zeros(2, requires_grad=True)
        opt = opt_class([p], lr=1.0)
        sched = module.ReduceLROnPlateau(opt, patience=0, factor=0.5)
        lrs = []
        for epoch in range(6):
            lrs += _applied_lrs(opt, p, 1, [])
            sched.step(torch.tensor(1.0))
            if epoch == 1:
                sched.get_last_lr()
                sched.state_dict()
        applied.append(lrs)
    assert applied[1] == pytest.approx(applied[0], rel=1e-6)
