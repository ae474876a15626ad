import os
import sys

import pytest
import torch

# The benchmark package (bench/) sits beside tests/: importable however pytest is started.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The Triton tests run on CPU tensors through the Triton interpreter on machines without a GPU (CI). The
# interpreter is chosen when triton is imported, so it is switched on here, before any test module imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The bit-exact tests need an interpreter whose tl.fma rounds once, as a GPU's does: triton 3.8's rounds twice, and
# gets an exact one here (tests/triton_interpreter_fma.py; triton 3.9's is exact and is left alone).
if os.environ.get("TRITON_INTERPRET") == "1":
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    else:
        import triton_interpreter_fma

        FMA_REPLACED = triton_interpreter_fma.install()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _cuda_backend_runnable():
    """Makes backend="cuda" runnable: the CUDA kernels on a GPU (skipped when fused_sched was built without them),
    their host build on CPU tensors otherwise (tests/cuda_host_emulation.py)."""
    if torch.cuda.is_available():
        from fused_sched._extension import load_extension

        if not load_extension().cuda_compiled():
            pytest.skip("fused_sched was built without its CUDA kernels")
        yield
        return
    import cuda_host_emulation

    cuda_host_emulation.install()
    try:
        yield
    finally:
        cuda_host_emulation.uninstall()


@pytest.fixture
def cuda_backend():
    """backend="cuda" is runnable in this test (see _cuda_backend_runnable)."""
    yield from _cuda_backend_runnable()


@pytest.fixture(autouse=True)
def _backend_param_cuda(request):
    """A test parametrized with backend="cuda" gets the cuda_backend fixture."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("backend") != "cuda":
        yield
        return
    yield from _cuda_backend_runnable()
