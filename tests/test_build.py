"""The extension's build: the choice of sources and flags (setup.py and the just-in-time build share it), and the
just-in-time build itself, which a source checkout that was never built runs at first use."""

import os
import subprocess
import sys
import textwrap

from fused_sched import _extension, _sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cuda_kernels_are_built_exactly_when_torch_and_a_toolkit_have_cuda():
    assert _sources.wants_cuda({}, "13.0", "/usr/local/cuda")
    assert not _sources.wants_cuda({}, None, "/usr/local/cuda")  # a CPU build of torch
    assert not _sources.wants_cuda({}, "13.0", None)  # no toolkit
    assert not _sources.wants_cuda({"FUSED_SCHED_SKIP_CUDA": "1"}, "13.0", "/usr/local/cuda")


def _toolkit(folder, nvcc_prints_top=True):
    """A fake CUDA toolkit: include/cuda_runtime.h and a bin/nvcc that answers --dryrun as nvcc does."""
    (folder / "include").mkdir(parents=True)
    (folder / "include" / "cuda_runtime.h").write_text("")
    (folder / "bin").mkdir()
    top = f'echo "#$ TOP={folder}/bin/.." >&2' if nvcc_prints_top else "true"
    nvcc = folder / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\n{top}\n")
    nvcc.chmod(0o755)
    return folder


def _wrapper(folder, target):
    """An nvcc on PATH outside the toolkit: a script that runs the real one (the CI machine's layout)."""
    folder.mkdir(parents=True)
    nvcc = folder / "nvcc"
    nvcc.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
    nvcc.chmod(0o755)
    return folder


def test_cuda_toolkit_is_found_past_a_wrapper_script_on_path(tmp_path):
    toolkit = _toolkit(tmp_path / "opt" / "cuda-13.0")
    wrapper = _wrapper(tmp_path / "usr" / "bin", toolkit / "bin" / "nvcc")
    env = {"PATH": str(wrapper)}
    # torch's guess would be tmp_path/usr, the folder above the wrapper: no cuda_runtime.h there.
    home, note = _sources.find_cuda_home(env, system_root=str(tmp_path / "none"))
    assert home == str(toolkit) and "CUDA toolkit" in note


def test_cuda_toolkit_is_found_from_an_nvcc_in_its_own_bin_folder(tmp_path):
    """The GPU machines' layout: nvcc on PATH is the toolkit's own (reached through a symlink here)."""
    toolkit = _toolkit(tmp_path / "cuda-12.8", nvcc_prints_top=False)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    home, _ = _sources.find_cuda_home({"PATH": str(tmp_path / "bin")}, system_root=str(tmp_path / "none"))
    assert home == str(toolkit)


def test_a_cuda_home_without_cuda_runtime_h_is_not_a_toolkit(tmp_path):
    toolkit = _toolkit(tmp_path / "local" / "cuda-13.0")
    not_a_toolkit = tmp_path / "wrappers"
    _wrapper(not_a_toolkit / "bin", toolkit / "bin" / "nvcc")
    env = {"CUDA_HOME": str(not_a_toolkit), "PATH": str(tmp_path / "empty")}
    home, note = _sources.find_cuda_home(env, system_root=str(tmp_path / "local"))
    assert home == str(toolkit)  # the newest system_root/cuda-* instead
    assert f"$CUDA_HOME={not_a_toolkit} has no include/cuda_runtime.h" in note


def test_no_toolkit_is_said_in_one_line(tmp_path):
    home, note = _sources.find_cuda_home({"PATH": str(tmp_path)}, system_root=str(tmp_path))
    assert home is None and note == "no usable CUDA toolkit (no nvcc on PATH)"


def test_jit_sources_follow_setup_py():
    cpu_sources, cpu_flags, cpu_nvcc = _extension._jit_sources(ROOT, with_cuda=False)
    assert [os.path.relpath(s, ROOT) for s in cpu_sources] == _sources.CPU_SOURCES
    assert cpu_nvcc == [] and "-DFUSED_SCHED_WITH_CUDA=1" not in cpu_flags
    sources, flags, nvcc = _extension._jit_sources(ROOT, with_cuda=True)
    added = [os.path.relpath(s, ROOT) for s in sources[len(cpu_sources):]]
    assert added == ["csrc/cuda/adam.cu", "csrc/cuda/grad_norm.cu", "csrc/cuda/muon.cu", "csrc/cuda/sgd.cu",
                     "csrc/cuda/adam_torch.cpp", "csrc/cuda/common_torch.cpp", "csrc/cuda/grad_norm_torch.cpp",
                     "csrc/cuda/muon_torch.cpp", "csrc/cuda/sgd_torch.cpp"]
    assert "-DFUSED_SCHED_WITH_CUDA=1" in flags
    assert "-lineinfo" in nvcc and "-gencode=arch=compute_90,code=sm_90" in nvcc and "--fmad=false" in nvcc


def test_source_names_suit_the_builds():
    """torch's just-in-time build names an object after its source's file name alone (csrc/cpu/adam.cpp and a
    csrc/cuda/adam.cpp would both be adam.o; adam.cu is adam.cuda.o), and .ci/nvcc_check.sh type-checks the CUDA
    glue by its name, *_torch.cpp."""
    sources, _, _ = _extension._jit_sources(ROOT, with_cuda=True)
    objects = [os.path.splitext(os.path.basename(s))[0] + (".cuda.o" if s.endswith(".cu") else ".o") for s in sources]
    assert len(set(objects)) == len(objects), sorted(objects)
    glue = [os.path.basename(s) for s in sources if s.endswith(".cpp") and os.sep + "cuda" + os.sep in s]
    assert glue and all(name.endswith("_torch.cpp") for name in glue), glue


def test_just_in_time_build_loads_and_runs(tmp_path):
    """A fresh process builds the extension with ninja into FUSED_SCHED_BUILD_DIR (about 40 s on the 2-core CI
    machine), loads it and runs an operator; a second process finds the cached build."""
    script = textwrap.dedent("""
        import time, torch
        from fused_sched import _extension
        start = time.perf_counter()
        module = _extension._jit_build()
        took = time.perf_counter() - start
        p, g = torch.ones(3), torch.ones(3)
        m, v, s = torch.zeros(3), torch.zeros(3), torch.zeros(())
        hyper = torch.tensor([[0.1, 0.9, 0.999, 1e-8, 0.0, 0.0, 0.0, 8.0]], dtype=torch.float64)
        torch.ops.fused_sched.adam_step_([p], [g], [m], [v], [], [s], hyper, [0])
        assert s.item() == 1.0 and torch.allclose(p, torch.full((3,), 0.9)), p
        print(module.__name__, module.cuda_compiled(), f"{took:.1f}")
    """)
    env = {**os.environ, "FUSED_SCHED_BUILD_DIR": str(tmp_path / "build"), "FUSED_SCHED_SKIP_CUDA": "1"}
    first = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    name, cuda, _ = first.stdout.split()
    assert name == "fused_sched_C" and cuda == "False"
    second = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert float(second.stdout.split()[2]) < 10.0  # loaded from the cache, not rebuilt
