"""Parameters that are strided views skipping elements are updated like torch's, eager and under
torch.compile.
"""

from __future__ import annotations

import pytest
import torch

import fused_sched
from optim_reference import ATOL
from torch_contract_cases import BACKENDS, DEVICE

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- strided views ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_name,kwargs", [("AdamW", {"lr": 1e-2, "weight_decay": 0.1}),
                                             ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
                                             ("Adam", {"lr": 1e-2, "amsgrad": True})])
def test_strided_view_params_are_updated_like_torch(opt_name, kwargs, backend):
    torch.manual_seed(0)
    base = torch.randn(6, 8, device=DEVICE)
    # Disjoint views (torch updates overlapping parameters one after the other: no fused optimizer can):
    # even columns; even rows x columns 1, 5; odd rows x odd columns, transposed.
    views = [lambda b: b[:, ::2], lambda b: b[::2, 1:7:4], lambda b: b.t()[1::2, 1::2]]
    runs = []
    for cls, extra in ((getattr(fused_sched, opt_name), {"backend": backend}), (getattr(torch.optim, opt_name), {})):
        storage = base.clone()
        params = [torch.nn.Parameter(v(storage)) for v in views]
        dense = torch.nn.Parameter(torch.ones(5, device=DEVICE))
        assert not any(p.is_contiguous() for p in params)
        opt = cls([*params, dense], **kwargs, **extra)
        torch.manual_seed(1)
        for t in range(4):
            for p in (*params, dense):
                p.grad = torch.randn(p.shape, device=DEVICE)
            if t == 2:
                with torch.no_grad():
                    params[0].mul_(0.5)  # written by hand between steps: the next step starts from it
            opt.step()
        runs.append((storage, [p.detach().clone() for p in (*params, dense)]))
    (ours_storage, ours), (ref_storage, ref) = runs
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=ATOL)
    # The elements the views skip are untouched, as in torch.
    mask = torch.ones_like(base, dtype=torch.bool)
    for v in views:
        v(mask).fill_(False)
    assert torch.equal(ours_storage[mask], base[mask]) and torch.equal(ref_storage[mask], base[mask])


def test_strided_view_param_under_torch_compile():
    base, twin = torch.randn(4, 6), None
    twin = base.clone()
    p, q = torch.nn.Parameter(base[:, ::2]), torch.nn.Parameter(twin[:, ::2])
    ours, ref = fused_sched.AdamW([p]), torch.optim.AdamW([q], foreach=False)

    @torch.compile
    def step():
        ours.step()

    for _ in range(3):
        g = torch.randn(4, 3)
        p.grad, q.grad = g.clone(), g.clone()
        step()
        ref.step()
    torch.testing.assert_close(p, q, rtol=1e-5, atol=ATOL)
    assert torch.equal(base[:, 1::2], twin[:, 1::2])
