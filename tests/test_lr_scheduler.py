"""fused_sched.lr_scheduler against torch.optim.lr_scheduler, step after step.

The lr a kernel applied is measured exactly: a parameter p = 0 with gradient 1 and no momentum or weight decay
holds fl32(0 - lr * 1) = -fl32(lr) after a fused SGD step, so ``-p`` is compared with torch's group lr rounded to
float32 (then p is reset to 0). Host values (``get_last_lr()``, ``group["lr"]``) must equal torch's exactly.
"""

from __future__ import annotations

import inspect
import io
import math
import warnings

import pytest
import torch
from torch.optim import lr_scheduler as T

import fused_sched
from fused_sched import hf_schedules
from fused_sched import lr_scheduler as F
from fused_sched._schedule_program import evaluate_reference

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LRS = (0.1, 0.03)


def f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def ulps(a: float, b: float) -> int:
    """Distance in float32 ulps between fl32(a) and fl32(b) (0.0 and -0.0 are equal)."""
    x, y = f32(a), f32(b)
    if x.item() == y.item():
        return 0
    return abs(int(x.view(torch.int32)) - int(y.view(torch.int32)))


class Pair:
    """A fused SGD (with a unit probe per param group) and a torch SGD, driven by two schedulers in lockstep."""

    def __init__(self, lrs=LRS, backend="cpu"):
        self.probes = [torch.zeros(1, requires_grad=True) for _ in lrs]
        for p in self.probes:
            p.grad = torch.ones(1)
        self.opt = fused_sched.SGD(
            [{"params": [p], "lr": lr} for p, lr in zip(self.probes, lrs, strict=True)], lr=lrs[0], backend=backend
        )
        self.ref_opt = torch.optim.SGD(
            [{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in lrs], lr=lrs[0]
        )
        self.steps = 0
        self.off_by_one_ulp: list[tuple[int, int]] = []

    def make(self, factory):
        ours, ref = factory(F, self.opt), factory(T, self.ref_opt)
        assert isinstance(ours, T.LRScheduler) and isinstance(ours, type(ref))
        return ours, ref

    def check(self, scheds) -> None:
        """One fused step: the kernel's lr against torch's group lr; host values against torch's, exactly."""
        ours, ref = scheds
        self.opt.step()
        for g, p in enumerate(self.probes):
            expected = self.ref_opt.param_groups[g]["lr"]
            distance = ulps(-p.item(), expected)
            assert distance <= 1, f"step {self.steps} group {g}: kernel lr {-p.item()!r}, torch {expected!r}"
            if distance:
                self.off_by_one_ulp.append((self.steps, g))
            with torch.no_grad():
                p.zero_()
        assert [g["lr"] for g in self.opt.param_groups] == [g["lr"] for g in self.ref_opt.param_groups]
        assert ours.get_last_lr() == ref.get_last_lr()
        self.steps += 1

    def run(self, scheds, steps: int) -> None:
        for _ in range(steps):
            self.check(scheds)
            scheds[0].step()
            scheds[1].step()


# name: (factory, steps, exact). exact: the kernel's lr must round like torch's at every step (closed forms in torch
# too, or programs of the host's own constants); otherwise one float32 ulp is allowed where torch's recursive
# form has drifted across a rounding boundary (test_recursive_drift_is_one_ulp shows one such step).
CASES = {
    "step": (lambda M, o: M.StepLR(o, 30, 0.5), 1000, False),
    "step_7": (lambda M, o: M.StepLR(o, 7, 0.9), 1000, False),
    "multistep": (lambda M, o: M.MultiStepLR(o, [0, 10, 10, 300, 700], 0.3), 1000, True),
    "constant": (lambda M, o: M.ConstantLR(o, 0.25, 100), 1000, True),
    "constant_0_iters": (lambda M, o: M.ConstantLR(o, 0.25, 0), 200, True),
    "linear_warmup": (lambda M, o: M.LinearLR(o, 0.1, 1.0, 300), 1000, False),
    "linear_decay_to_0": (lambda M, o: M.LinearLR(o, 1.0, 0.0, 700), 1000, False),
    "linear_0_iters": (lambda M, o: M.LinearLR(o, 0.5, 1.0, 0), 200, False),
    "exponential": (lambda M, o: M.ExponentialLR(o, 0.995), 1000, False),
    "polynomial": (lambda M, o: M.PolynomialLR(o, 800, 2.0), 1000, False),
    "polynomial_sqrt": (lambda M, o: M.PolynomialLR(o, 500, 0.5), 1000, False),
    "cosine_past_t_max": (lambda M, o: M.CosineAnnealingLR(o, 100), 1000, False),
    "cosine_eta_min": (lambda M, o: M.CosineAnnealingLR(o, 333, 1e-3), 1000, False),
    "warm_restarts": (lambda M, o: M.CosineAnnealingWarmRestarts(o, 50), 1000, True),
    "warm_restarts_t_mult_2": (lambda M, o: M.CosineAnnealingWarmRestarts(o, 10, 2, 1e-4), 1000, True),
    "cyclic_triangular": (lambda M, o: M.CyclicLR(o, 0.01, 0.1, 100, cycle_momentum=False), 1000, True),
    "cyclic_triangular2": (
        lambda M, o: M.CyclicLR(o, [0.01, 0.001], [0.1, 0.05], 70, 30, "triangular2", cycle_momentum=False),
        1000,
        True,
    ),
    "cyclic_exp_range": (
        lambda M, o: M.CyclicLR(o, 0.01, 0.1, 50, mode="exp_range", gamma=0.999, cycle_momentum=False),
        1000,
        True,
    ),
    "cyclic_scale_fn": (
        lambda M, o: M.CyclicLR(o, 0.01, 0.1, 50, scale_fn=lambda x: 0.5**x, cycle_momentum=False),
        1000,
        True,
    ),
    "one_cycle_cos": (lambda M, o: M.OneCycleLR(o, 0.1, total_steps=1000, cycle_momentum=False), 1000, True),
    "one_cycle_linear_three_phase": (
        lambda M, o: M.OneCycleLR(
            o, [0.1, 0.2], total_steps=1001, anneal_strategy="linear", three_phase=True, cycle_momentum=False
        ),
        1001,
        True,
    ),
    "one_cycle_epochs": (
        lambda M, o: M.OneCycleLR(o, 0.1, epochs=10, steps_per_epoch=77, pct_start=0.25, three_phase=True,
                                  cycle_momentum=False),
        770,
        True,
    ),
    "lambda": (lambda M, o: M.LambdaLR(o, lambda t: 0.99**t), 1000, True),
    "lambda_per_group": (lambda M, o: M.LambdaLR(o, [lambda t: 1 / (1 + t), lambda t: 0.5 ** (t // 10)]), 300, True),
    "multiplicative": (lambda M, o: M.MultiplicativeLR(o, lambda t: 0.999), 1000, True),
    "sequential_warmup_cosine": (
        lambda M, o: M.SequentialLR(o, [M.LinearLR(o, 0.1, 1.0, 100), M.CosineAnnealingLR(o, 900)], [100]),
        1000,
        False,
    ),
    "sequential_4": (
        lambda M, o: M.SequentialLR(
            o,
            [M.ConstantLR(o, 0.5, 50), M.ExponentialLR(o, 0.99), M.StepLR(o, 50, 0.5), M.MultiStepLR(o, [0, 100, 300])],
            [30, 200, 600],
        ),
        1000,
        False,
    ),
    "sequential_restarts": (
        lambda M, o: M.SequentialLR(
            o, [M.CosineAnnealingWarmRestarts(o, 30, 2), M.CosineAnnealingWarmRestarts(o, 20)], [500]
        ),
        1000,
        True,
    ),
    "sequential_milestone_0": (
        lambda M, o: M.SequentialLR(o, [M.ExponentialLR(o, 0.9), M.PolynomialLR(o, 600, 1.5)], [0]),
        1000,
        False,
    ),
    "sequential_duplicate_milestones": (
        lambda M, o: M.SequentialLR(
            o, [M.ExponentialLR(o, 0.999), M.ConstantLR(o, 0.3, 20), M.LinearLR(o, 0.2, 1, 300)], [100, 100]
        ),
        1000,
        False,
    ),
    "sequential_one_cycle_inside": (
        # OneCycleLR rewrites initial_lr: SequentialLR restarts the first child from it, not from its base_lrs.
        lambda M, o: M.SequentialLR(
            o,
            [M.ConstantLR(o, 0.5, 10), M.OneCycleLR(o, 0.1, total_steps=300, cycle_momentum=False),
             M.ExponentialLR(o, 0.99)],
            [40, 340],
        ),
        1000,
        False,
    ),
    "sequential_transformers_children": (
        # fused_sched.hf_schedules (LambdaLR subclasses with programs; torch's LambdaLR on a torch optimizer).
        lambda M, o: M.SequentialLR(
            o,
            [hf_schedules.get_cosine_schedule_with_warmup(o, 50, 400), M.ExponentialLR(o, 0.99),
             hf_schedules.get_linear_schedule_with_warmup(o, 20, 300)],
            [300, 500],
        ),
        1000,
        True,
    ),
    "chained": (lambda M, o: M.ChainedScheduler([M.ConstantLR(o, 0.1, 50), M.ExponentialLR(o, 0.999)]), 1000, False),
    "chained_4": (
        lambda M, o: M.ChainedScheduler(
            [M.LinearLR(o, 0.1, 1, 100), M.StepLR(o, 100, 0.5), M.MultiStepLR(o, [300, 600], 0.1),
             M.PolynomialLR(o, 1500, 1.0)]
        ),
        1000,
        False,
    ),
    "chained_cosine_host_mode": (
        lambda M, o: M.ChainedScheduler([M.LinearLR(o, 0.1, 1, 100), M.CosineAnnealingLR(o, 300)]),
        1000,
        True,
    ),
}

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


# The Triton backend evaluates the same programs in its own float64 code (fused_sched/backends/triton/schedule.py);
# under the interpreter a step costs tens of milliseconds, so a few cases and fewer steps. The CUDA kernels include
# schedule_math.h as the CPU kernels do; these CPU-tensor tests run their host build (conftest.py), so they check
# the CUDA kernels' use of the programs, not CUDA's device cos / pow (tests/test_gpu.py does, on a GPU).
TRITON_CASES = ["cosine_eta_min", "warm_restarts_t_mult_2", "cyclic_triangular2", "polynomial_sqrt"]
DEVICE_BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(not fused_sched.backends.triton_interpreted(),
                                                    reason="needs TRITON_INTERPRET=1 (CPU tensors)")),
    pytest.param("cuda", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                  reason="CPU tensors: the host build of the CUDA kernels")),
]


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("name", TRITON_CASES)
def test_kernel_lr_matches_torch_on_device_backends(name, backend):
    factory, _, exact = CASES[name]
    pair = Pair(backend=backend)
    scheds = pair.make(factory)
    pair.run(scheds, 150)
    if exact:
        assert pair.off_by_one_ulp == []


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


def test_anchored_on_the_current_lr():
    # A second scheduler on an optimizer another one moved: torch's recursive forms start from the group lr
    # (not from initial_lr); CosineAnnealingLR returns to base_lr one step past its trough.
    for second in (
        lambda M, o: M.CosineAnnealingLR(o, 100, 1e-4),
        lambda M, o: M.StepLR(o, 7, 0.5),
        lambda M, o: M.MultiStepLR(o, [3, 9, 9, 40], 0.5),
        lambda M, o: M.ConstantLR(o, 0.5, 10),
        lambda M, o: M.LinearLR(o, 0.2, 1.0, 20),
        lambda M, o: M.PolynomialLR(o, 60, 2.0),
        lambda M, o: M.ChainedScheduler([M.LinearLR(o, 0.5, 1, 10), M.ExponentialLR(o, 0.95)]),
    ):
        pair = Pair()
        pair.run(pair.make(lambda M, o: M.ExponentialLR(o, 0.97)), 50)
        scheds = pair.make(second)
        assert not scheds[0]._host_mode
        pair.run(scheds, 400)
    # A chain of children whose counters differ (one stepped before chaining): the chain counts the first one's.
    pair = Pair()
    early = pair.make(lambda M, o: M.LinearLR(o, 0.2, 1.0, 40))
    pair.run(early, 10)
    scheds = (F.ChainedScheduler([F.StepLR(pair.opt, 7, 0.5), early[0]]),
              T.ChainedScheduler([T.StepLR(pair.ref_opt, 7, 0.5), early[1]]))
    assert not scheds[0]._host_mode
    pair.run(scheds, 200)
    # torch's constructor with last_epoch = k starts from the group lr at step k + 1.
    pair = Pair()
    for group in pair.opt.param_groups + pair.ref_opt.param_groups:
        group["initial_lr"] = 2 * group["lr"]
    pair.run(pair.make(lambda M, o: M.ExponentialLR(o, 0.9, last_epoch=10)), 100)


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


RESUME = [
    "step", "multistep", "constant", "linear_warmup", "exponential", "polynomial", "cosine_past_t_max",
    "warm_restarts_t_mult_2", "cyclic_triangular2", "one_cycle_linear_three_phase", "lambda", "multiplicative",
    "sequential_warmup_cosine", "sequential_4", "sequential_restarts", "chained_4",
]


@pytest.mark.parametrize("scheduler_first", [False, True])
@pytest.mark.parametrize("name", RESUME)
def test_state_dict_resume_mid_schedule(name, scheduler_first):
    factory = CASES[name][0]
    for stop in (37, 550):
        pair = Pair()
        scheds = pair.make(factory)
        pair.run(scheds, stop)
        state = scheds[0].state_dict()
        assert set(state) == set(scheds[1].state_dict())
        buffer = io.BytesIO()
        torch.save({"optimizer": pair.opt.state_dict(), "scheduler": state}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=False)
        # A fresh process: new parameters, optimizer and scheduler, then the checkpoint (in either order).
        resumed = Pair()
        resumed.ref_opt, resumed.steps = pair.ref_opt, pair.steps
        ours = factory(F, resumed.opt)
        if scheduler_first:
            ours.load_state_dict(saved["scheduler"])
            resumed.opt.load_state_dict(saved["optimizer"])
        else:
            resumed.opt.load_state_dict(saved["optimizer"])
            ours.load_state_dict(saved["scheduler"])
        resumed.run((ours, scheds[1]), 300)


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


MOMENTUM_CASES = {
    "cyclic": lambda M, o: M.CyclicLR(o, 0.01, 0.1, 30, base_momentum=0.7, max_momentum=0.95),
    "cyclic_triangular2": lambda M, o: M.CyclicLR(
        o, [0.01, 0.005], [0.1, 0.05], 20, 30, "triangular2", base_momentum=[0.8, 0.6], max_momentum=[0.9, 0.99]
    ),
    "cyclic_exp_range": lambda M, o: M.CyclicLR(o, 0.01, 0.1, 25, mode="exp_range", gamma=0.99),
    "cyclic_scale_fn": lambda M, o: M.CyclicLR(o, 0.01, 0.1, 25, scale_fn=lambda x: 0.9**x, scale_mode="iterations"),
    "one_cycle": lambda M, o: M.OneCycleLR(o, 0.1, total_steps=200),
    "one_cycle_linear_three_phase": lambda M, o: M.OneCycleLR(
        o, [0.1, 0.05], total_steps=200, three_phase=True, anneal_strategy="linear", base_momentum=0.8
    ),
    # Outside OneCycleLR's steps the momentum keeps the value torch leaves in the param group.
    "sequential_one_cycle_middle": lambda M, o: M.SequentialLR(
        o, [M.ConstantLR(o, 0.5, 10), M.OneCycleLR(o, 0.1, total_steps=100), M.ExponentialLR(o, 0.99)], [40, 140]
    ),
    "sequential_cyclic_first": lambda M, o: M.SequentialLR(
        o, [M.CyclicLR(o, 0.01, 0.1, 10), M.ExponentialLR(o, 0.99)], [75]
    ),
}


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("name", list(MOMENTUM_CASES))
def test_momentum_cycling_trajectory(name, kind):
    (ours, our_momenta, sched), (ref, ref_momenta, _) = _trajectories(MOMENTUM_CASES[name], kind)
    assert sched._host_mode == (name == "cyclic_scale_fn")
    assert our_momenta == ref_momenta
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


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


def test_composites_take_over_from_their_children():
    pair = Pair()
    children = [F.LinearLR(pair.opt, 0.1, 1, 10), F.ExponentialLR(pair.opt, 0.9)]
    assert pair.opt._schedule is children[1]._binding
    sequential = F.SequentialLR(pair.opt, children, [10])
    assert all(c._binding is None for c in children) and pair.opt._schedule is sequential._binding
    chained = F.ChainedScheduler([F.StepLR(pair.opt, 3), F.ConstantLR(pair.opt)])
    assert pair.opt._schedule is chained._binding
    assert "_binding" not in sequential.state_dict() and "_host_mode" not in chained.state_dict()


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


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("factory,kwargs", [
    ("get_cosine_schedule_with_warmup", {"num_warmup_steps": 20, "num_training_steps": 100}),
    ("get_wsd_schedule", {"num_warmup_steps": 10, "num_decay_steps": 40, "num_training_steps": 100,
                          "warmup_type": "cosine", "decay_type": "1-sqrt", "min_lr_ratio": 0.1}),
], ids=lambda v: v if isinstance(v, str) else "")
def test_transformers_schedule_kernel_lr_on_device_backends(factory, kwargs, backend):
    import transformers

    probe = torch.zeros(1, requires_grad=True)
    opt = fused_sched.SGD([probe], lr=0.05, backend=backend)
    ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    ours, ref = getattr(hf_schedules, factory)(opt, **kwargs), getattr(transformers, factory)(ref_opt, **kwargs)
    for step in range(130):  # past the end of the schedule
        probe.grad = torch.ones(1)
        opt.step()
        assert -probe.item() == torch.tensor(ref.get_last_lr()[0], dtype=torch.float32).item(), step
        with torch.no_grad():
            probe.zero_()
        ref_opt.step()
        ours.step()
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


def _applied_lrs(opt, p, steps, schedulers):
    """The lr each step applies to a weight with gradient 1 and no decay (SGD)."""
    lrs = []
    for _ in range(steps):
        before = p.detach().clone()
        p.grad = torch.ones_like(p)
        opt.step()
        lrs.append(float(before[0] - p.detach()[0]))
        for s in schedulers:
            s.step()
    return lrs


def test_two_schedulers_stepping_one_optimizer_like_torch():
    """torch's chaining pattern: two schedulers step the same optimizer; each step's lr is what torch applies."""
    applied = []
    for opt_class, module in ((torch.optim.SGD, T), (fused_sched.SGD, F)):
        p = torch.zeros(2, requires_grad=True)
        opt = opt_class([p], lr=1.0)
        first = module.LinearLR(opt, start_factor=0.25, total_iters=3)
        second = module.ExponentialLR(opt, gamma=0.5)
        applied.append(_applied_lrs(opt, p, 6, [first, second]))
    assert applied[1] == pytest.approx(applied[0], rel=1e-6)


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
