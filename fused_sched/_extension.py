"""Loads the compiled extension: the one built by setup.py (`fused_sched._C`) or, when that is missing (a source
checkout that was never built), builds it just in time with ninja and caches the result.

The cache lives in $FUSED_SCHED_BUILD_DIR, else ~/.cache/fused_sched/<torch version>-<hash of the sources>, so
an edit to a source or a torch upgrade rebuilds and an unchanged tree loads in milliseconds.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import threading

from . import _sources

_lock = threading.Lock()
_module = None


def _source_root() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    for root in (os.path.dirname(here), here):
        if os.path.isfile(os.path.join(root, _sources.CPU_SOURCES[0])):
            return root
    raise ImportError(
        "fused_sched: the compiled extension fused_sched._C is missing and no csrc/ tree was found to build it; "
        "reinstall with `pip install --no-build-isolation .`"
    )


def _jit_sources(root: str, with_cuda: bool) -> tuple[list[str], list[str], list[str]]:
    """(sources, C++ flags, nvcc flags) of the just-in-time build: setup.py's choice of files and flags."""
    import glob

    sources = [os.path.join(root, s) for s in _sources.CPU_SOURCES]
    cflags = list(_sources.CXX_FLAGS)
    if not with_cuda:
        return sources, cflags, []
    sources += sorted(glob.glob(os.path.join(root, _sources.CUDA_KERNEL_GLOB)))
    sources += sorted(glob.glob(os.path.join(root, _sources.CUDA_GLUE_GLOB)))
    return sources, cflags + ["-DFUSED_SCHED_WITH_CUDA=1"], list(_sources.NVCC_FLAGS)


def _jit_build():
    import torch
    import torch.utils.cpp_extension as cpp_extension

    root = _source_root()
    cuda_home = None
    if torch.version.cuda is not None:
        # torch's own guess is the folder above the nvcc on PATH, no toolkit when that nvcc is a wrapper script.
        cuda_home, _ = _sources.find_cuda_home(os.environ)
        cpp_extension.CUDA_HOME = cuda_home
    with_cuda = _sources.wants_cuda(os.environ, torch.version.cuda, cuda_home)
    sources, cflags, cuda_flags = _jit_sources(root, with_cuda)
    include_dirs = [os.path.join(root, d) for d in _sources.INCLUDE_DIRS]
    digest = hashlib.sha256()
    for folder in include_dirs:
        for dirpath, _, files in sorted(os.walk(folder)):
            for name in sorted(files):
                if name.endswith((".h", ".cpp", ".cuh", ".cu")):
                    with open(os.path.join(dirpath, name), "rb") as f:
                        digest.update(name.encode() + f.read())
    tag = f"{torch.__version__}-{'cuda-' if with_cuda else ''}{digest.hexdigest()[:16]}".replace("+", "_")
    build_dir = os.environ.get("FUSED_SCHED_BUILD_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "fused_sched", tag
    )
    os.makedirs(build_dir, exist_ok=True)
    return cpp_extension.load(
        name="fused_sched_C",
        sources=sources,
        extra_include_paths=include_dirs,
        extra_cflags=cflags,
        extra_cuda_cflags=cuda_flags or None,
        extra_ldflags=list(_sources.LINK_FLAGS),
        build_directory=build_dir,
        verbose=os.environ.get("FUSED_SCHED_VERBOSE_BUILD", "0") == "1",
    )


def load_extension():
    """Return the compiled extension module; its import registers torch.ops.fused_sched.*."""
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is None:
            try:
                module = importlib.import_module("fused_sched._C")
            except ImportError:
                module = _jit_build()
            _register_fakes()
            _module = module
    return _module


def _register_fakes() -> None:
    """Fake (meta) implementations of the C++ operators, for torch.compile and FakeTensor: they describe outputs
    without computing them. Without one, FakeTensor runs the CPU kernel on zero-filled real copies of every
    tensor (the fallback kernel), which costs a model's worth of memory at every trace."""
    import torch

    def no_output(*args, **kwargs) -> None:
        return None  # adam_step_ / sgd_step_ only write their (f!) arguments

    torch.library.register_fake("fused_sched::adam_step_")(no_output)
    torch.library.register_fake("fused_sched::sgd_step_")(no_output)

    @torch.library.register_fake("fused_sched::evaluate_schedule")
    def _(schedule, schedule_step):
        return schedule.new_empty((schedule.shape[0], 2))

    @torch.library.register_fake("fused_sched::grad_norm_clip")
    def _(grads, bucket_sizes, norm_type, max_norm, grad_scale=None):
        return torch.empty(2, dtype=torch.float32, device=grads[0].device if grads else "cpu")
