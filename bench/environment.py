"""The environment a benchmark record carries: versions, commit, date, device, CPU."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

import torch

from .impls import scheduler_source


# -- environment -------------------------------------------------------------------------------------------------
def _git(*cmd) -> str:
    try:
        return subprocess.run(["git", *cmd], capture_output=True, text=True, check=False,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return ""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import fused_sched
    from fused_sched._extension import load_extension

    native = load_extension()
    env = {
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "python": platform.python_version(), "fused_sched": fused_sched.__version__,
        "commit": _git("rev-parse", "HEAD") or os.environ.get("BENCH_COMMIT", ""),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device_type": device.type, "cpu": _cpu_model(), "cpu_threads": torch.get_num_threads(),
        "cpu_capability": native.cpu_capability(), "fused_sched_cuda_kernels": bool(native.cuda_compiled()),
        "scheduler_source": scheduler_source(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"] = torch.cuda.get_device_name(device)
        env["gpu_memory_GiB"] = round(props.total_memory / 2**30, 1)
        env["cuda_driver"] = _nvidia_driver()
    else:
        env["device"] = f"{env['cpu']} ({env['cpu_threads']} threads)"
    return env


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=False, timeout=20).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None
