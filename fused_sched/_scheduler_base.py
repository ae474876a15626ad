"""What every fused_sched scheduler shares: a schedule program per param group, bound to a fused_sched
optimizer so that its kernels compute the learning rate on the device.

A scheduler class subclasses the torch scheduler it replaces *and* ``DeviceScheduleMixin``. The torch base class
keeps doing the host bookkeeping exactly as torch does (``last_epoch``, ``group["lr"]``, ``get_last_lr()``,
``state_dict()``): those are host floats and never touch the device. The mixin adds the device side:

* ``_programs()`` (implemented by each class) describes lr(t) (and momentum(t) where the scheduler cycles it) of
  every param group as segments (fused_sched._schedule_program);
* the programs are packed into a table bound to the optimizer (``ScheduleBinding``), with a float64 step counter
  per device; ``step()`` advances that counter on the device (one tiny in-place add: no sync, capturable). Once a
  torch.amp.GradScaler has handed the optimizer a found_inf, the add is the optimizer's ``step_advance`` flag: its
  kernels set it to 1 when an optimizer step runs and leave it when found_inf skips one, and the scheduler's step
  clears it. So a scheduler step whose optimizer steps were all skipped does not advance the schedule, as in the
  transformers Trainer (which skips ``scheduler.step()`` on overflow itself), from the very first step on. A
  scheduler step with no optimizer step since the last one advances by 1, as torch counts it.
  The host bookkeeping then runs ahead of the device by the skipped steps: once a GradScaler has been used,
  ``get_last_lr()`` and ``state_dict()`` read the device counter (a sync, on request only) and rewind the host
  state (``last_epoch``, the groups' lr / momentum, ``get_last_lr()``) to it. A composite (SequentialLR,
  ChainedScheduler) rewinds its children's counters with its own;
* a scheduler that cannot describe itself (``_programs()`` returns None: a LambdaLR with an arbitrary callable,
  MultiplicativeLR, ...) runs in *host mode*: after each host step its new learning rates are written into CONST
  segments with a non-blocking copy from pinned memory. No sync either, but a CUDA graph cannot replay it.

With a torch.optim optimizer (not fused_sched's), the mixin does nothing and the scheduler is torch's.
"""

from __future__ import annotations

import math
import weakref

import torch

from ._hyper import momentum_of, same_lr
from ._schedule_program import CONST, LR, MOMENTUM, P0, SET, Program, Segment, evaluate_reference, pack


class ScheduleBinding:
    """The packed programs of one scheduler, their device copies and the device step counters."""

    def __init__(self, owner, programs: list[Program], step: int):
        # A weak reference to the scheduler: the optimizer holds the binding and the scheduler holds the optimizer,
        # so a strong one would make a cycle that keeps both (and every optimizer state) alive until gc runs.
        self.owner = weakref.ref(owner)
        self.programs = programs
        self.host = pack(programs)
        self.step = int(step)
        self.tables: dict = {}
        self.counters: dict = {}
        self.lr_groups = [LR in p.targets() for p in programs]
        #: The param groups' lr as this scheduler last left them: a different value in a group was written by hand,
        #: and the kernels then take it instead of the program's (until the scheduler's next step).
        self.host_lrs = None
        #: The same for the value a momentum program drives (Adam's beta1, SGD's momentum).
        self.host_momenta = None
        self.momentum_groups = [MOMENTUM in p.targets() for p in programs]
        for g, program in enumerate(programs):
            for target in program.targets():
                _check_covers_every_step(program, target, g)

    def table(self, device: torch.device) -> torch.Tensor:
        table = self.tables.get(device)
        if table is None:
            table = self.host.clone() if device.type == "cpu" else self.host.pin_memory().to(device, non_blocking=True)
            self.tables[device] = table
        return table

    def counter(self, device: torch.device) -> torch.Tensor:
        counter = self.counters.get(device)
        if counter is None:
            counter = torch.full((1,), float(self.step), dtype=torch.float64, device=device)
            self.counters[device] = counter
        return counter

    def advance(self, optimizer=None) -> None:
        """One scheduler step. When the optimizer stepped since the last scheduler step and a GradScaler has
        handed it a found_inf: + the optimizer's step_advance flag (1 when one of those optimizer steps ran, 0 when
        found_inf skipped every one), which is then cleared; otherwise (no GradScaler, no optimizer step in
        between, or no optimizer) + 1."""
        self.step += 1
        by_flag = optimizer is not None and optimizer._amp_seen and optimizer._slots["stepped"]
        if optimizer is not None:
            optimizer._slots["stepped"] = False
        for device, counter in self.counters.items():
            if by_flag:
                flag = optimizer._step_advance(device)
                counter.add_(flag)
                flag.zero_()
            else:
                counter.add_(1.0)

    def cover_groups(self, groups: int) -> None:
        """Param groups added to the optimizer after this binding was made: they get empty programs, so the
        kernels take their lr (and momentum) from the group as it is, which is what torch applies to a group its
        scheduler did not know (the scheduler's next host step then updates it by torch's rule, or raises as torch
        does)."""
        if groups <= len(self.programs):
            return
        added = groups - len(self.programs)
        self.programs = [*self.programs, *(Program([]) for _ in range(added))]
        self.lr_groups = [*self.lr_groups, *([False] * added)]
        self.momentum_groups = [*self.momentum_groups, *([False] * added)]
        if self.host_lrs is not None:
            self.host_lrs = [*self.host_lrs, *([None] * added)]
        if self.host_momenta is not None:
            self.host_momenta = [*self.host_momenta, *([None] * added)]
        self.host = pack(self.programs)
        self.tables = {}  # re-uploaded with the new rows at the next step

    def set_step(self, step: int) -> None:
        self.step = int(step)
        for counter in self.counters.values():
            counter.fill_(float(step))

    def write_consts(self, values: list) -> None:
        """Host mode: make group g's CONST lr segment hold values[g] on every device (non-blocking copies)."""
        column = torch.tensor([_const_value(v) for v in values], dtype=torch.float64)
        self.host[:, 0, P0] = column
        for device, table in self.tables.items():
            if device.type == "cpu":
                table[:, 0, P0].copy_(column)
            else:
                table[:, 0, P0].copy_(column.pin_memory(), non_blocking=True)


def _check_covers_every_step(program: Program, target: int, group: int) -> None:
    """A target that a program drives must be set at every step: the optimizer stops reading that hyper-parameter
    from its table once a program drives it, so a gap would silently leave 0 there."""
    spans = sorted((s.lo, s.hi) for s in program.segments if s.target == target and s.combine == SET)
    reach = 0.0  # steps are never negative once a scheduler is built
    for lo, hi in spans:
        if lo > reach:
            break
        reach = max(reach, hi)
    if reach != math.inf:
        raise ValueError(f"internal error: the schedule program of param group {group} leaves target {target} unset "
                         f"from step {reach}")


def host_mode_programs(lrs: list) -> list[Program]:
    """CONST lr programs. A tensor lr gets 0.0 there: the kernels read the tensor itself (see _const_value)."""
    return [Program([Segment(CONST, (_const_value(lr),))]) for lr in lrs]


def _const_value(lr) -> float:
    """An lr as a host-mode CONST segment holds it. A tensor lr is never read on the host (on an accelerator that
    would synchronize): the optimizer copies the tensor into its hyper table at every step and the kernels take
    it from there (FusedOptimizer._current_rows), so whatever wrote the tensor in place, torch's scheduler or a
    user's ``fill_``, is what the step applies."""
    return 0.0 if isinstance(lr, torch.Tensor) else float(lr)


class DeviceScheduleMixin:
    """Binds a torch scheduler subclass to a fused_sched optimizer's kernels. Put it first in the bases."""

    _binding: ScheduleBinding | None = None
    #: Whether a step that GradScaler's found_inf skipped also holds this scheduler back (ReduceLROnPlateau, which
    #: counts epochs of metrics, not optimizer steps, says no).
    _skips_with_optimizer = True

    def _programs(self) -> list[Program] | None:
        """Programs of every param group, in this scheduler's own step count; None: host mode."""
        return None

    def _fused_optimizer(self):
        from .optim._fused_optimizer import FusedOptimizer

        opt = getattr(self, "optimizer", None)
        return opt if isinstance(opt, FusedOptimizer) else None

    def _bind(self) -> None:
        """(Re)build the programs and make this scheduler the one that drives the optimizer's learning rates."""
        opt = self._fused_optimizer()
        if opt is None:
            return
        # The binding being replaced must not rewind the host state that the new one starts from
        # (get_last_lr() below and in _programs() would consult it).
        self._binding = None
        groups = len(opt.param_groups)
        if getattr(self, "_groups_known", None) is None:
            self._groups_known = groups
        # A param group added to the optimizer after this scheduler was made has no base lr here: torch's host
        # steps give it its lrs (by the class's recursive rule, or an error as in torch), so host mode follows them.
        programs = self._programs() if groups == self._groups_known else None
        host_mode = programs is None
        if host_mode:
            # The lrs the next optimizer step applies in torch: the groups' (after load_state_dict() of this
            # scheduler alone they differ from the loaded get_last_lr(), and torch's step uses the groups').
            programs = host_mode_programs([g["lr"] for g in opt.param_groups])
        self._host_mode = host_mode
        self._binding = ScheduleBinding(self, programs, self.last_epoch)
        self._record_host_lrs()
        opt._attach_schedule(self._binding)

    def _unbind(self) -> None:
        """A composite scheduler (SequentialLR, ChainedScheduler) takes over from its children."""
        opt = self._fused_optimizer()
        if opt is not None and self._binding is not None:
            opt._detach_schedule(self._binding)
        self._binding = None

    def _lr_written_by_hand(self) -> bool:
        """Whether a param group's lr differs from what this (attached, device-mode) scheduler last left there:
        written by hand, by another scheduler, or by torch.distributed.checkpoint's state initialization."""
        binding, opt = self._binding, self._fused_optimizer()
        if (binding is None or opt is None or opt._schedule is not binding or binding.host_lrs is None
                or getattr(self, "_host_mode", False)):
            return False
        return any(driven and not same_lr(g["lr"], h)
                   for g, h, driven in zip(opt.param_groups, binding.host_lrs, binding.lr_groups, strict=True))

    def _record_host_lrs(self) -> None:
        binding, opt = self._binding, self._fused_optimizer()
        if binding is not None and opt is not None:
            binding.host_lrs = [g["lr"] for g in opt.param_groups]
            binding.host_momenta = [momentum_of(g) for g in opt.param_groups]

    def _device_step(self) -> None:
        binding = self._binding
        if binding is None:
            return
        self._record_host_lrs()
        if getattr(self, "_host_mode", False):
            opt = self._fused_optimizer()
            if len(binding.programs) != len(opt.param_groups) or not all(binding.lr_groups):
                self._bind()  # a group added since: torch's host step just gave it its lr
                return
            binding.write_consts([g["lr"] for g in opt.param_groups])
            binding.step = self.last_epoch
        elif self.last_epoch == binding.step + 1:
            binding.advance(self._fused_optimizer() if self._skips_with_optimizer else None)
        else:
            binding.set_step(self.last_epoch)

    # -- steps skipped on the device (GradScaler's found_inf) -------------------------------------------------
    def _sync_skipped_steps(self) -> None:
        """Rewind the host bookkeeping to the device step counter when optimizer steps were skipped on the device.
        Reads the counter (a sync) only once a GradScaler has handed the optimizer a found_inf."""
        binding = self._binding
        opt = self._fused_optimizer()
        if (binding is None or opt is None or not opt._amp_seen or getattr(self, "_host_mode", False)
                or not self._skips_with_optimizer):
            return
        if not binding.counters:
            return
        device_step = int(next(iter(binding.counters.values())).item())
        if device_step >= binding.step:
            return
        self._rewind_host(device_step)
        if self.last_epoch == device_step:
            binding.step = device_step
        # else: a class whose last_epoch cannot be set (ChainedScheduler: its children's) keeps counting host steps
        # there; its reported lrs are the device's, and the next call compares again.

    def _rewind_host(self, step: int) -> None:
        """Make the host state that of a scheduler stepped `step` times: last_epoch, and the lr (and momentum) of
        every group from the bound programs, the values the kernels use."""
        self.last_epoch = step
        opt = self._fused_optimizer()
        lrs = []
        for group, program in zip(opt.param_groups, self._binding.programs, strict=True):
            lr, momentum = evaluate_reference(program, float(step))
            if lr == lr:
                group["lr"] = lr
            if momentum == momentum:
                if "betas" in group:
                    group["betas"] = (momentum, *group["betas"][1:])
                elif "momentum" in group:
                    group["momentum"] = momentum
            lrs.append(group["lr"])
        self._last_lr = lrs
        self._record_host_lrs()

    def get_last_lr(self):
        self._sync_skipped_steps()
        return super().get_last_lr()

    # torch's state_dict() is the scheduler's __dict__: the binding (optimizer, device tables) and the host-mode
    # flag are runtime wiring, not state, and must neither be saved nor be loaded over the live ones.
    _RUNTIME_KEYS = ("_binding", "_host_mode", "_groups_known")

    def state_dict(self):
        self._sync_skipped_steps()
        state = super().state_dict()
        for key in self._RUNTIME_KEYS:
            state.pop(key, None)
        return state

    def load_state_dict(self, state_dict):
        state_dict = {k: v for k, v in state_dict.items() if k not in self._RUNTIME_KEYS}
        super().load_state_dict(state_dict)
        if self._binding is not None:
            self._bind()  # parameters of the programs may have changed with the state
            if not self._host_mode:
                # The lrs the loaded scheduler left are its get_last_lr(); the groups hold the optimizer's own (the
                # same when the optimizer's state is loaded too, before or after). Where they differ, torch's next
                # optimizer step applies the group's lr and its next scheduler step continues from it: here, an lr
                # that differs from what the scheduler last left is one written by hand, applied until the
                # scheduler's next step, which re-anchors. (Host mode's constants are the groups' lrs already.)
                self._binding.host_lrs = list(self._last_lr)
