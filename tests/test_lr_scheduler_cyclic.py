"""CyclicLR and OneCycleLR: OneCycleLR's end, and the momentum (or betas) they cycle, against torch."""

from __future__ import annotations

import pytest
import torch
from torch.optim import lr_scheduler as T

import fused_sched
from fused_sched import lr_scheduler as F
from sched_cases import MOMENTUM_CASES, Pair

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_one_cycle_to_its_end_then_raises():
    pair = Pair()
    scheds = pair.make(lambda M, o: M.OneCycleLR(o, 0.1, total_steps=300, three_phase=True, cycle_momentum=False))
    pair.run(scheds, 300)  # t = 0 .. 299, then torch allows t = total_steps (extrapolated)
    pair.check(scheds)
    assert scheds[0].last_epoch == 300
    with pytest.raises(ValueError) as ref:
        scheds[1].step()
    with pytest.raises(ValueError) as ours:
        scheds[0].step()
    assert str(ours.value) == str(ref.value)


def _trajectories(factory, kind, steps=200):
    torch.manual_seed(0)
    init = [torch.randn(17), torch.randn(5, 3)]
    grads = [[torch.randn_like(x) for x in init] for _ in range(steps)]
    results = []
    for module, fused in ((F, True), (T, False)):
        params = [x.clone().requires_grad_() for x in init]
        groups = [{"params": [params[0]]}, {"params": [params[1]], "lr": 0.02}]
        if kind == "sgd":
            opt = (fused_sched.SGD(groups, lr=0.05, momentum=0.9, backend="cpu") if fused
                   else torch.optim.SGD(groups, lr=0.05, momentum=0.9))
        else:
            opt = (fused_sched.AdamW(groups, lr=0.05, backend="cpu") if fused
                   else torch.optim.AdamW(groups, lr=0.05))
        sched = factory(module, opt)
        momenta = []
        for k in range(steps):
            for p, g in zip(params, grads[k], strict=True):
                p.grad = g.clone()
            opt.step()
            momenta.append([(g.get("momentum"), g.get("betas")) for g in opt.param_groups])
            sched.step()
        results.append((params, momenta, sched))
    return results


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("name", list(MOMENTUM_CASES))
def test_momentum_cycling_trajectory(name, kind):
    (ours, our_momenta, sched), (ref, ref_momenta, _) = _trajectories(MOMENTUM_CASES[name], kind)
    assert sched._host_mode == (name == "cyclic_scale_fn")
    assert our_momenta == ref_momenta
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
