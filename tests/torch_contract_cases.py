"""Shared by the tests/test_torch_contract_*.py modules: where a user can tell fused_sched from torch.optim +
torch.optim.lr_scheduler, it behaves as torch does.

Each test runs fused_sched and torch side by side and reads back the learning rate a step *applied*: a probe
parameter p = 0 with gradient 1, stepped by SGD without momentum or weight decay, holds fl32(-lr) afterwards
(then it is reset to 0). The cases:

* a tensor lr written in place (``fill_``: torch's schedulers, SWALR, users) is the lr the next step applies
  (test_torch_contract_tensor_lr.py);
* GradScaler skips (found_inf) hold the schedule back from the very first step on, as the transformers Trainer's
  rule (a skipped step does not step the scheduler) does with torch (test_torch_contract_gradscaler.py);
* ``add_param_group`` after a scheduler is attached follows torch's rule for a group the scheduler did not know
  (test_torch_contract_add_param_group.py);
* neither optimizer nor scheduler keeps the other alive through a reference cycle
  (test_torch_contract_reference_cycle.py);
* a scheduler whose state alone is loaded applies the group's lr, as torch's does
  (test_torch_contract_scheduler_state.py);
* beta1 / momentum written by hand while a scheduler cycles it is used by the next step, then overwritten
  (test_torch_contract_momentum.py);
* torch's own error cases (optim_db) raise the same errors (test_torch_contract_optim_db.py);
* parameters that are strided views skipping elements are updated like torch's
  (test_torch_contract_strided_views.py).
"""

from __future__ import annotations

import pytest
import torch

from fused_sched import backends
from sched_cases import ulps

BACKENDS = [
    "cpu",
    pytest.param("triton", marks=pytest.mark.skipif(not backends.triton_interpreted() and
                                                    not torch.cuda.is_available(),
                                                    reason="Triton on CPU tensors needs TRITON_INTERPRET=1")),
    "cuda",  # conftest.py makes it runnable (the host build of the CUDA kernels without a GPU)
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _lr(value, tensor: bool):
    return torch.tensor(value, device=DEVICE) if tensor else value


class Probe:
    """An SGD (fused_sched's or torch's) over one probe parameter per param group; ``step()`` returns the lrs it
    applied, as float32 values read from the probes."""

    def __init__(self, cls, lrs, tensor_lr=False, backend=None, **kwargs):
        self.params = [torch.zeros(1, device=DEVICE, requires_grad=True) for _ in lrs]
        extra = {} if backend is None else {"backend": backend}
        self.opt = cls([{"params": [p], "lr": _lr(lr, tensor_lr)} for p, lr in zip(self.params, lrs, strict=True)],
                       lr=_lr(lrs[0], tensor_lr), **extra, **kwargs)

    def add_group(self, lr, tensor_lr=False):
        p = torch.zeros(1, device=DEVICE, requires_grad=True)
        self.params.append(p)
        self.opt.add_param_group({"params": [p], "lr": _lr(lr, tensor_lr)})

    def grads(self, value=1.0):
        for p in self.params:
            p.grad = torch.full((1,), value, device=DEVICE)

    def applied(self) -> list[float]:
        out = [-p.item() for p in self.params]
        with torch.no_grad():
            for p in self.params:
                p.zero_()
        return out

    def step(self) -> list[float]:
        self.grads()
        self.opt.step()
        return self.applied()


def assert_lrs(ours: list[float], ref: list[float], exact: bool, where: str) -> None:
    if exact:
        assert ours == ref, where
    else:
        # torch's recursive form against the kernels' closed form: one float32 ulp where torch's float64 drift
        # crosses a rounding boundary (tests/test_lr_scheduler.py test_recursive_drift_is_one_ulp).
        assert all(ulps(a, b) <= 1 for a, b in zip(ours, ref, strict=True)) and len(ours) == len(ref), where


# name: factory(module, optimizer). Every torch scheduler, with the arguments that make it move every few steps.
SCHEDULERS = {
    "StepLR": lambda M, o: M.StepLR(o, 3, 0.5),
    "MultiStepLR": lambda M, o: M.MultiStepLR(o, [2, 5], 0.3),
    "ConstantLR": lambda M, o: M.ConstantLR(o, 0.25, 4),
    "LinearLR": lambda M, o: M.LinearLR(o, 0.1, 1.0, 6),
    "ExponentialLR": lambda M, o: M.ExponentialLR(o, 0.9),
    "PolynomialLR": lambda M, o: M.PolynomialLR(o, 8, 2.0),
    "CosineAnnealingLR": lambda M, o: M.CosineAnnealingLR(o, 7, 1e-3),
    "CosineAnnealingWarmRestarts": lambda M, o: M.CosineAnnealingWarmRestarts(o, 4),
    "CyclicLR": lambda M, o: M.CyclicLR(o, 0.01, 0.1, 3, cycle_momentum=False),
    "OneCycleLR": lambda M, o: M.OneCycleLR(o, 0.1, total_steps=20, cycle_momentum=False),
    "LambdaLR": lambda M, o: M.LambdaLR(o, lambda e: 0.8**e),
    "MultiplicativeLR": lambda M, o: M.MultiplicativeLR(o, lambda e: 0.9),
    "SequentialLR": lambda M, o: M.SequentialLR(o, [M.LinearLR(o, 0.5, 1.0, 3), M.ExponentialLR(o, 0.9)], [3]),
    "ChainedScheduler": lambda M, o: M.ChainedScheduler([M.StepLR(o, 3, 0.5), M.ExponentialLR(o, 0.95)]),
}


def _transformers(name):
    transformers = pytest.importorskip("transformers")
    return getattr(transformers, name)
