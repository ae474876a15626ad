"""fused_sched.lr_scheduler against torch.optim.lr_scheduler, step after step: the lr every scheduler's kernel
applies (the cases of tests/sched_cases.py), step(epoch) jumps, hand-written lrs, and the schedule programs against
torch's closed forms.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim import lr_scheduler as T

import fused_sched
from fused_sched import lr_scheduler as F
from fused_sched._schedule_program import evaluate_reference
from sched_cases import CASES, LRS, MOMENTUM_CASES, Pair, ulps

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


HOST_MODE = {"cyclic_scale_fn", "lambda", "lambda_per_group", "multiplicative", "chained_cosine_host_mode"}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_lr_matches_torch(name):
    factory, steps, exact = CASES[name]
    pair = Pair()
    scheds = pair.make(factory)
    assert scheds[0]._host_mode == (name in HOST_MODE)
    assert pair.opt._schedule is scheds[0]._binding
    pair.run(scheds, steps)
    if exact:
        assert pair.off_by_one_ulp == []


def test_recursive_drift_is_one_ulp():
    # torch's CosineAnnealingLR steps lr_t = eta + (lr_{t-1} - eta) * (1 + cos(pi t/T)) / (1 + cos(pi (t-1)/T)),
    # restarting from base at t = T + 1. For this base and T_max the float64 drift of that recursion crosses a
    # float32 rounding boundary at t = 204: the kernel (closed form) is one ulp away from torch's group lr, and
    # equals the float32 rounding of torch's own closed form (the deprecated step(epoch) path).
    base, period = 0.1830002110115798, 188
    pair = Pair(lrs=(base,))
    scheds = pair.make(lambda M, o: M.CosineAnnealingLR(o, period))
    pair.run(scheds, 1000)
    assert pair.off_by_one_ulp == [(204, 0)]
    closed = (1 + math.cos(math.pi * 204 / period)) / 2 * base
    assert ulps(closed, evaluate_reference(scheds[0]._binding.programs[0], 204.0)[0]) == 0


@pytest.mark.parametrize(
    "factory, epochs",
    [
        (lambda M, o: M.StepLR(o, 7, 0.5), [3, 20, 5, 40]),
        (lambda M, o: M.MultiStepLR(o, [3, 9, 9, 40], 0.5), [5, 10, 2, 50]),
        (lambda M, o: M.ConstantLR(o, 0.5, 10), [3, 12, 4]),
        (lambda M, o: M.LinearLR(o, 0.2, 1.0, 20), [5, 30, 2]),
        (lambda M, o: M.ExponentialLR(o, 0.9), [5, 1, 30]),
        (lambda M, o: M.PolynomialLR(o, 60, 2.0), [5, 70, 10]),
        (lambda M, o: M.CosineAnnealingLR(o, 30, 1e-3), [5, 45, 100, 2]),
        (lambda M, o: M.CosineAnnealingWarmRestarts(o, 10), [2.5, 13.25, 0.5, 31]),
        (lambda M, o: M.CosineAnnealingWarmRestarts(o, 10, 2, 1e-3), [2.5, 13.25, 35, 0.75, 75.5, 70]),
        (lambda M, o: M.CyclicLR(o, 0.01, 0.1, 10, cycle_momentum=False), [5, 33, 2]),
        (lambda M, o: M.LambdaLR(o, lambda t: 1 / (1 + t)), [5, 3]),
        (lambda M, o: M.MultiplicativeLR(o, lambda t: 0.9), [5, 3]),
    ],
)
def test_step_epoch_keeps_device_in_sync(factory, epochs):
    pair = Pair()
    scheds = pair.make(factory)
    for epoch in epochs:
        pair.run(scheds, 7)
        pair.check(scheds)
        scheds[0].step(epoch)
        scheds[1].step(epoch)
    pair.run(scheds, 40)


def _program_cases():
    """(factory, closed form at t or None: compare with torch's host value, exact in float64)."""
    def closed(sched):
        def at(t):
            sched.last_epoch = t
            return sched._get_closed_form_lr()
        return at
    return {
        "step": (CASES["step_7"][0], closed, True),
        "multistep": (CASES["multistep"][0], closed, False),
        "constant": (CASES["constant"][0], closed, False),
        "linear": (CASES["linear_warmup"][0], closed, True),
        "exponential": (CASES["exponential"][0], closed, True),
        "polynomial": (CASES["polynomial_sqrt"][0], closed, True),
        "cosine": (CASES["cosine_eta_min"][0], closed, True),
        "cosine_past_t_max": (CASES["cosine_past_t_max"][0], closed, True),
        "warm_restarts": (CASES["warm_restarts_t_mult_2"][0], None, True),
        "cyclic": (MOMENTUM_CASES["cyclic_triangular2"], None, True),
        "cyclic_exp_range": (MOMENTUM_CASES["cyclic_exp_range"], None, True),
        "one_cycle": (lambda M, o: M.OneCycleLR(o, [0.1, 0.3], total_steps=1200), None, True),
        "one_cycle_three_phase": (
            lambda M, o: M.OneCycleLR(o, 0.1, total_steps=1200, three_phase=True, anneal_strategy="linear"), None, True
        ),
        "sequential": (CASES["sequential_4"][0], None, False),
        "chained": (CASES["chained_4"][0], None, False),
    }


@pytest.mark.parametrize("name", list(_program_cases()))
def test_programs_against_torch_closed_forms(name):
    factory, closed, exact = _program_cases()[name]
    params = [torch.zeros(1, requires_grad=True) for _ in LRS]
    groups = [{"params": [p], "lr": lr} for p, lr in zip(params, LRS, strict=True)]
    ref_opt = torch.optim.SGD(groups, lr=LRS[0], momentum=0.9)
    ref = factory(T, ref_opt)
    # The same class on a torch optimizer: not bound, its programs are built all the same.
    ours = factory(F, torch.optim.SGD([{"params": [torch.zeros(1)], "lr": lr} for lr in LRS], lr=LRS[0], momentum=0.9))
    assert ours._binding is None
    programs = ours._programs()
    at = closed(ref) if closed else None
    for t in range(1200):
        expected = at(t) if at else ref.get_last_lr()
        for g, program in enumerate(programs):
            lr, momentum = evaluate_reference(program, float(t))
            if exact:
                assert lr == expected[g], (t, g)
            else:
                assert lr == pytest.approx(expected[g], rel=1e-13), (t, g)
            if not math.isnan(momentum):
                assert momentum == ref_opt.param_groups[g]["momentum"], (t, g)
        if not at:
            ref.step()


def test_lr_written_by_hand_holds_until_the_next_scheduler_step():
    """torch reads group["lr"] at every optimizer step, so an lr written by hand (torch.distributed.checkpoint sets
    every group's lr to 0 for one step, then restores it) takes effect at once; with a bound device schedule too."""
    base = torch.randn(64, dtype=torch.float64).float()
    ours, theirs = base.clone().requires_grad_(), base.clone().requires_grad_()
    opt = fused_sched.AdamW([ours], lr=0.1, weight_decay=0.5)
    ref = torch.optim.AdamW([theirs], lr=0.1, weight_decay=0.5, foreach=False)
    sched, ref_sched = F.CosineAnnealingLR(opt, T_max=10), T.CosineAnnealingLR(ref, T_max=10)

    def step(hand_lr=None):
        g = torch.randn(64)
        ours.grad, theirs.grad = g.clone(), g.clone()
        saved = [opt.param_groups[0]["lr"], ref.param_groups[0]["lr"]]
        if hand_lr is not None:
            opt.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = hand_lr
        opt.step()
        ref.step()
        if hand_lr is not None:  # restored, as the checkpoint code does
            opt.param_groups[0]["lr"], ref.param_groups[0]["lr"] = saved
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=1e-7)

    for hand_lr in (None, None, 0.0, None, 0.37, None):
        step(hand_lr)
        sched.step()
        ref_sched.step()
    # Written by hand and kept: torch's recursive steps continue from it, and so do the kernels.
    opt.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = 0.5
    for _ in range(3):
        step()
        sched.step()
        ref_sched.step()
        assert sched.get_last_lr() == pytest.approx(ref_sched.get_last_lr(), rel=1e-12)
    frozen = ours.detach().clone()
    opt.param_groups[0]["lr"] = 0.0  # and a zero lr with AdamW's weight decay moves nothing
    ours.grad = torch.zeros(64)
    opt.step()
    assert torch.equal(ours.detach(), frozen)
