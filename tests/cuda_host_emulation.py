"""The CUDA kernels of csrc/cuda/*.cu, run on the host: how CI tests the CUDA backend without a GPU.

``install()`` builds the kernel sources with g++ against tests/cuda_host/ (emu.h: one std::thread per CUDA thread,
blocks one after another, barriers and atomics as on a GPU; the CUDA headers it stands in for), loads it with
ctypes, registers it as the CPU implementation of the CUDA table operators (``fused_sched::cuda_adam_tables_``,
``cuda_sgd_tables_``, ``cuda_muon_tables_``, ``cuda_grad_norm_tables_``; their CUDA implementation is
csrc/cuda/*_torch.cpp) and lets ``backend="cuda"`` run CPU tensors
(``fused_sched.backends.enable_cuda_host_emulation``). The optimizers then drive the real kernel source through
their real CUDA runner (fused_sched/backends/cuda_backend.py): tables, chunk map, ticket counter, flags and options
exactly as on a GPU.

What it cannot check: the torch glue of the GPU build (compile-checked by .ci/nvcc_check.sh), the device
libraries' accuracy (the host's pow is correctly rounded, CUDA's double pow is not), races between blocks (they
run in turn) and speed. Those need a GPU (tests/test_gpu.py, bench/gpu_check.sh).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from fused_sched import backends
from fused_sched._extension import load_extension
from fused_sched.backends.device_tables import TABLE_COLUMNS

ROOT = Path(__file__).resolve().parent.parent
HOST_DIR = Path(__file__).resolve().parent / "cuda_host"
# One translation unit per kernel source, as in the GPU build.
KERNEL_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
# Everything the host build reads: a change to any of them builds it again.
INPUTS = [*sorted((ROOT / "csrc" / "cuda").glob("*.cu*")), *sorted((ROOT / "csrc" / "cuda").glob("*.h")),
          *sorted((ROOT / "csrc" / "include" / "fused_sched").glob("*.h")), *sorted(HOST_DIR.iterdir())]

# SMs of the emulated device: the update launches run min(n_chunks, 2 * SMS) blocks, the norm pass 4 * SMS, so
# a bucket of a few chunks already exercises the persistent loop and the last-block ticket.
SMS = 2
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # launch_common.h ParamDtype
_LAUNCH = re.compile(r"([A-Za-z_]\w*<[^<>;]*>)<<<\s*(\w+),\s*(\w+),\s*0,\s*stream\s*>>>\((\w+)\)")


def _emulated_source(source: Path) -> str:
    """A kernel source with each `kernel<...><<<grid, threads, 0, stream>>>(args)` written as an emu_launch call."""
    text = source.read_text()
    rewritten, count = _LAUNCH.subn(r"emu_launch(\2, \3, \1, \4)", text)
    if count == 0 or count != text.count("<<<"):
        raise RuntimeError(f"{source}: {text.count('<<<')} launches, {count} rewritten for the host build; "
                           "teach cuda_host_emulation._LAUNCH the new launch form")
    return rewritten


def build() -> Path:
    """The host build of the CUDA kernels (a shared library), cached by the hash of its inputs."""
    digest = hashlib.sha256()
    for path in INPUTS:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    out_dir = Path(os.environ.get("FUSED_SCHED_CUDA_HOST_DIR", Path(tempfile.gettempdir()) / "fused_sched_cuda_host"))
    library = out_dir / digest.hexdigest()[:16] / "libcuda_host.so"
    if library.exists():
        return library
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out_dir))
    units = []
    for source in KERNEL_SOURCES:
        units.append(work / f"{source.stem}_host.cpp")
        units[-1].write_text(_emulated_source(source))
    shutil.copy(HOST_DIR / "bindings.cpp", work / "bindings.cpp")
    compiler = os.environ.get("CXX", "g++")
    # -ffp-contract=off: nvcc builds the kernels with --fmad=false (only explicit fmaf calls fuse).
    command = [compiler, "-std=c++20", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-pthread",
               f"-I{HOST_DIR}", f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc' / 'cuda'}",
               *map(str, units), str(work / "bindings.cpp"), "-o", str(work / "libcuda_host.so")]
    subprocess.run(command, check=True, capture_output=True, text=True)
    library.parent.mkdir(parents=True, exist_ok=True)
    os.replace(work / "libcuda_host.so", library)  # atomic: concurrent test processes see a whole file
    shutil.rmtree(work, ignore_errors=True)
    return library


_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_STATE: dict = {}


def _load() -> ctypes.CDLL:
    if "lib" not in _STATE:
        lib = ctypes.CDLL(str(build()))
        lib.emu_adam_tables.argtypes = [ctypes.c_int, _P, _I64, _P, _I64, _I64, _P, _P, _I64, _P, _P, _P, _P, _P, _P,
                                        ctypes.c_uint64]
        lib.emu_sgd_tables.argtypes = [ctypes.c_int, _P, _I64, _P, _I64, _I64, _P, _P, _I64, _P, _P, _P, _P, _P, _P,
                                       ctypes.c_uint64]
        lib.emu_muon_tables.argtypes = [ctypes.c_int, _P, _I64, _P, _I64, _I64, _P, _P, _I64, _P, _P, _P, _P, _P, _P,
                                        _I64]
        lib.emu_grad_norm_tables.argtypes = [ctypes.c_int, _P, _P, _I64, _I64, _P, _I64, _P, _P, _P, ctypes.c_double,
                                             ctypes.c_float, ctypes.c_int, _P]
        lib.emu_set_sms(SMS)
        _STATE["lib"] = lib
    return _STATE["lib"]


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _check_tables(table: torch.Tensor, chunks: torch.Tensor, chunk_elements: int) -> None:
    # The glue's check_tables (csrc/cuda/common_torch.cpp), for CPU tensors.
    if not (table.dtype == torch.int64 and table.dim() == 2 and table.shape[1] == TABLE_COLUMNS
            and table.is_contiguous()):
        raise ValueError(f"table must be a contiguous int64 tensor [rows, {TABLE_COLUMNS}], got {table.dtype} "
                         f"{list(table.shape)}")
    if not (chunks.dtype == torch.int64 and chunks.dim() == 2 and chunks.shape[1] == 2 and chunks.is_contiguous()):
        raise ValueError(f"chunks must be a contiguous int64 tensor [n_chunks, 2], got {list(chunks.shape)}")
    if chunk_elements <= 0:
        raise ValueError(f"chunk_elements must be positive, got {chunk_elements}")


def _schedule(schedule, schedule_step):
    if schedule is None or schedule.shape[1] == 0:
        return None, 0, None
    return schedule.data_ptr(), schedule.shape[1], schedule_step.data_ptr()


def _check(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"{what}: the host build of the CUDA launcher returned error {code}")


def _adam_tables(table, chunks, chunk_elements, param_dtype, hyper, counter, schedule=None, schedule_step=None,
                 grad_scale=None, found_inf=None, clip_coef=None, step_advance=None, sr_seed=0):
    _check_tables(table, chunks, chunk_elements)
    program, segments, step = _schedule(schedule, schedule_step)
    _check(_load().emu_adam_tables(
        _DTYPE_CODES[param_dtype], table.data_ptr(), table.shape[0], chunks.data_ptr(), chunks.shape[0],
        chunk_elements, hyper.data_ptr(), program, segments, step, counter.data_ptr(), _ptr(grad_scale),
        _ptr(found_inf), _ptr(clip_coef), _ptr(step_advance), sr_seed), "launch_adam_tables")


def _sgd_tables(table, chunks, chunk_elements, param_dtype, hyper, counter, schedule=None, schedule_step=None,
                grad_scale=None, found_inf=None, clip_coef=None, step_advance=None, sr_seed=0):
    _check_tables(table, chunks, chunk_elements)
    program, segments, step = _schedule(schedule, schedule_step)
    _check(_load().emu_sgd_tables(
        _DTYPE_CODES[param_dtype], table.data_ptr(), table.shape[0], chunks.data_ptr(), chunks.shape[0],
        chunk_elements, hyper.data_ptr(), program, segments, step, counter.data_ptr(), _ptr(grad_scale),
        _ptr(found_inf), _ptr(clip_coef), _ptr(step_advance), sr_seed), "launch_sgd_tables")


def _muon_tables(table, chunks, chunk_elements, param_dtype, hyper, counter, schedule=None, schedule_step=None,
                 grad_scale=None, found_inf=None, clip_coef=None, step_advance=None, phase=0):
    _check_tables(table, chunks, chunk_elements)
    if phase not in (0, 1):  # the glue's check_phase (csrc/cuda/muon_torch.cpp)
        raise ValueError(f"Muon's phase is 0 (momentum) or 1 (update), got {phase}")
    program, segments, step = _schedule(schedule, schedule_step)
    # The launcher ignores step_advance in the momentum pass (phase 0), as on a GPU.
    _check(_load().emu_muon_tables(
        _DTYPE_CODES[param_dtype], table.data_ptr(), table.shape[0], chunks.data_ptr(), chunks.shape[0],
        chunk_elements, hyper.data_ptr(), program, segments, step, counter.data_ptr(), _ptr(grad_scale),
        _ptr(found_inf), _ptr(clip_coef), _ptr(step_advance), phase), "launch_muon_tables")


def _grad_norm_tables(table, chunks, chunk_elements, grad_dtype, partials, slot_offset, counter, out, grad_scale,
                      norm_type, max_norm, finalize):
    _check_tables(table, chunks, chunk_elements)
    if partials.numel() < slot_offset + max(1, chunks.shape[0]):
        raise ValueError("partials too small")
    used = ctypes.c_int64(0)
    _check(_load().emu_grad_norm_tables(
        _DTYPE_CODES[grad_dtype], table.data_ptr(), chunks.data_ptr(), chunks.shape[0], chunk_elements,
        partials.data_ptr(), slot_offset, counter.data_ptr(), out.data_ptr(), _ptr(grad_scale), norm_type, max_norm,
        int(finalize), ctypes.addressof(used)), "launch_grad_norm_tables")
    return used.value


def install() -> None:
    """Build and load the host kernels, register them for CPU tensors, and let backend="cuda" run CPU tensors."""
    load_extension()  # defines the operators' schemas
    _load()
    if "library" not in _STATE:
        library = torch.library.Library("fused_sched", "IMPL")
        library.impl("cuda_adam_tables_", _adam_tables, "CPU")
        library.impl("cuda_sgd_tables_", _sgd_tables, "CPU")
        library.impl("cuda_muon_tables_", _muon_tables, "CPU")
        library.impl("cuda_grad_norm_tables_", _grad_norm_tables, "CPU")
        _STATE["library"] = library
    backends.enable_cuda_host_emulation()


def uninstall() -> None:
    """backend="cuda" refuses CPU tensors again (the registrations stay: nothing else calls them on CPU)."""
    backends.disable_cuda_host_emulation()
