"""torch's own error cases and configurations (its OptimizerInfo database, optim_db) raise torch's errors and
match torch; error messages in torch's wording.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import fused_sched
from optim_reference import ATOL

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- torch's error cases (OptimizerInfo database) ----------------------------------------------------------------
def _optim_db():
    pytest.importorskip("expecttest")  # torch.testing._internal needs it
    from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db

    return {info.optim_cls.__name__: info for info in optim_db}, OptimizerErrorEnum


def _error_cases():
    try:
        infos, _ = _optim_db()
    except BaseException:  # noqa: BLE001 (pytest's skip while collecting)
        return [pytest.param(None, None, marks=pytest.mark.skip(reason="torch's optim_db needs expecttest"))]
    cases = []
    for name in ("Adam", "AdamW", "SGD", "Muon"):
        for i, error in enumerate(infos[name].optim_error_inputs_func(device="cpu", dtype=torch.float32)):
            cases.append(pytest.param(name, i, id=f"{name}-{i}-{error.optimizer_error_input.desc}"))
    return cases


@pytest.mark.parametrize("name,index", _error_cases())
def test_torch_error_cases_raise_torchs_errors(name, index):
    infos, errors = _optim_db()
    error = infos[name].optim_error_inputs_func(device="cpu", dtype=torch.float32)[index]
    inputs = error.optimizer_error_input
    cls = getattr(fused_sched, name)
    expect = (pytest.warns if issubclass(error.error_type, Warning) else pytest.raises)
    if error.error_on == errors.CONSTRUCTION_ERROR:
        with expect(error.error_type, match=error.error_regex):
            cls(inputs.params, **inputs.kwargs)
    else:
        opt = cls(inputs.params, **inputs.kwargs)
        with expect(error.error_type, match=error.error_regex):
            opt.step()


def _parity_cases():
    try:
        infos, _ = _optim_db()
    except BaseException:  # noqa: BLE001
        return [pytest.param(None, None, marks=pytest.mark.skip(reason="torch's optim_db needs expecttest"))]
    cases = []
    for name in ("Adam", "AdamW", "SGD", "Muon"):
        for i, config in enumerate(infos[name].optim_inputs_func(device="cpu")):
            cases.append(pytest.param(name, i, id=f"{name}-{i}-{config.desc}"))
    return cases


@pytest.mark.parametrize("name,index", _parity_cases())
def test_torch_configurations_match_torch(name, index):
    """Every configuration of torch's database for this optimizer, float32: 5 steps on three tensors of different
    shapes (one a transposed view), against torch.optim's for-loop implementation."""
    infos, _ = _optim_db()
    config = infos[name].optim_inputs_func(device="cpu")[index]
    kwargs = dict(config.kwargs)
    kwargs.pop("foreach", None)
    kwargs.pop("fused", None)
    if kwargs.get("differentiable"):
        pytest.skip("fused_sched refuses differentiable=True (tested in test_optim_validation.py)")
    torch.manual_seed(index)
    # Muon takes matrices only: a tall, a wide and a square one.
    shapes = [(5, 3), (3, 7), (4, 4)] if name == "Muon" else [(5, 3), (7,), (2, 3, 4)]
    inits = [torch.randn(s) for s in shapes]
    inits[0] = inits[0].t().contiguous().t()  # a transposed layout
    grads = [[torch.randn(s) for s in shapes] for _ in range(5)]

    def run(cls, **extra):
        params = [torch.nn.Parameter(x.clone()) for x in inits]
        opt = cls(params, **kwargs, **extra)
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            opt.step()
        return params

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = run(getattr(torch.optim, name), **({} if name == "Muon" else {"foreach": False}))
        ours = run(getattr(fused_sched, name))
    for a, b in zip(ours, ref, strict=True):
        # The project's parity tolerance for float32 (tests/optim_reference.py ATOL): a few ulps of reordered
        # rounding.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=ATOL)


def test_error_messages_name_torchs_wording():
    with pytest.raises(ValueError, match=re.escape("betas must be either both floats or both Tensors")):
        fused_sched.AdamW([torch.nn.Parameter(torch.zeros(1))], betas=(0.9, torch.tensor(0.99)))
