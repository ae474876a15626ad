"""What the device backends (Triton and CUDA) share: a bucket's address table, chunk map and ticket counter, kept
on the bucket's device and re-uploaded only when an address or a size changes.

The layout is one contract for every kernel (csrc/include/fused_sched/optim_math.h ``TableColumn``,
csrc/cuda/launch_common.h, backends/triton/):

* address table: int64 ``[n, TABLE_COLUMNS]``, one row per tensor: param, grad, state0, state1, state2 addresses,
  column 5 (Adam: the address of the float32 step tensor; SGD: that of a bfloat16 momentum buffer's step, 0
  without; Muon: the address of the float64 lr ratio), numel, param-group index, master address (float32 copy, or
  int16 remainders), param id, state format, 8-bit absmax of state0 and state1, code table
  (docs/state_formats.md), SGD's "fresh buffer" flag (column 14). The C++ bucket (``OptimBucket.address_table``)
  writes it on the host.
* chunk map (``build_chunks``): int64 ``[n_chunks, 2]`` of (row, start); a chunk covers elements
  ``[start, min(start + chunk, numel))`` of one tensor.
* ticket counter: int32 ``[1]``, zero before the first launch; each launch leaves it zero.

Each step the C++ bucket, while it checks the gradients, rewrites its host copy of the address table and notes
whether any entry changed (2000 Adam tensors: ~50 us for the check and the table together on the 2-core CI
machine).
Only a changed table is copied to the device (pinned memory, non-blocking: no host-device sync), and only when a
tensor size changes is the chunk map rebuilt.
"""

from __future__ import annotations

import torch

TABLE_COLUMNS = 15
COL_GRAD, COL_STEP, COL_NUMEL, COL_MASTER, COL_PARAM_ID = 1, 5, 6, 8, 9
# State formats (docs/state_formats.md, fused_sched/optim/state_format.py): the format bit field, the 8-bit
# blocks' absmax of state0 and state1, the code table.
COL_FORMAT, COL_ABSMAX0, COL_ABSMAX1, COL_QMAP = 10, 11, 12, 13
# SGD: nonzero on the step that creates the momentum buffer (set for one upload, cleared by the kernel).
COL_FRESH = 14


def build_chunks(numels: list[int], chunk: int) -> torch.Tensor:
    """The chunk map of tensors with these element counts: CPU int64 ``[n_chunks, 2]`` of (row, start).

    A tensor of numel 0 gets no chunk. ``chunk`` must be the chunk size the launcher is given.
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    numels_t = torch.tensor(numels, dtype=torch.int64).reshape(-1)
    counts = (numels_t + chunk - 1) // chunk
    rows = torch.repeat_interleave(torch.arange(numels_t.numel(), dtype=torch.int64), counts)
    first = torch.cumsum(counts, 0) - counts
    starts = (torch.arange(rows.numel(), dtype=torch.int64) - first[rows]) * chunk
    return torch.stack([rows, starts], dim=1)


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of the CPU tensor `host` on `device`: pinned and non-blocking for an accelerator (no sync)."""
    if device.type == "cpu":
        return host.clone()
    return host.pin_memory().to(device, non_blocking=True)


class DeviceTables:
    """The device tables of one bucket. Subclasses choose the chunk size (``_configure``) and launch the update
    kernel (``_launch``) and the norm kernel (``_norm_slots``, ``_launch_norm``)."""

    #: The optimizer families (FusedOptimizer._algorithm) the subclass launches: its table of launchers.
    algorithms: dict = {}

    def __init__(self, device: torch.device, dtype: torch.dtype, algorithm: str):
        if algorithm not in self.algorithms:
            raise ValueError(f"unknown algorithm {algorithm!r}; {type(self).__name__} runs {sorted(self.algorithms)}")
        self.device = device
        self.dtype = dtype
        self.algorithm = algorithm
        self.launcher = self.algorithms[algorithm]  # the update kernel's launcher, resolved once
        self.counter = torch.zeros(1, dtype=torch.int32, device=device)
        self.table = None
        self.numels = None
        self.chunks = None
        self.uploads = 0  # how many times the address table was copied to the device (tests read it)
        self.norm_workspace = None  # the norm pass's, when this runner comes first in its plan

    def _configure(self, numels: list[int]) -> torch.Tensor:
        """Set the launch configuration for tensors of `numels` elements; return the host chunk map."""
        raise NotImplementedError

    def _launch(self, hyper: torch.Tensor, *, schedule, schedule_step, grad_scale, found_inf, clip_coef,
                step_advance, sr_seed, **algorithm_options) -> None:
        """One launch of the update kernel on the current tables (the arguments of ``run``)."""
        raise NotImplementedError

    def _norm_slots(self) -> int:
        """At least as many partial slots as one norm launch over this bucket uses."""
        raise NotImplementedError

    def _launch_norm(self, workspace: NormWorkspace, offset: int, out: torch.Tensor, norm_type: float,
                     max_norm: float, finalize: bool, grad_scale: torch.Tensor | None) -> int:
        """One norm launch over this bucket's gradients writing partials from `offset` on; returns the slots used."""
        raise NotImplementedError

    @staticmethod
    def norm_pass(buckets, norm_type: float, max_norm: float, grad_scale: torch.Tensor | None,
                  finalize: bool = True) -> torch.Tensor:
        """The norm pass of a fused clip over buckets of one device and backend (pairs of native bucket and
        runner): one launch per bucket, the last one finalizing. Returns float32 [total_norm, clip_coef] on the
        device; with finalize=False, the float64 [1] accumulation of the local gradients instead (sum of |g|^p, or
        max |g|), for a caller that reduces it across processes first."""
        for native, runner in buckets:
            runner.sync_tables(native)
        workspace = NormWorkspace.of(buckets[0][1], sum(r._norm_slots() for _, r in buckets))
        out = torch.empty(2, dtype=torch.float32, device=buckets[0][1].device)
        offset = 0
        for k, (_, runner) in enumerate(buckets):
            offset += runner._launch_norm(workspace, offset, out, float(norm_type), float(max_norm),
                                          finalize and k == len(buckets) - 1, grad_scale)
        if finalize:
            return out
        return combine_partials(workspace.partials[:offset], norm_type)

    def run(self, native_bucket, hyper: torch.Tensor, fresh: list[int] | None = None, *,
            schedule: torch.Tensor | None = None, schedule_step: torch.Tensor | None = None,
            grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
            clip_coef: torch.Tensor | None = None, step_advance: torch.Tensor | None = None,
            sr_seed: int = 0, release_grads: bool = True, **algorithm_options) -> None:
        """One step of the bucket: the tables brought up to date (`fresh`: SGD's fresh-buffer flags), one launch.
        hyper: float64 [groups, 8]; schedule / schedule_step: the bound device schedule; grad_scale, found_inf,
        clip_coef (float32 [1]) and step_advance (float64 [1], written): GradScaler's and a fused clip's inputs;
        sr_seed: the seed of stochastic rounding. All on the bucket's device. algorithm_options: what one family's
        launcher alone takes (Muon: ``phase``, muon_math.h MuonPass); a Muon step runs twice on the same tables, so
        only its last pass (``release_grads=True``) lets go of the gradients."""
        self.sync_tables(native_bucket, fresh)
        self._launch(hyper, schedule=schedule, schedule_step=schedule_step, grad_scale=grad_scale,
                     found_inf=found_inf, clip_coef=clip_coef, step_advance=step_advance, sr_seed=sr_seed,
                     **algorithm_options)
        if release_grads:
            native_bucket.release_grads()

    def sync_tables(self, native_bucket, fresh: list[int] | None = None) -> None:
        """Uploads the address table if the last refresh_grads() changed it (or `fresh` flags are to be set)."""
        # refresh_grads() (called by the plan check just before) rewrote the bucket's host table and noted
        # whether any address changed: that is the whole per-step check.
        changed = native_bucket.table_changed() or self.table is None
        if fresh is not None and any(fresh):
            native_bucket.address_table()[:, COL_FRESH] = torch.tensor(fresh, dtype=torch.int64)
            changed = True
        if changed:
            self._rebuild(native_bucket.address_table())
            native_bucket.mark_table_uploaded()  # the update after a clip's norm pass need not upload it again

    def _rebuild(self, host: torch.Tensor) -> None:
        numels = host[:, COL_NUMEL]
        if self.numels is None or not torch.equal(numels, self.numels):
            self.chunks = to_device(self._configure(numels.tolist()), self.device)
            self.numels = numels.clone()
        self.table = to_device(host, self.device)
        self.uploads += 1


class NormWorkspace:
    """The partials of a fused clip's norm pass and the counter of its finalizing launch. Held by the first runner
    of an optimizer's plan, so two optimizers clipping on concurrent streams never share one."""

    def __init__(self, device: torch.device, slots: int):
        self.partials = torch.empty(slots, dtype=torch.float64, device=device)
        self.counter = torch.zeros(1, dtype=torch.int32, device=device)

    @staticmethod
    def of(holder: DeviceTables, slots: int) -> NormWorkspace:
        """`holder`'s workspace, replaced by a larger one when it has fewer than `slots` partials."""
        workspace = holder.norm_workspace
        if workspace is None or workspace.partials.numel() < slots:
            workspace = holder.norm_workspace = NormWorkspace(holder.device, slots)
        return workspace


def combine_partials(partials: torch.Tensor, norm_type: float) -> torch.Tensor:
    """The float64 [1] accumulation of a norm pass's partials (sum of |g|^p, or max |g| for inf), for a caller that
    reduces it across processes before the coefficient is computed."""
    if norm_type == float("inf"):
        return partials.max().reshape(1)  # torch.max propagates NaN
    return partials.sum().reshape(1)
