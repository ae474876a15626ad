"""transformers' learning-rate schedules (``transformers.optimization``), computed inside fused_sched's kernels.

Every factory has transformers' signature, defaults and errors, and returns a ``ProgramLambdaLR``: a
``torch.optim.lr_scheduler.LambdaLR`` whose lambda computes transformers' factor with the same float64 operations
(so ``get_last_lr()``, ``group["lr"]`` and ``state_dict()`` are transformers' to the bit) and that also describes
the schedule as a device program per param group (fused_sched._schedule_program). On a fused_sched optimizer the
kernels evaluate that program at the scheduler's device step counter: ``scheduler.step()`` uploads nothing.

    import fused_sched
    from fused_sched.hf_schedules import get_scheduler

    opt = fused_sched.AdamW(model.parameters(), lr=3e-4)
    sched = get_scheduler("cosine", opt, num_warmup_steps=100, num_training_steps=10_000)

Past the end of the schedule the values are transformers' too: cosine climbs again, linear stays at 0, polynomial
holds ``lr_end``, hard restarts give 0, warmup_stable_decay holds ``min_lr_ratio``.

With a torch.optim optimizer the schedulers are plain LambdaLRs with transformers' values.
"""

from __future__ import annotations

from ._factories import (
    get_constant_schedule,
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_cosine_with_hard_restarts_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup_lr_rate,
    get_greedy_schedule,  # noqa: F401 (a module attribute, as before the split; not in __all__)
    get_inverse_sqrt_schedule,
    get_linear_schedule_with_warmup,
    get_polynomial_decay_schedule_with_warmup,
    get_reduce_on_plateau_schedule,
    get_wsd_schedule,
)
from ._get_scheduler import (
    SCHEDULER_NAMES,
    TYPE_TO_SCHEDULER_FUNCTION,  # noqa: F401 (a module attribute, as before the split)
    SchedulerType,
    get_scheduler,
)
from ._program_lambda import ProgramLambdaLR

__all__ = [
    "ProgramLambdaLR",
    "SCHEDULER_NAMES",
    "SchedulerType",
    "get_constant_schedule",
    "get_constant_schedule_with_warmup",
    "get_cosine_schedule_with_warmup",
    "get_cosine_with_hard_restarts_schedule_with_warmup",
    "get_cosine_with_min_lr_schedule_with_warmup",
    "get_cosine_with_min_lr_schedule_with_warmup_lr_rate",
    "get_inverse_sqrt_schedule",
    "get_linear_schedule_with_warmup",
    "get_polynomial_decay_schedule_with_warmup",
    "get_reduce_on_plateau_schedule",
    "get_scheduler",
    "get_wsd_schedule",
]

# The classes and factories are defined in submodules but belong to this module's public API: their __module__ says
# so, as it did before the split (reprs, docs, and pickles of a scheduler object name the public path).
for _name in __all__:
    if callable(globals()[_name]):
        globals()[_name].__module__ = __name__
del _name
