"""The schedulers' constructor errors, classes and signatures are torch's."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from torch.optim import lr_scheduler as T

import fused_sched
from fused_sched import lr_scheduler as F

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _raised(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the exception itself is what is compared
            return type(e), str(e)
    return None


def _sgd():
    return fused_sched.SGD([torch.zeros(2, requires_grad=True)], lr=0.1, backend="cpu")


INVALID = [
    ("LambdaLR", lambda M, o: M.LambdaLR(o, [lambda t: 1.0, lambda t: 1.0])),
    ("LambdaLR", lambda M, o: M.LambdaLR(o, lambda t: 1.0, last_epoch=3)),
    ("MultiplicativeLR", lambda M, o: M.MultiplicativeLR(o, 0.9)),
    ("MultiplicativeLR", lambda M, o: M.MultiplicativeLR(o, [lambda t: 1.0] * 2)),
    ("StepLR", lambda M, o: M.StepLR(object(), 3)),
    ("ConstantLR", lambda M, o: M.ConstantLR(o, factor=1.5)),
    ("ConstantLR", lambda M, o: M.ConstantLR(o, factor=-0.1)),
    ("LinearLR", lambda M, o: M.LinearLR(o, start_factor=0)),
    ("LinearLR", lambda M, o: M.LinearLR(o, start_factor=1.2)),
    ("LinearLR", lambda M, o: M.LinearLR(o, end_factor=-1)),
    ("ExponentialLR", lambda M, o: M.ExponentialLR(None, 0.9)),
    ("PolynomialLR", lambda M, o: M.PolynomialLR(o, last_epoch=4)),
    ("CosineAnnealingWarmRestarts", lambda M, o: M.CosineAnnealingWarmRestarts(o, 0)),
    ("CosineAnnealingWarmRestarts", lambda M, o: M.CosineAnnealingWarmRestarts(o, 2.5)),
    ("CosineAnnealingWarmRestarts", lambda M, o: M.CosineAnnealingWarmRestarts(o, 5, T_mult=0)),
    ("CosineAnnealingWarmRestarts", lambda M, o: M.CosineAnnealingWarmRestarts(o, 5, T_mult=1.5)),
    ("CosineAnnealingWarmRestarts", lambda M, o: M.CosineAnnealingWarmRestarts(o, 5, eta_min="0")),
    ("CosineAnnealingWarmRestarts", lambda M, o: M.CosineAnnealingWarmRestarts(o, 5).step(-1)),
    ("CyclicLR", lambda M, o: M.CyclicLR(o, 0.01, 0.1, mode="square")),
    ("CyclicLR", lambda M, o: M.CyclicLR(o, [0.01, 0.02], 0.1)),
    ("CyclicLR", lambda M, o: M.CyclicLR(o, 0.01, [0.1, 0.2])),
    ("CyclicLR", lambda M, o: M.CyclicLR(torch.optim.Adagrad([torch.zeros(1, requires_grad=True)]), 0.01, 0.1)),
    ("CyclicLR", lambda M, o: M.CyclicLR("sgd", 0.01, 0.1)),
    ("OneCycleLR", lambda M, o: M.OneCycleLR(o, 0.1)),
    ("OneCycleLR", lambda M, o: M.OneCycleLR(o, 0.1, total_steps=0)),
    ("OneCycleLR", lambda M, o: M.OneCycleLR(o, 0.1, total_steps=10.0)),
    ("OneCycleLR", lambda M, o: M.OneCycleLR(o, 0.1, epochs=0, steps_per_epoch=3)),
    ("OneCycleLR", lambda M, o: M.OneCycleLR(o, 0.1, epochs=2, steps_per_epoch=-3)),
    ("OneCycleLR", lambda M, o: M.OneCycleLR(o, 0.1, total_steps=10, pct_start=1.5)),
    ("OneCycleLR", lambda M, o: M.OneCycleLR(o, 0.1, total_steps=10, pct_start=1)),
    ("OneCycleLR", lambda M, o: M.OneCycleLR(o, 0.1, total_steps=10, anneal_strategy="exp")),
    ("OneCycleLR", lambda M, o: M.OneCycleLR(o, [0.1, 0.2], total_steps=10)),
    ("OneCycleLR", lambda M, o: M.OneCycleLR(torch.optim.Adagrad([torch.zeros(1, requires_grad=True)]), 0.1, 10)),
    ("SequentialLR", lambda M, o: M.SequentialLR(o, [], [])),
    ("SequentialLR", lambda M, o: M.SequentialLR(o, [M.StepLR(o, 2), M.StepLR(o, 3)], [])),
    ("SequentialLR", lambda M, o: M.SequentialLR(o, [M.StepLR(o, 2), object()], [3])),
    ("SequentialLR", lambda M, o: M.SequentialLR(o, [M.StepLR(o, 2), M.ReduceLROnPlateau(o)], [3])),
    ("SequentialLR", lambda M, o: M.SequentialLR(o, [M.StepLR(o, 2), M.StepLR(_sgd(), 3)], [3])),
    ("ChainedScheduler", lambda M, o: M.ChainedScheduler([])),
    ("ChainedScheduler", lambda M, o: M.ChainedScheduler([M.StepLR(o, 2), object()])),
    ("ChainedScheduler", lambda M, o: M.ChainedScheduler([M.StepLR(o, 2), M.ReduceLROnPlateau(o)])),
    ("ChainedScheduler", lambda M, o: M.ChainedScheduler([M.StepLR(o, 2)], optimizer=_sgd())),
    ("ReduceLROnPlateau", lambda M, o: M.ReduceLROnPlateau(o, factor=1.0)),
    ("ReduceLROnPlateau", lambda M, o: M.ReduceLROnPlateau(o, mode="median")),
    ("ReduceLROnPlateau", lambda M, o: M.ReduceLROnPlateau(o, threshold_mode="log")),
    ("ReduceLROnPlateau", lambda M, o: M.ReduceLROnPlateau(o, min_lr=[0.1, 0.2])),
    ("ReduceLROnPlateau", lambda M, o: M.ReduceLROnPlateau([])),
]


@pytest.mark.parametrize("case", range(len(INVALID)), ids=[f"{name}-{i}" for i, (name, _) in enumerate(INVALID)])
def test_validation_errors_match_torch(case):
    _, factory = INVALID[case]
    # Both on a fresh fused optimizer: messages that print an optimizer match too.
    expected = _raised(lambda: factory(T, _sgd()))
    assert expected is not None
    assert _raised(lambda: factory(F, _sgd())) == expected


def _parameters(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_isinstance_and_signatures():
    for name in F.__all__:
        ours, ref = getattr(F, name), getattr(T, name)
        assert issubclass(ours, ref) and issubclass(ours, T.LRScheduler)
        assert _parameters(ours.__init__) == _parameters(ref.__init__), name
        assert _parameters(ours.step) == _parameters(ref.step), name
        assert ours.__doc__
    assert "CUDA graph" in F.LambdaLR.__doc__ and "CUDA graph" in F.MultiplicativeLR.__doc__
