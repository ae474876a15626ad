"""Backends that run the fused update: ``cpu`` (C++ with at::vec), ``triton`` (one Triton launch per bucket;
on CPU tensors only under ``TRITON_INTERPRET=1``) and ``cuda`` (one launch per bucket of the C++/CUDA kernels in
csrc/cuda, when fused_sched was built with them).

``backend="auto"`` picks per device: ``cpu`` for CPU tensors; for CUDA tensors ``triton``, or ``cuda`` when
triton cannot be imported. Why triton first: the auto choice is to follow the benchmark's measurement of the two
on a GPU (``python -m bench`` times both), and no GPU run of the CUDA kernels exists yet; until one does, the
backend whose kernels have run on GPUs stays the default.
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


# Set by enable_cuda_host_emulation() (tests/cuda_host_emulation.py): the CUDA table operators are registered for
# CPU tensors by a host build of the CUDA kernels.
_cuda_host_emulation = False


def enable_cuda_host_emulation() -> None:
    """Tests only: let ``backend="cuda"`` run CPU tensors, through the host build of the CUDA kernels that
    tests/cuda_host_emulation.py registers as the CPU implementation of the CUDA table operators."""
    global _cuda_host_emulation
    _cuda_host_emulation = True


def disable_cuda_host_emulation() -> None:
    global _cuda_host_emulation
    _cuda_host_emulation = False


def cuda_available() -> bool:
    """True when the C++/CUDA kernels can run: built into the extension (or emulated on the host, in tests)."""
    if _cuda_host_emulation:
        return True
    from .._extension import load_extension

    return bool(load_extension().cuda_compiled())


def check_name(backend) -> None:
    """Construction-time check: an unknown name or a backend this installation cannot run is a ValueError."""
    if backend not in NAMES:
        raise ValueError(f"Invalid backend: {backend!r}; expected one of {', '.join(map(repr, NAMES))}")
    if backend == "triton" and not triton_importable():
        raise ValueError("backend='triton' is unavailable: the triton package cannot be imported")
    if backend == "cuda" and not cuda_available():
        raise ValueError(
            "backend='cuda' is unavailable: fused_sched was built without its CUDA kernels (a CPU build of "
            "torch, no nvcc, or FUSED_SCHED_SKIP_CUDA=1 at build time)"
        )


def resolve(backend: str, device: torch.device) -> str:
    """The backend that runs tensors on `device`; ValueError when the requested one cannot run there."""
    if backend == "auto":
        if device.type == "cpu":
            return "cpu"
        if triton_importable():
            return "triton"
        if device.type == "cuda" and cuda_available():
            return "cuda"
        raise ValueError(f"no fused_sched backend runs tensors on {device}: the triton package cannot be imported"
                         + ("" if device.type != "cuda" else " and fused_sched was built without its CUDA kernels"))
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' runs CPU tensors only; got parameters on {device}")
    if backend == "cuda":
        if device.type == "cpu" and _cuda_host_emulation:
            return backend
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' runs CUDA tensors only; got parameters on {device}")
        check_name(backend)  # an optimizer unpickled into an installation without the kernels
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            raise ValueError(f"backend='cuda' needs a GPU of compute capability 8.0 or newer (its kernels are built "
                             f"for sm_80 and sm_90); {device} is {major}.{minor}: use backend='triton'")
    if backend == "triton" and device.type == "cpu" and not triton_interpreted():
        raise ValueError(
            "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 before "
            "importing triton (or use backend='cpu')"
        )
    return backend
