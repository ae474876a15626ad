"""A tensor lr written in place (``fill_``: torch's schedulers, SWALR, users), or a float lr written by hand, is
the lr the next step applies, as in torch (tests/torch_contract_cases.py: the probes).
"""

from __future__ import annotations

import pytest
import torch
from torch.optim import lr_scheduler as T
from torch.optim.swa_utils import SWALR

import fused_sched
from fused_sched import lr_scheduler as F
from torch_contract_cases import BACKENDS, DEVICE, SCHEDULERS, Probe, assert_lrs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- 1. tensor lrs written in place ------------------------------------------------------------------------------
def _scheduler_run(name, tensor_lr, backend, steps=12, write_at=(4, 9)):
    """(fused_sched's applied lrs, torch's): a scheduler of each, an lr written by hand into group 0 at the steps
    in write_at (fill_ for a tensor lr, assignment for a float)."""
    runs = []
    for module, cls, extra in ((F, fused_sched.SGD, {"backend": backend}), (T, torch.optim.SGD, {})):
        probe = Probe(cls, [0.1, 0.05], tensor_lr, **extra)
        sched = SCHEDULERS[name](module, probe.opt)
        applied = []
        for t in range(steps):
            if t in write_at:
                group = probe.opt.param_groups[0]
                if tensor_lr:
                    group["lr"].fill_(0.0123 * (t + 1))
                else:
                    group["lr"] = 0.0123 * (t + 1)
            applied.append(probe.step())
            sched.step()
        runs.append(applied)
    return runs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_tensor_lr_written_in_place_is_applied(name, backend):
    ours, ref = _scheduler_run(name, True, backend)
    # A tensor lr is torch's host value, read from the tensor by the kernels: the same float32 at every step.
    assert ours == ref


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_float_lr_written_by_hand_is_applied(name):
    ours, ref = _scheduler_run(name, False, "cpu")
    for t, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert_lrs(a, b, False, f"step {t}")


def test_tensor_lr_fill_example_from_the_issue():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = fused_sched.SGD([p], lr=torch.tensor(0.5))
    F.ExponentialLR(opt, gamma=0.5)
    opt.param_groups[0]["lr"].fill_(0.01)
    p.grad = torch.ones(3)
    opt.step()
    assert -p[0].item() == torch.tensor(0.01).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
def test_swa_recipe_applies_torchs_lrs(tensor_lr, backend):
    """ExponentialLR until SWA starts, then torch's SWALR (swa_lr=0.01, no annealing): torch applies
    [0.5, 0.45, 0.01, 0.01]."""
    runs = []
    for module, cls, extra in ((F, fused_sched.SGD, {"backend": backend}), (T, torch.optim.SGD, {})):
        probe = Probe(cls, [0.5], tensor_lr, **extra)
        sched = module.ExponentialLR(probe.opt, gamma=0.9)
        swa = SWALR(probe.opt, swa_lr=0.01, anneal_epochs=1)
        applied = []
        for t in range(4):
            applied.append(probe.step()[0])
            (sched if t < 1 else swa).step()
        runs.append(applied)
    ours, ref = runs
    assert ref == [torch.tensor(v).item() for v in (0.5, 0.45, 0.01, 0.01)]
    assert ours == ref


@pytest.mark.parametrize("backend", BACKENDS)
def test_plateau_on_a_tensor_metric_reduces_a_tensor_lr(backend):
    """ReduceLROnPlateau deciding on the device (a tensor metric) with tensor lrs: the decision is written into the
    lr tensors (torch fill_s them), and a value written in place by hand is applied."""
    runs = []
    metrics = [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5]
    for module, cls, extra in ((F, fused_sched.SGD, {"backend": backend}), (T, torch.optim.SGD, {})):
        probe = Probe(cls, [0.1, 0.2], True, **extra)
        sched = module.ReduceLROnPlateau(probe.opt, factor=0.5, patience=1)
        applied = []
        for t, m in enumerate(metrics):
            if t == 5:
                probe.opt.param_groups[1]["lr"].fill_(0.07)
            applied.append(probe.step())
            sched.step(torch.tensor(m, device=DEVICE))
        runs.append((applied, [float(v) for v in sched.get_last_lr()]))
    assert runs[0] == runs[1]
