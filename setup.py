"""Build of fused_sched's compiled extension.

Install with `pip install --no-build-isolation .` (or `-e .`): torch is deliberately not a build requirement, so
that pip never fetches a second, CUDA-enabled torch into an isolated build environment. The CPU kernels are
always built; the CUDA kernels only when torch is a CUDA build, nvcc is found and FUSED_SCHED_SKIP_CUDA is not
set. MAX_JOBS bounds the parallel compile jobs (read by torch's ninja builder).
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources():
    namespace = {}
    with open(os.path.join(ROOT, "fused_sched", "_sources.py")) as f:
        exec(f.read(), namespace)
    return namespace


def _extensions():
    src = _sources()
    # torch guesses its CUDA_HOME from the folder above the nvcc on PATH, which for a wrapper script is no toolkit
    # (the build then fails on a missing cuda_runtime.h): find the toolkit first and hand it to torch.
    cuda_home, cuda_note = src["find_cuda_home"](os.environ)
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        import torch.utils.cpp_extension as cpp_extension
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as e:
        raise RuntimeError(
            "fused_sched builds against the torch already installed: install torch first, then "
            "`pip install --no-build-isolation .`"
        ) from e
    cpp_extension.CUDA_HOME = cuda_home  # also when torch.utils.cpp_extension was imported before this file ran
    sources = list(src["CPU_SOURCES"])
    include_dirs = [os.path.join(ROOT, d) for d in src["INCLUDE_DIRS"]]
    cxx = list(src["CXX_FLAGS"])
    cuda_kernels = sorted(glob.glob(src["CUDA_KERNEL_GLOB"], root_dir=ROOT))
    want_cuda = src["wants_cuda"](os.environ, torch.version.cuda, cuda_home) and bool(cuda_kernels)
    if torch.version.cuda is None:
        print("fused_sched: torch is a CPU build: building the CPU kernels only")
    elif os.environ.get("FUSED_SCHED_SKIP_CUDA", "0") == "1":
        print("fused_sched: FUSED_SCHED_SKIP_CUDA=1: building without the CUDA kernels")
    elif cuda_home is None:
        print(f"fused_sched: {cuda_note}: building without the CUDA kernels (backend='triton' still runs on GPUs)")
    else:
        print(f"fused_sched: building the CUDA kernels with the {cuda_note}")
    if want_cuda:
        sources += cuda_kernels + sorted(glob.glob(src["CUDA_GLUE_GLOB"], root_dir=ROOT))
        ext = CUDAExtension(
            "fused_sched._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("FUSED_SCHED_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": list(src["NVCC_FLAGS"])},
            extra_link_args=list(src["LINK_FLAGS"]),
        )
    else:
        ext = CppExtension("fused_sched._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
                           extra_link_args=list(src["LINK_FLAGS"]))
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["fused_sched", "fused_sched.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
