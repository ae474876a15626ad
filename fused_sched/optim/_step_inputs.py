"""What a step hands the kernels besides the tensors: the hyper table (one float64 row per param group, with the
values a bound schedule drives left to its programs), the schedule's tables and counter, and the AMP / clipping
inputs."""

from __future__ import annotations

import torch

from .. import _hyper
from ._tensors import on_device


class StepInputsMixin:
    """FusedOptimizer's hyper table, schedule binding and per-step inputs of a bucket."""

    # -- device schedules (fused_sched._scheduler_base) ------------------------------------------------------
    def _attach_schedule(self, binding) -> None:
        """Make `binding` (a scheduler's programs and step counters) the source of the learning rates."""
        if len(binding.programs) != len(self.param_groups):
            raise ValueError(f"the scheduler describes {len(binding.programs)} param groups but the optimizer has "
                             f"{len(self.param_groups)}")
        self._schedule = binding
        self._rows = None
        self._hyper = {}

    def _detach_schedule(self, binding) -> None:
        if self._schedule is binding:
            self._schedule = None
            self._rows = None
            self._hyper = {}

    def _schedule_args(self, device: torch.device) -> tuple:
        binding = self._schedule
        if binding is None:
            return None, None
        return binding.table(device), binding.counter(device)

    def _bucket_inputs(self, device: torch.device, rows: list, tables: dict, grad_scale, found_inf, clip):
        """The hyper table of `device` (built once per step and device in `tables`, tensor lrs copied in) and the
        per-step inputs of a bucket there: grad_scale, found_inf, clip_coef, step_advance (the eager and the
        compiled step)."""
        table = tables.get(device)
        if table is None:
            table = tables[device] = self._hyper_table(device, rows)
            self._device_values(table)
        amp = {
            "grad_scale": on_device(grad_scale, device),
            "found_inf": on_device(found_inf, device),
            "clip_coef": None if clip is None else clip.get(device),
            "step_advance": self._step_advance(device),
        }
        return table, amp

    def _step_advance(self, device: torch.device) -> torch.Tensor:
        """float64 [1] on `device`: whether an optimizer step ran since the bound scheduler's last step. The kernels
        set it to 1 when a step runs and leave it when GradScaler's found_inf skips one; the scheduler adds it to
        its step counter and clears it (ScheduleBinding.advance), once a GradScaler is in use."""
        advance = self._advance.get(device)
        if advance is None:
            advance = self._advance[device] = torch.zeros(1, dtype=torch.float64, device=device)
        return advance

    def _note_amp_step(self) -> None:
        """A step handed a GradScaler's found_inf. On the first one, the step_advance flags start to count: without
        a GradScaler every step ran, so a flag holds 1 exactly when an optimizer step came since the scheduler's
        last step, a fact the host knows (_slots["stepped"]); it is set so, and from now on the kernels keep it."""
        if self._amp_seen:
            return
        self._amp_seen = True
        if not self._slots["stepped"]:
            for flag in self._advance.values():  # a flag made later starts at 0
                flag.zero_()

    def _device_values(self, table: torch.Tensor) -> None:
        """Copy the learning rates held in tensors, and the betas / weight decays held in accelerator tensors (whose
        row holds 0.0: reading them on the host would synchronize), into `table` with tensor operations: on an
        accelerator device-to-device, no sync, and captured by a CUDA graph like the kernel (torch's fused
        optimizers read tensor hyper-parameters the same way); under torch.compile a traced copy, so a changing lr
        never recompiles."""
        for g, group in enumerate(self.param_groups):
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                table[g, _hyper.LR].copy_(lr.reshape(()), non_blocking=True)
            for column, value in _hyper.device_tensors(group):
                table[g, column].copy_(value.reshape(()), non_blocking=True)

    # -- plan ----------------------------------------------------------------------------------------------
    def _current_rows(self) -> list:
        rows = [self._row(g) for g in self.param_groups]
        binding = self._schedule
        if binding is not None:
            if len(binding.programs) > len(rows):
                raise ValueError(f"the attached scheduler describes {len(binding.programs)} param groups but the "
                                 f"optimizer has {len(rows)}")
            # Groups added after the scheduler was built: the kernels take their values from the groups.
            binding.cover_groups(len(rows))
            # The kernels take these values from the schedule programs: the host copies that the scheduler keeps
            # in the param groups must not cause a table upload at every step.
            # Under torch.compile the comparison would make Dynamo guard on every new lr value (a recompilation per
            # scheduler step): a compiled step always follows the program.
            compiling = torch.compiler.is_compiling()
            host_lrs = None if compiling else binding.host_lrs
            host_momenta = None if compiling else binding.host_momenta
            for g, row in enumerate(rows):
                if binding.lr_groups[g] or binding.momentum_groups[g]:
                    row = list(row)
                    flags = int(row[_hyper.FLAGS])
                    lr = self.param_groups[g]["lr"]
                    if isinstance(lr, torch.Tensor) or (host_lrs is not None and not _hyper.same_lr(lr, host_lrs[g])):
                        # A tensor lr is always read from the tensor (_device_values; the programs of tensor lrs
                        # are host mode, whose values torch's scheduler writes into the tensor in place, as a user
                        # or SWALR may). A float lr written by hand since the scheduler's last step holds, as it
                        # would in torch.
                        flags |= _hyper.LR_FROM_TABLE
                    elif binding.lr_groups[g]:
                        row[_hyper.LR] = 0.0
                    if binding.momentum_groups[g]:
                        if host_momenta is not None and not _hyper.same_lr(_hyper.momentum_of(self.param_groups[g]),
                                                                    host_momenta[g]):
                            # beta1 / momentum written by hand: the next step uses it, as torch's would.
                            flags |= _hyper.MOMENTUM_FROM_TABLE
                        else:
                            row[self._momentum_column_of(self.param_groups[g])] = 0.0
                    row[_hyper.FLAGS] = float(flags)
                    rows[g] = tuple(row)
        if rows != self._rows:
            for g in self.param_groups:
                self._validate_group(g, at_step=True)
            if self._rows is not None and len(rows) == len(self._rows):
                # A change of a value that decides which state exists (amsgrad, momentum != 0, master_weights) or
                # what a plan checks (stochastic_rounding: no float16 params) needs a new plan.
                if [self._plan_key(g) for g in self.param_groups] != getattr(self, "_needs", None):
                    self._plan = None
            self._needs = [self._plan_key(g) for g in self.param_groups]
            self._rows = rows
            self._hyper = {}
        return rows

    def _plan_key(self, group: dict) -> tuple:
        # state_rounding: SGD keeps a step only for bfloat16 buffers rounded stochastically (_needs_step)
        return (self._needed_states(group), group.get("master_weights", False),
                bool(group.get("stochastic_rounding")), group.get("state_dtype"), group.get("state_rounding"),
                group.get("optim_bits"), group.get("min_8bit_size"), group.get("block_size"))

    def _hyper_table(self, device: torch.device, rows: list) -> torch.Tensor:
        table = self._hyper.get(device)
        if table is None:
            table = torch.tensor(rows, dtype=torch.float64).reshape(len(rows), _hyper.COLUMNS)
            if device.type != "cpu":
                table = table.pin_memory().to(device, non_blocking=True)
            self._hyper[device] = table
        return table
