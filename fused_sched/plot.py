"""``python -m fused_sched plot NAME``: draw the learning-rate curve of a schedule before training with it.

NAME is a transformers schedule name (linear, cosine, cosine_with_restarts, polynomial, constant,
constant_with_warmup, inverse_sqrt, cosine_with_min_lr, cosine_warmup_with_min_lr, warmup_stable_decay) or a
fused_sched.lr_scheduler class name (StepLR, CosineAnnealingLR, OneCycleLR, ...). The curve drawn is the one the
kernels compute: the schedule's device program evaluated at every step (host mode schedules, such as LambdaLR,
plot the host values). matplotlib is an optional dependency (``pip install fused_sched[plot]``).

    python -m fused_sched plot cosine --warmup 100 --total 1000 -o lr.png
    python -m fused_sched plot OneCycleLR --total 1000 --kw max_lr=0.01 --kw three_phase=True -o lr.png
"""

from __future__ import annotations

import argparse
import ast

import torch


def _parse_kw(items: list[str]) -> dict:
    kwargs = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--kw takes key=value, got {item!r}")
        key, text = item.split("=", 1)
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            kwargs[key] = text
    return kwargs


def build(name: str, optimizer, warmup: int, total: int, kwargs: dict):
    """The scheduler NAME on `optimizer` (transformers names first, then fused_sched.lr_scheduler classes)."""
    from . import hf_schedules, lr_scheduler

    hf_names = {str(n) for n in getattr(hf_schedules, "SCHEDULER_NAMES", ())}
    if name in hf_names:
        return hf_schedules.get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                                          scheduler_specific_kwargs=kwargs or None)
    cls = getattr(lr_scheduler, name, None)
    if cls is None:
        raise SystemExit(f"unknown schedule {name!r}: use a transformers name ({', '.join(sorted(hf_names))}) or a "
                         "class of fused_sched.lr_scheduler")
    if name == "OneCycleLR":
        kwargs.setdefault("max_lr", optimizer.defaults["lr"])
        kwargs.setdefault("total_steps", total)
    if name in ("CosineAnnealingLR",):
        kwargs.setdefault("T_max", total)
    if name in ("PolynomialLR", "LinearLR", "ConstantLR"):
        kwargs.setdefault("total_iters", total)
    if name == "CyclicLR":
        kwargs.setdefault("base_lr", optimizer.defaults["lr"] / 10)
        kwargs.setdefault("max_lr", optimizer.defaults["lr"])
    return cls(optimizer, **kwargs)


def curve(name: str, lr: float, warmup: int, total: int, kwargs: dict, steps: int | None = None) -> list[float]:
    """Learning rate at steps 0 .. steps-1 as the kernels compute it."""
    from .optim import SGD

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = SGD([param], lr=lr, backend="cpu")
    scheduler = build(name, optimizer, warmup, total, dict(kwargs))
    values = []
    for _ in range(steps if steps is not None else total):
        binding = optimizer._schedule
        if binding is not None and not getattr(scheduler, "_host_mode", False):
            table = binding.table(torch.device("cpu"))
            step = torch.tensor([float(binding.step)], dtype=torch.float64)
            values.append(float(torch.ops.fused_sched.evaluate_schedule(table, step)[0, 0]))
        else:
            values.append(float(scheduler.get_last_lr()[0]))
        optimizer.step()  # no gradient: nothing is updated, the scheduler sees a stepped optimizer
        scheduler.step()
    return values


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fused_sched plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("--lr", type=float, default=1e-3, help="the optimizer's (base) learning rate")
    parser.add_argument("--warmup", type=int, default=0, help="num_warmup_steps (transformers schedules)")
    parser.add_argument("--total", type=int, default=1000, help="num_training_steps / steps plotted")
    parser.add_argument("--steps", type=int, default=None, help="steps to plot (default: --total)")
    parser.add_argument("--kw", action="append", default=[], help="extra keyword argument key=value (repeatable)")
    parser.add_argument("-o", "--output", default="lr.png")
    args = parser.parse_args(argv)
    values = curve(args.name, args.lr, args.warmup, args.total, _parse_kw(args.kw), args.steps)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("plotting needs matplotlib: pip install 'fused_sched[plot]'") from e
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(range(len(values)), values)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{args.name} (warmup {args.warmup}, total {args.total})")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"{args.output}: {len(values)} steps, lr from {min(values):.3g} to {max(values):.3g}")
