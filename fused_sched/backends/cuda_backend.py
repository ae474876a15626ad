"""The CUDA C++ backend: the kernels of csrc/cuda/optim_cuda.cu launched on a bucket's device tables.

``CudaBucketRunner`` keeps the bucket's address table, chunk map and ticket counter on the device
(``device_tables.DeviceTables``, the same tables as the Triton backend's) and calls the registered operators
``torch.ops.fused_sched.cuda_adam_tables_`` / ``cuda_sgd_tables_`` / ``cuda_grad_norm_tables_``
(csrc/cuda/optim_cuda_torch.cpp): one launch per bucket and step, no host-device sync, capturable in a CUDA graph.
The compiled step (torch.compile) calls ``adam_step_`` / ``sgd_step_`` / ``grad_norm_clip`` instead, whose CUDA
implementations run the same kernels on tables built for the call.

Host emulation (tests only): tests/cuda_host_emulation.py builds optim_cuda.cu for the host, with one thread per CUDA
thread, and registers the table operators for CPU tensors; ``backends.enable_cuda_host_emulation()`` then lets
``backend="cuda"`` run CPU tensors through those kernels, so CI checks the wiring and the kernels' logic on a
machine without a GPU.
"""

from __future__ import annotations

import torch

from .device_tables import DeviceTables, NormWorkspace, build_chunks, combine_partials

# Elements per chunk, the unit of work of a block: optim_cuda.h kDefaultChunkElements (which the glue's
# list-taking ops use). Untuned: no GPU was lent when it was chosen.
CHUNK_ELEMENTS = 65536


class CudaBucketRunner(DeviceTables):
    """One bucket's device tables and its CUDA kernel launch."""

    def _configure(self, numels: list[int]) -> torch.Tensor:
        return build_chunks(numels, CHUNK_ELEMENTS)

    def _launch(self, hyper: torch.Tensor, options: dict) -> None:
        """csrc/cuda/optim_cuda.h launch_adam_tables / launch_sgd_tables."""
        o = options
        if self.algorithm == "adam":
            torch.ops.fused_sched.cuda_adam_tables_(
                self.table, self.chunks, CHUNK_ELEMENTS, self.dtype, hyper, self.counter, o["schedule"],
                o["schedule_step"], o["grad_scale"], o["found_inf"], o["clip_coef"], o["step_advance"], o["sr_seed"])
        else:  # SGD never rounds stochastically
            torch.ops.fused_sched.cuda_sgd_tables_(
                self.table, self.chunks, CHUNK_ELEMENTS, self.dtype, hyper, self.counter, o["schedule"],
                o["schedule_step"], o["grad_scale"], o["found_inf"], o["clip_coef"], o["step_advance"])

    @staticmethod
    def norm_pass(buckets, norm_type: float, max_norm: float, grad_scale: torch.Tensor | None,
                  finalize: bool = True) -> torch.Tensor:
        """A fused clip's norm pass over CUDA buckets (pairs of native bucket and runner, one device), one launch
        per bucket, the last finalizing: float32 [total_norm, clip_coef] on the device; with finalize=False the
        float64 [1] accumulation of the local gradients (triton_backend.grad_norm_pass's contract)."""
        for native, runner in buckets:
            runner.sync_tables(native)
        device = buckets[0][1].device
        # A launch uses min(n_chunks, blocks the device holds) slots, at least one: this bound needs no device query.
        slots = sum(max(1, r.chunks.shape[0]) for _, r in buckets)
        workspace = NormWorkspace.of(buckets[0][1], slots)
        out = torch.empty(2, dtype=torch.float32, device=device)
        offset = 0
        ops = torch.ops.fused_sched
        for k, (_, runner) in enumerate(buckets):
            offset += ops.cuda_grad_norm_tables_(
                runner.table, runner.chunks, CHUNK_ELEMENTS, runner.dtype, workspace.partials, offset,
                workspace.counter, out, grad_scale, float(norm_type), float(max_norm),
                finalize and k == len(buckets) - 1,
            )
        if finalize:
            return out
        return combine_partials(workspace.partials[:offset], norm_type)
