"""Sources of the compiled extension, shared by setup.py (ahead-of-time build) and fused_sched._extension
(just-in-time build). No imports: setup.py executes this file before the package is importable."""

# Baseline-ISA translation units first: the linker keeps the first copy of an inline function it meets, and the
# AVX2 / AVX-512 units (last) must not lend their copies to code that runs on every CPU.
CPU_SOURCES = [
    "csrc/fused_sched_ops.cpp",
    "csrc/optim_bucket.cpp",
    "csrc/cpu/optim_cpu.cpp",
    "csrc/cpu/optim_cpu_kernels_default.cpp",
    "csrc/cpu/optim_cpu_kernels_avx2.cpp",
    "csrc/cpu/optim_cpu_kernels_avx512.cpp",
]

# Kernels free of torch headers (compile-checked by nvcc on machines without a GPU) and the torch glue that
# registers them, built only against a CUDA build of torch.
CUDA_KERNEL_GLOB = "csrc/cuda/*.cu"
CUDA_GLUE_GLOB = "csrc/cuda/*.cpp"


def wants_cuda(environ, torch_cuda_version, cuda_home) -> bool:
    """Whether a build includes the CUDA kernels: torch is a CUDA build, a CUDA toolkit is found (torch's
    CUDA_HOME) and FUSED_SCHED_SKIP_CUDA is not 1. One rule for setup.py and the just-in-time build."""
    return environ.get("FUSED_SCHED_SKIP_CUDA", "0") != "1" and torch_cuda_version is not None and cuda_home is not None

INCLUDE_DIRS = ["csrc/include", "csrc"]

# -ffp-contract=off: every multiply and add of optim_math.h rounds on its own, as in the Triton kernels (launched
# with fp fusion off) and torch's scalar formulas; GCC would otherwise fuse them into FMAs in the AVX2/AVX-512
# builds and the backends would drift apart by an ulp a step (measured on SGD momentum buffers).
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
