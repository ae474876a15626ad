"""The source layout that docs/architecture.md describes, checked: layers that only import downwards, no import cycle
in the package, modules a reader can hold, and every optimizer's pieces named after it in every tree.

Imports are read from the source (every ``import`` statement, those inside functions included), not from a running
interpreter, so a lazy import that would close a cycle is caught as well."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fused_sched"

# The layers, bottom first (docs/architecture.md): a module may import from its own layer and the layers below.
LAYERS = [
    ("extension", ["fused_sched._sources", "fused_sched._extension", "fused_sched._hyper",
                   "fused_sched._schedule_program"]),
    ("backends", ["fused_sched.backends"]),
    ("optimizers", ["fused_sched.optim"]),
    ("schedules", ["fused_sched._scheduler_base", "fused_sched.lr_scheduler", "fused_sched.hf_schedules"]),
    ("top", ["fused_sched", "fused_sched.plot", "fused_sched.__main__"]),
]

# Lines a reader can hold (issue 18): Python modules and C++/CUDA files.
MAX_PYTHON_LINES = 400
MAX_CPP_LINES = 500

# Every optimizer family, and the file each tree holds for it. A new optimizer adds its name here and its files.
OPTIMIZERS = ("adam", "sgd", "muon")
ONE_NAME_FILES = [
    "fused_sched/optim/{name}.py",
    "fused_sched/backends/triton/{name}.py",
    "csrc/include/fused_sched/{name}_math.h",
    "csrc/cpu/{name}.cpp",
    "csrc/cpu/{name}_kernels.h",
    "csrc/cuda/{name}.cu",
    "csrc/cuda/{name}_torch.cpp",
    "tests/test_{name}_parity.py",
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that `name` imports anywhere in its source (resolved to the longest known module)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith("fused_sched"):
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        # Importing a submodule runs its package's __init__ first: that edge is Python's, not the module's choice.
        graph[name] = {t for t in _imports(name, path, known) if not name.startswith(t + ".")}
    return graph


def _layer(module: str) -> int:
    best, level = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), index
    assert level is not None, f"{module} is in no layer of tests/test_layout.py (docs/architecture.md)"
    return level


def test_layers_only_import_downwards():
    wrong = []
    for module, targets in _graph().items():
        for target in targets:
            if _layer(target) > _layer(module):
                wrong.append(f"{module} ({LAYERS[_layer(module)][0]}) imports {target} ({LAYERS[_layer(target)][0]})")
    assert not wrong, "imports that point up a layer:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle():
    graph = _graph()
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    """The two checks above can fail: a lazy import inside a function is an edge like any other."""
    pkg = tmp_path / "fused_sched"
    (pkg / "optim").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "optim" / "__init__.py").write_text("")
    (pkg / "optim" / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "optim" / "b.py").write_text("from .a import f\nfrom .. import lr_scheduler\n")
    (pkg / "lr_scheduler.py").write_text("")
    global ROOT, PACKAGE
    saved = ROOT, PACKAGE
    ROOT, PACKAGE = tmp_path, pkg
    try:
        with pytest.raises(AssertionError, match="fused_sched.optim.a -> fused_sched.optim.b -> fused_sched.optim.a"):
            test_no_import_cycle()
        with pytest.raises(AssertionError, match="fused_sched.optim.b .optimizers. imports fused_sched.lr_scheduler"):
            test_layers_only_import_downwards()
    finally:
        ROOT, PACKAGE = saved


def _tracked(patterns) -> list[Path]:
    return sorted(p for pattern in patterns for p in ROOT.glob(pattern) if p.is_file())


@pytest.mark.parametrize("path", _tracked(["fused_sched/**/*.py", "bench/**/*.py", "tests/**/*.py", "setup.py",
                                           ".ci/*.py"]), ids=lambda p: str(p.relative_to(ROOT)))
def test_python_module_fits_a_reader(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_PYTHON_LINES, f"{path.relative_to(ROOT)}: {lines} lines > {MAX_PYTHON_LINES}; split it by " \
        "responsibility"


@pytest.mark.parametrize("path", _tracked(["csrc/**/*.cpp", "csrc/**/*.h", "csrc/**/*.cu", "csrc/**/*.cuh",
                                           "tests/cuda_host/*"]), ids=lambda p: str(p.relative_to(ROOT)))
def test_cpp_file_fits_a_reader(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_CPP_LINES, f"{path.relative_to(ROOT)}: {lines} lines > {MAX_CPP_LINES}; split it by " \
        "responsibility"


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("pattern", ONE_NAME_FILES)
def test_one_name_through_every_tree(name, pattern):
    path = ROOT / pattern.format(name=name)
    assert path.is_file(), f"{name}: no {path.relative_to(ROOT)} (docs/architecture.md, adding an optimizer)"


def test_every_optimizer_family_has_its_launchers():
    """The shared dispatch tables name exactly the families of the optimizer classes (docs/architecture.md)."""
    import fused_sched
    from fused_sched.backends import cuda_backend
    from fused_sched.backends.triton import runner

    families = {cls._algorithm for cls in (fused_sched.AdamW, fused_sched.Adam, fused_sched.SGD, fused_sched.Muon,
                                           fused_sched.MuonWithAdamW)}
    assert families == set(OPTIMIZERS)
    assert set(runner.LAUNCHERS) == families
    assert set(cuda_backend.LAUNCHERS) == families
