"""Shared by the tests/test_lr_scheduler*.py modules: the probe pair that drives fused_sched.lr_scheduler and
torch.optim.lr_scheduler in lockstep, and the scheduler cases they run.

The lr a kernel applied is measured exactly: a parameter p = 0 with gradient 1 and no momentum or weight decay
holds fl32(0 - lr * 1) = -fl32(lr) after a fused SGD step, so ``-p`` is compared with torch's group lr rounded to
float32 (then p is reset to 0). Host values (``get_last_lr()``, ``group["lr"]``) must equal torch's exactly.
"""

from __future__ import annotations

import torch
from torch.optim import lr_scheduler as T

import fused_sched
from fused_sched import hf_schedules
from fused_sched import lr_scheduler as F

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
# form has drifted across a rounding boundary (tests/test_lr_scheduler.py test_recursive_drift_is_one_ulp shows one
# such step).
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
