"""beta1 / momentum written by hand while a scheduler cycles it is used by the next step, then overwritten."""

from __future__ import annotations

import pytest
import torch
from torch.optim import lr_scheduler as T

import fused_sched
from fused_sched import lr_scheduler as F
from optim_reference import ATOL
from torch_contract_cases import BACKENDS, DEVICE

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- hyper-parameters written by hand ---------------------------------------------------------------------------
def _momentum_run(opt_name, backend, fused: bool, max_momentum=0.95):
    torch.manual_seed(0)
    w = torch.randn(6, device=DEVICE)
    grads = [torch.randn(6, device=DEVICE) for _ in range(8)]
    p = torch.nn.Parameter(w.clone())
    module = F if fused else T
    kwargs = {"backend": backend} if fused else {}
    if opt_name == "SGD":
        opt = (fused_sched.SGD if fused else torch.optim.SGD)([p], lr=0.1, momentum=0.9, **kwargs)
    else:
        opt = (fused_sched.AdamW if fused else torch.optim.AdamW)([p], lr=0.1, **kwargs)
    sched = module.OneCycleLR(opt, 0.1, total_steps=20, base_momentum=0.5, max_momentum=max_momentum)
    trajectory = []
    for t, g in enumerate(grads):
        if t == 3:
            group = opt.param_groups[0]
            if opt_name == "SGD":
                group["momentum"] = 0.2
            else:
                group["betas"] = (0.2, group["betas"][1])
        p.grad = g.clone()
        opt.step()
        sched.step()
        trajectory.append(p.detach().clone())
    return trajectory


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_name", ["SGD", "AdamW"])
def test_momentum_written_by_hand_is_used_by_the_next_step(opt_name, backend):
    ours = _momentum_run(opt_name, backend, True)
    ref = _momentum_run(opt_name, backend, False)
    # Step 3 uses 0.2: without it the trajectories part there by far more than the parity tolerance.
    for t, (a, b) in enumerate(zip(ours, ref, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=ATOL, msg=f"step {t}")


@pytest.mark.parametrize("opt_name", ["SGD", "AdamW"])
def test_cycled_momentum_outside_its_range_does_not_raise_at_step(opt_name):
    """torch checks betas / momentum only when the optimizer is made: a OneCycleLR cycling beta1 up to 1.5 steps
    on in torch, and so it does here."""
    ours = _momentum_run(opt_name, "cpu", True, max_momentum=1.5)
    ref = _momentum_run(opt_name, "cpu", False, max_momentum=1.5)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=ATOL)
