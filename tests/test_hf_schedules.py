"""fused_sched.hf_schedules against transformers.optimization: host values to the bit, the lr the kernel applies
to fp32 rounding, the device programs (evaluate_reference) in float64, state dicts, every factory's errors and
signature (get_scheduler: tests/test_hf_schedules_get_scheduler.py)."""

import copy
import io
import math
import re
import warnings

import pytest
import torch

from fused_sched import hf_schedules as ours
from fused_sched._schedule_program import evaluate_reference
from hf_schedule_cases import LR, _assert_applied, _fused, _run, _same_error, _torch, hf

PAST_END = 1000

# (factory name, kwargs, total steps of the schedule): every factory with several parameter sets.
W_D_T = [(0, 100), (10, 100), (7, 53), (100, 100), (150, 100), (1, 1)]
CASES = [("get_constant_schedule", {}, 100)]
CASES += [("get_constant_schedule_with_warmup", {"num_warmup_steps": w}, 60) for w in (0, 1, 10, 37)]
CASES += [("get_linear_schedule_with_warmup", {"num_warmup_steps": w, "num_training_steps": t}, t) for w, t in W_D_T]
CASES += [
    ("get_cosine_schedule_with_warmup", {"num_warmup_steps": w, "num_training_steps": t, **kw}, t)
    for w, t, kw in [(0, 100, {}), (10, 100, {}), (10, 100, {"num_cycles": 2.5}), (5, 77, {"num_cycles": 1}),
                     (100, 100, {}), (120, 100, {}), (1, 1, {})]
]
CASES += [
    ("get_cosine_with_hard_restarts_schedule_with_warmup", {"num_warmup_steps": w, "num_training_steps": t, **kw}, t)
    for w, t, kw in [(0, 100, {}), (10, 100, {}), (10, 100, {"num_cycles": 3}), (5, 77, {"num_cycles": 4}),
                     (3, 50, {"num_cycles": 2.5}), (100, 100, {}), (130, 100, {})]
]
CASES += [
    ("get_polynomial_decay_schedule_with_warmup", {"num_warmup_steps": w, "num_training_steps": t, **kw}, t)
    for w, t, kw in [(10, 100, {}), (10, 100, {"power": 2.0, "lr_end": 1e-4}), (0, 100, {"power": 2}),
                     (7, 53, {"power": 0.5, "lr_end": 0.01}), (120, 100, {}), (0, 1, {"lr_end": 0.0})]
]
CASES += [
    ("get_inverse_sqrt_schedule", {"num_warmup_steps": w, **kw}, 100)
    for w, kw in [(10, {}), (0, {}), (10, {"timescale": 50}), (0, {"timescale": 7}), (25, {"timescale": 3})]
]
CASES += [
    ("get_cosine_with_min_lr_schedule_with_warmup", {"num_warmup_steps": w, "num_training_steps": t, **kw}, t)
    for w, t, kw in [(10, 100, {"min_lr": 1e-3}), (10, 100, {"min_lr_rate": 0.1}), (0, 100, {"min_lr_rate": 0.25}),
                     (5, 77, {"min_lr": 0.02, "num_cycles": 1.5}), (100, 100, {"min_lr_rate": 0.1}),
                     (120, 100, {"min_lr": 1e-3}), (10, 100, {"min_lr_rate": 0})]
]
CASES += [
    ("get_cosine_with_min_lr_schedule_with_warmup_lr_rate", {"num_warmup_steps": w, "num_training_steps": t, **kw}, t)
    for w, t, kw in [(10, 100, {"min_lr_rate": 0.05}), (10, 100, {"min_lr_rate": 0.05, "warmup_lr_rate": 0.1}),
                     (0, 100, {"min_lr": 1e-3}), (1, 100, {"min_lr_rate": 0.1, "warmup_lr_rate": 0.3}),
                     (2, 100, {"min_lr_rate": 0.1, "warmup_lr_rate": 0.5}),
                     (7, 53, {"min_lr": 0.01, "num_cycles": 1.5, "warmup_lr_rate": 0.0}),
                     (100, 100, {"min_lr_rate": 0.1}), (130, 100, {"min_lr_rate": 0.1, "warmup_lr_rate": 0.2})]
]
WSD_TYPES = ("linear", "cosine", "1-sqrt")
CASES += [
    ("get_wsd_schedule", {"num_warmup_steps": 10, "num_decay_steps": 30, "num_training_steps": 100,
                          "warmup_type": wt, "decay_type": dt, "min_lr_ratio": m}, 100)
    for wt in WSD_TYPES for dt in WSD_TYPES for m in ((0, 0.1) if wt == dt else (0.2,))
]
CASES += [
    ("get_wsd_schedule", {"num_warmup_steps": w, "num_decay_steps": d, **kw}, total)
    for w, d, kw, total in [
        (0, 40, {"num_training_steps": 100}, 100),
        (10, 30, {"num_stable_steps": 20, "decay_type": "linear"}, 60),
        (10, 30, {"num_training_steps": 100, "num_cycles": 1.5, "min_lr_ratio": 0.1}, 100),
        (20, 50, {"num_training_steps": 60, "decay_type": "1-sqrt"}, 60),  # negative stable phase
        (10, 0, {"num_training_steps": 50, "min_lr_ratio": 0.3}, 50),
        (0, 0, {"num_training_steps": 20}, 20),
    ]
]


def _case_id(case):
    name, kwargs, _ = case
    return name.removeprefix("get_") + "-" + "-".join(f"{k}={v}" for k, v in kwargs.items())


def _build(module, name, optimizer, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # get_wsd_schedule warns when both stable and total steps are given
        return getattr(module, name)(optimizer, **kwargs)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_transformers_every_step(case):
    name, kwargs, total = case
    opt, params = _fused()
    sched = _build(ours, name, opt, kwargs)
    hf_opt = _torch()
    hf_sched = _build(hf, name, hf_opt, kwargs)
    assert isinstance(sched, ours.ProgramLambdaLR) and isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    assert sched._binding is not None and not sched._host_mode and opt._schedule is sched._binding
    applied, expected = _run(opt, params, sched, hf_opt, hf_sched, total + PAST_END)
    _assert_applied(applied, expected)
    assert sched.state_dict() == hf_sched.state_dict()


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_program_reference_matches_transformers(case):
    name, kwargs, total = case
    opt, _ = _fused()
    sched = _build(ours, name, opt, kwargs)
    hf_sched = _build(hf, name, _torch(), kwargs)
    programs = sched._binding.programs
    steps = [*range(total + 200), *range(total + 200, 100_000, 997), 10**6 + 3, 2**40 + 1]
    for g, base_lr in enumerate(hf_sched.base_lrs):
        lam = hf_sched.lr_lambdas[g]
        for t in steps:
            want = base_lr * lam(t)
            got = evaluate_reference(programs[g], float(t))[0]
            assert abs(got - want) <= math.ulp(want), f"group {g} t={t}: program {got!r}, transformers {want!r}"


def test_jump_with_epoch_argument():
    opt, params = _fused()
    sched = ours.get_cosine_schedule_with_warmup(opt, 10, 100, num_cycles=1.5)
    hf_opt = _torch()
    hf_sched = hf.get_cosine_schedule_with_warmup(hf_opt, 10, 100, num_cycles=1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # step(epoch) is deprecated
        for epoch in (57, 3, 250, 10_001):
            sched.step(epoch)
            hf_sched.step(epoch)
            assert sched.get_last_lr() == hf_sched.get_last_lr()
            applied, expected = _run(opt, params, sched, hf_opt, hf_sched, 3)
            _assert_applied(applied, expected)


@pytest.mark.parametrize("case", [CASES[i] for i in range(0, len(CASES), 3)], ids=_case_id)
def test_state_dict_round_trip(case):
    name, kwargs, total = case
    opt, params = _fused()
    sched = _build(ours, name, opt, kwargs)
    hf_opt = _torch()
    hf_sched = _build(hf, name, hf_opt, kwargs)
    mid = max(1, total // 2 + 3)
    _run(opt, params, sched, hf_opt, hf_sched, mid)

    saved_opt, saved_sched = copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())
    assert "_binding" not in saved_sched and "_host_mode" not in saved_sched
    assert saved_sched == hf_sched.state_dict()
    torch.save(saved_sched, io.BytesIO())  # picklable: no binding, no tensors of the device side

    # a fresh optimizer and scheduler, resumed from the saved states, follows the same trajectory
    opt2, params2 = _fused()
    sched2 = _build(ours, name, opt2, kwargs)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert opt2._schedule is sched2._binding and sched2._binding.step == mid
    rest = total - mid + 50
    applied, expected = _run(opt2, params2, sched2, hf_opt, hf_sched, rest)
    _assert_applied(applied, expected)

    # transformers' own state dict loads too
    opt3, params3 = _fused()
    sched3 = _build(ours, name, opt3, kwargs)
    opt3.load_state_dict(opt2.state_dict())
    sched3.load_state_dict(hf_sched.state_dict())
    applied, expected = _run(opt3, params3, sched3, hf_opt, hf_sched, 20)
    _assert_applied(applied, expected)


def test_resume_with_last_epoch():
    opt, params = _fused()
    hf_opt = _torch()
    for group in [*opt.param_groups, *hf_opt.param_groups]:
        group["initial_lr"] = group["lr"]
    sched = ours.get_linear_schedule_with_warmup(opt, 10, 100, last_epoch=41)
    hf_sched = hf.get_linear_schedule_with_warmup(hf_opt, 10, 100, last_epoch=41)
    assert sched.last_epoch == 42 and sched._binding.step == 42
    applied, expected = _run(opt, params, sched, hf_opt, hf_sched, 100)
    _assert_applied(applied, expected)


def test_polynomial_errors_and_defaults_lr():
    # transformers normalises by optimizer.defaults["lr"] (not the group's lr) and requires lr_init > lr_end
    for lr_end in (LR, 0.5):
        with pytest.raises(ValueError) as theirs:
            hf.get_polynomial_decay_schedule_with_warmup(_torch(), 10, 100, lr_end=lr_end)
        with pytest.raises(ValueError, match=re.escape(str(theirs.value))):
            ours.get_polynomial_decay_schedule_with_warmup(_fused()[0], 10, 100, lr_end=lr_end)
    # the group lr above lr_end is not what is checked
    opt, params = _fused((LR, 1e-8))
    sched = ours.get_polynomial_decay_schedule_with_warmup(opt, 10, 100, lr_end=1e-3, power=2)
    hf_opt = _torch((LR, 1e-8))
    hf_sched = hf.get_polynomial_decay_schedule_with_warmup(hf_opt, 10, 100, lr_end=1e-3, power=2)
    _assert_applied(*_run(opt, params, sched, hf_opt, hf_sched, 300))


def test_polynomial_warmup_equal_to_total_divides_by_zero_like_transformers():
    opt, params = _fused()
    sched = ours.get_polynomial_decay_schedule_with_warmup(opt, 20, 20)
    hf_opt = _torch()
    hf_sched = hf.get_polynomial_decay_schedule_with_warmup(hf_opt, 20, 20)
    _assert_applied(*_run(opt, params, sched, hf_opt, hf_sched, 19))  # t = 0 .. 18, then t = 19
    assert sched.get_last_lr() == hf_sched.get_last_lr()
    with pytest.raises(ZeroDivisionError):  # t = 20 = W = T: (t - W) / (T - W)
        hf_sched.step()
    with pytest.raises(ZeroDivisionError):
        sched.step()


def test_factory_errors_match_transformers():
    fused_opt = _fused()[0]
    torch_opt = _torch()
    calls = [
        ("get_cosine_with_min_lr_schedule_with_warmup", (10, 100), {}),
        ("get_cosine_with_min_lr_schedule_with_warmup", (10, 100), {"min_lr": 1e-3, "min_lr_rate": 0.1}),
        ("get_cosine_with_min_lr_schedule_with_warmup_lr_rate", (10, 100), {}),
        ("get_cosine_with_min_lr_schedule_with_warmup_lr_rate", (10, 100), {"min_lr": 1e-3, "min_lr_rate": 0.1}),
        ("get_wsd_schedule", (10, 30), {}),
        ("get_wsd_schedule", (10, 30, 100), {"warmup_type": "exp"}),
        ("get_wsd_schedule", (10, 30, 100), {"decay_type": "step"}),
        ("get_linear_schedule_with_warmup", (10,), {}),
        ("get_cosine_schedule_with_warmup", (10, 100), {"min_lr": 1e-3}),
    ]
    for name, args, kwargs in calls:
        _same_error(lambda n=name, a=args, k=kwargs: getattr(ours, n)(fused_opt, *a, **k),
                    lambda n=name, a=args, k=kwargs: getattr(hf, n)(torch_opt, *a, **k))
    with pytest.warns(UserWarning, match="num_stable_steps will be used"):
        ours.get_wsd_schedule(fused_opt, 10, 30, num_training_steps=100, num_stable_steps=20)


def test_signatures_match_transformers():
    import inspect

    for name in ("get_constant_schedule", "get_constant_schedule_with_warmup", "get_linear_schedule_with_warmup",
                 "get_cosine_schedule_with_warmup", "get_cosine_with_hard_restarts_schedule_with_warmup",
                 "get_polynomial_decay_schedule_with_warmup", "get_inverse_sqrt_schedule",
                 "get_cosine_with_min_lr_schedule_with_warmup", "get_cosine_with_min_lr_schedule_with_warmup_lr_rate",
                 "get_wsd_schedule", "get_scheduler", "get_reduce_on_plateau_schedule"):
        mine = inspect.signature(getattr(ours, name)).parameters
        theirs = inspect.signature(getattr(hf, name)).parameters
        assert list(mine) == list(theirs), name
        assert [p.default for p in mine.values()] == [p.default for p in theirs.values()], name
        assert [p.kind for p in mine.values()] == [p.kind for p in theirs.values()], name
