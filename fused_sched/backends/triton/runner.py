"""The Triton backend: the launch on a bucket's device tables; the registered custom ops.

Eager path (the optimizers): ``TritonBucketRunner`` keeps the bucket's address table, chunk map and ticket
counter on the device (``device_tables.DeviceTables``: uploaded only when an address changes), and one launch
updates the whole bucket.

Registered ops: ``torch.ops.fused_sched.triton_adam_step_`` / ``triton_sgd_step_`` / ``triton_muon_step_`` take
the C++ ops' arguments (tensor lists, schedule, master weights, GradScaler and clipping inputs) and declare what
they mutate, and ``triton_grad_norm_clip`` runs a fused clip's norm pass: torch.compile treats them as opaque
custom ops, and the optimizers' compiled step calls them (fused_sched/optim/_compiled.py). They build the tables on
every call, so the eager step uses the runner instead.
"""

from __future__ import annotations

import torch

from ..device_tables import COL_FORMAT, COL_STEP, DeviceTables, NormWorkspace
from .adam import launch_adam
from .grad_norm import launch_grad_norm
from .launch import DEFAULT_QBLOCK, QBLOCK_SIZES, _launch_config
from .muon import launch_muon
from .sgd import launch_sgd

#: The launcher of each optimizer family (FusedOptimizer._algorithm): one line per optimizer.
LAUNCHERS = {
    "adam": launch_adam,
    "sgd": launch_sgd,
    "muon": launch_muon,
}


class TritonBucketRunner(DeviceTables):
    """One bucket's device tables and its Triton launch. block_size: the optimizer's 8-bit block size, the
    kernels' constexpr QBLOCK (every 8-bit row of the bucket must use it; the rows' own block size is checked
    against it whenever the table is uploaded)."""

    algorithms = LAUNCHERS

    def __init__(self, device: torch.device, dtype: torch.dtype, algorithm: str, block_size: int = DEFAULT_QBLOCK):
        if block_size not in QBLOCK_SIZES:
            raise ValueError(f"block_size must be one of {QBLOCK_SIZES}, got {block_size}")
        super().__init__(device, dtype, algorithm)
        self.config = None
        self.block_size = block_size
        self.has_formats = True  # set from the table at each upload (_rebuild)

    def _configure(self, numels: list[int]) -> torch.Tensor:
        self.config, chunks = _launch_config(self.device, numels)
        return chunks

    def _rebuild(self, host: torch.Tensor) -> None:
        # kColFormat (docs/state_formats.md): bits 0-1 the moments' format (2: 8-bit), bits 8-15 log2(block size).
        formats = host[:, COL_FORMAT]
        eight_bit = (formats & 3) == 2
        if bool(eight_bit.any()) and bool(((formats[eight_bit] >> 8) & 0xFF).ne(self.block_size.bit_length() - 1)
                                          .any()):
            raise ValueError(f"8-bit states of this bucket use another block size than the runner's {self.block_size}")
        # A bucket of float32 states only launches the kernels compiled without the formatted path (HAS_FORMATS):
        # their code and registers are those of the float32 kernels alone. SGD's kernel advances steps only in the
        # formatted variant (they belong to bfloat16 momentum buffers, formatted rows): a bucket handed steps takes it.
        self.has_formats = bool((formats != 0).any())
        if self.algorithm == "sgd":
            self.has_formats |= bool((host[:, COL_STEP] != 0).any())
        super()._rebuild(host)

    def _launch(self, hyper: torch.Tensor, **options) -> None:
        """adam.launch_adam / sgd.launch_sgd / muon.launch_muon (options: Muon's ``phase``)."""
        self.launcher(self.table, self.chunks, hyper, self.counter, self.dtype, self.config["num_programs"],
                      BLOCK=self.config["BLOCK"], CHUNK=self.config["CHUNK"], QBLOCK=self.block_size,
                      HAS_FORMATS=self.has_formats, **options)

    def _norm_slots(self) -> int:
        return max(1, min(self.config["num_programs"], self.chunks.shape[0]))

    def _launch_norm(self, workspace: NormWorkspace, offset: int, out: torch.Tensor, norm_type: float,
                     max_norm: float, finalize: bool, grad_scale: torch.Tensor | None) -> int:
        """grad_norm.launch_grad_norm."""
        return launch_grad_norm(
            self.table, self.chunks, workspace.partials, offset, workspace.counter, out, self.dtype,
            self.config["num_programs"], norm_type, max_norm, finalize=finalize, grad_scale=grad_scale,
            BLOCK=self.config["BLOCK"], CHUNK=self.config["CHUNK"],
        )
