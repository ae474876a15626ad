"""Backends that run the fused update: ``cpu`` (C++ with at::vec), ``triton`` (one Triton launch per bucket;
on CPU tensors only under ``TRITON_INTERPRET=1``) and ``cuda`` (C++/CUDA kernels, when compiled).

``backend="auto"`` picks per device: ``cpu`` for CPU tensors, ``triton`` for CUDA tensors.
"""

from __future__ import annotations

import os

import torch

NAMES = ("auto", "cpu", "triton", "cuda")


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cuda_available() -> bool:
    """True once the optimizers can run the C++/CUDA kernels (built, and wired to the optimizers' buckets)."""
    return False


def check_name(backend) -> None:
    """Construction-time check: an unknown name or a backend this installation cannot run is a ValueError."""
    if backend not in NAMES:
        raise ValueError(f"Invalid backend: {backend!r}; expected one of {', '.join(map(repr, NAMES))}")
    if backend == "triton" and not triton_importable():
        raise ValueError("backend='triton' is unavailable: the triton package cannot be imported")
    if backend == "cuda" and not cuda_available():
        from .._extension import load_extension

        if not load_extension().cuda_compiled():
            raise ValueError(
                "backend='cuda' is unavailable: fused_sched was built without its CUDA kernels (a CPU build of "
                "torch, no nvcc, or FUSED_SCHED_SKIP_CUDA=1 at build time)"
            )
        raise ValueError(
            "backend='cuda' is unavailable: the CUDA kernels are built and registered as "
            "torch.ops.fused_sched.adam_step_ / sgd_step_ for CUDA tensors, but the optimizers do not drive them yet "
            "(their device-table path is not wired); use backend='triton'"
        )


def resolve(backend: str, device: torch.device) -> str:
    """The backend that runs tensors on `device`; ValueError when the requested one cannot run there."""
    if backend == "auto":
        return "cpu" if device.type == "cpu" else "triton"
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' runs CPU tensors only; got parameters on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' runs CUDA tensors only; got parameters on {device}")
    if backend == "triton" and device.type == "cpu" and not triton_interpreted():
        raise ValueError(
            "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 before "
            "importing triton (or use backend='cpu')"
        )
    return backend
