"""The CUDA C++ backend: the kernels of csrc/cuda (adam.cu, sgd.cu, grad_norm.cu) launched on a bucket's device
tables.

``CudaBucketRunner`` keeps the bucket's address table, chunk map and ticket counter on the device
(``device_tables.DeviceTables``, the same tables as the Triton backend's) and calls the registered operators
``torch.ops.fused_sched.cuda_adam_tables_`` / ``cuda_sgd_tables_`` / ``cuda_grad_norm_tables_``
(csrc/cuda/*_torch.cpp): one launch per bucket and step, no host-device sync, capturable in a CUDA graph.
The compiled step (torch.compile) calls ``adam_step_`` / ``sgd_step_`` / ``grad_norm_clip`` instead, whose CUDA
implementations run the same kernels on tables built for the call.

Host emulation (tests only): tests/cuda_host_emulation.py builds csrc/cuda/*.cu for the host, with one thread per CUDA
thread, and registers the table operators for CPU tensors; ``backends.enable_cuda_host_emulation()`` then lets
``backend="cuda"`` run CPU tensors through those kernels, so CI checks the wiring and the kernels' logic on a
machine without a GPU.
"""

from __future__ import annotations

import torch

from .device_tables import DeviceTables, NormWorkspace, build_chunks

# Elements per chunk, the unit of work of a block: launch_common.h kDefaultChunkElements (which the glue's
# list-taking ops use). Untuned: no GPU was lent when it was chosen.
CHUNK_ELEMENTS = 65536


def _launch_adam(common: tuple, sr_seed: int) -> None:
    torch.ops.fused_sched.cuda_adam_tables_(*common, sr_seed)


def _launch_sgd(common: tuple, sr_seed: int) -> None:
    torch.ops.fused_sched.cuda_sgd_tables_(*common, sr_seed)  # bfloat16 momentum buffers


def _launch_muon(common: tuple, sr_seed: int, phase: int) -> None:
    torch.ops.fused_sched.cuda_muon_tables_(*common, phase)  # Muon never rounds stochastically


#: The table operator of each optimizer family (FusedOptimizer._algorithm): one line per optimizer.
LAUNCHERS = {
    "adam": _launch_adam,
    "sgd": _launch_sgd,
    "muon": _launch_muon,
}


class CudaBucketRunner(DeviceTables):
    """One bucket's device tables and its CUDA kernel launch."""

    algorithms = LAUNCHERS

    def _configure(self, numels: list[int]) -> torch.Tensor:
        return build_chunks(numels, CHUNK_ELEMENTS)

    def _launch(self, hyper: torch.Tensor, *, schedule, schedule_step, grad_scale, found_inf, clip_coef,
                step_advance, sr_seed, **algorithm_options) -> None:
        """csrc/cuda/adam.h launch_adam_tables / sgd.h launch_sgd_tables / muon.h launch_muon_tables, through
        LAUNCHERS."""
        common = (self.table, self.chunks, CHUNK_ELEMENTS, self.dtype, hyper, self.counter, schedule, schedule_step,
                  grad_scale, found_inf, clip_coef, step_advance)
        self.launcher(common, sr_seed, **algorithm_options)

    def _norm_slots(self) -> int:
        # A launch uses min(n_chunks, blocks the device holds) slots, at least one: this bound needs no device query.
        return max(1, self.chunks.shape[0])

    def _launch_norm(self, workspace: NormWorkspace, offset: int, out: torch.Tensor, norm_type: float,
                     max_norm: float, finalize: bool, grad_scale: torch.Tensor | None) -> int:
        """csrc/cuda/grad_norm.h launch_grad_norm_tables."""
        return torch.ops.fused_sched.cuda_grad_norm_tables_(
            self.table, self.chunks, CHUNK_ELEMENTS, self.dtype, workspace.partials, offset, workspace.counter, out,
            grad_scale, norm_type, max_norm, finalize)
