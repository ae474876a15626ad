"""Sources of the compiled extension, shared by setup.py (ahead-of-time build) and fused_sched._extension
(just-in-time build). No imports: setup.py executes this file before the package is importable."""

# Baseline-ISA translation units first: the linker keeps the first copy of an inline function it meets, and the
# AVX2 / AVX-512 units (last) must not lend their copies to code that runs on every CPU.
CPU_SOURCES = [
    "csrc/fused_sched_ops.cpp",
    "csrc/optim_bucket.cpp",
    "csrc/cpu/step_common.cpp",
    "csrc/cpu/adam.cpp",
    "csrc/cpu/sgd.cpp",
    "csrc/cpu/muon.cpp",
    "csrc/cpu/grad_norm.cpp",
    "csrc/cpu/kernels_default.cpp",
    "csrc/cpu/kernels_avx2.cpp",
    "csrc/cpu/kernels_avx512.cpp",
]

# Kernels free of torch headers (compile-checked by nvcc on machines without a GPU) and the torch glue that
# registers them, built only against a CUDA build of torch. Every .cpp in csrc/cuda is glue named *_torch.cpp
# (.ci/nvcc_check.sh type-checks those), and no two sources share a file name: the just-in-time build names each
# object after its source's file name alone (tests/test_build.py checks both).
CUDA_KERNEL_GLOB = "csrc/cuda/*.cu"
CUDA_GLUE_GLOB = "csrc/cuda/*.cpp"


def wants_cuda(environ, torch_cuda_version, cuda_home) -> bool:
    """Whether a build includes the CUDA kernels: torch is a CUDA build, a CUDA toolkit is found (find_cuda_home)
    and FUSED_SCHED_SKIP_CUDA is not 1. One rule for setup.py and the just-in-time build."""
    return environ.get("FUSED_SCHED_SKIP_CUDA", "0") != "1" and torch_cuda_version is not None and cuda_home is not None


def is_cuda_toolkit(folder) -> bool:
    """A folder is a CUDA toolkit when it has bin/nvcc and include/cuda_runtime.h (a folder with only an nvcc, such
    as the one of a wrapper script, is not)."""
    import os

    return bool(folder) and os.path.isfile(os.path.join(folder, "include", "cuda_runtime.h")) and os.access(
        os.path.join(folder, "bin", "nvcc"), os.X_OK)


def _nvcc_top(nvcc):
    """The toolkit an nvcc command runs from, as it says itself (`nvcc --dryrun` prints `TOP=<toolkit>/bin/..`):
    right for a wrapper script elsewhere on PATH, which torch's guess (the folder above nvcc's) is not."""
    import os
    import subprocess

    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ TOP="):
            return os.path.normpath(line[len("#$ TOP="):].strip().strip('"'))
    return None


def find_cuda_home(environ, system_root="/usr/local"):
    """(CUDA toolkit folder or None, a line saying what was found). Looked for in this order: $CUDA_HOME,
    $CUDA_PATH, the toolkit of the nvcc on PATH (asked with --dryrun, then the folder above its real path),
    {system_root}/cuda, the newest {system_root}/cuda-*. A candidate counts only when it is a toolkit
    (is_cuda_toolkit)."""
    import glob
    import os
    import re
    import shutil

    rejected = []
    for name in ("CUDA_HOME", "CUDA_PATH"):
        folder = environ.get(name)
        if folder:
            if is_cuda_toolkit(folder):
                return folder, f"CUDA toolkit {folder} (${name})"
            rejected.append(f"${name}={folder} has no include/cuda_runtime.h or bin/nvcc")
    candidates = []
    nvcc = shutil.which("nvcc", path=environ.get("PATH"))
    if nvcc:
        candidates.append(_nvcc_top(nvcc))
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append(os.path.join(system_root, "cuda"))

    def version(folder):
        return tuple(int(x) for x in re.findall(r"\d+", os.path.basename(folder)))

    candidates += sorted(glob.glob(os.path.join(system_root, "cuda-*")), key=version, reverse=True)
    for folder in candidates:
        if is_cuda_toolkit(folder):
            note = "; ".join(rejected)
            return os.path.realpath(folder), f"CUDA toolkit {os.path.realpath(folder)}" + (f" ({note})" if note else "")
    reasons = rejected + ([f"nvcc on PATH ({nvcc}) belongs to no toolkit with cuda_runtime.h"] if nvcc else
                          ["no nvcc on PATH"])
    return None, "no usable CUDA toolkit (" + "; ".join(reasons) + ")"

INCLUDE_DIRS = ["csrc/include", "csrc"]

# -ffp-contract=off: every multiply and add of optim_math.h (and of each optimizer's adam_math.h, sgd_math.h) rounds
# on its own, as in the Triton kernels (launched with fp fusion off) and torch's scalar formulas; GCC would otherwise
# fuse them into FMAs in the AVX2/AVX-512 builds and the backends would drift apart by an ulp a step (measured on SGD
# momentum buffers).
# -fopenmp: at::parallel_for is inline code around `#pragma omp parallel`; without the flag it silently runs on
# one thread (measured: CPU time / wall time 0.99 for a 40M-element step). torch's wheels load their libgomp.so.1
# first, so the extension binds to that same OpenMP runtime and thread count.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = [
    "-O3",
    "-lineinfo",
    "--fmad=false",
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    # PTX too: a newer GPU (sm_100, sm_120) compiles it at load time instead of finding no kernel image.
    "-gencode=arch=compute_90,code=compute_90",
]
