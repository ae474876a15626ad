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
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as e:
        raise RuntimeError(
            "fused_sched builds against the torch already installed: install torch first, then "
            "`pip install --no-build-isolation .`"
        ) from e
    src = _sources()
    sources = list(src["CPU_SOURCES"])
    include_dirs = [os.path.join(ROOT, d) for d in src["INCLUDE_DIRS"]]
    cxx = list(src["CXX_FLAGS"])
    cuda_kernels = sorted(glob.glob(src["CUDA_KERNEL_GLOB"], root_dir=ROOT))
    want_cuda = src["wants_cuda"](os.environ, torch.version.cuda, CUDA_HOME) and bool(cuda_kernels)
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
