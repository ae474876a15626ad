"""Shared by the tests/test_frameworks_*.py modules: fused_sched inside training frameworks, each against the same
run with torch.optim.AdamW in the same test: the Hugging Face Trainer (test_frameworks_hf_trainer.py), torch.compile
(a compiled model; a compiled step with opt.step() inside: test_frameworks_compile.py and
test_frameworks_compile_eager.py), Lightning (test_frameworks_lightning.py), and the scripts under examples/
(test_frameworks_examples.py).

Tolerances: fused_sched's float32 update matches torch.optim's to a few ulps per step (tests/optim_reference.py),
so losses are compared with torch.testing.assert_close's float32 defaults (rtol 1.3e-6, atol 1e-5) and parameters
(O(0.1 .. 1)) with rtol 1.3e-6 and atol 1e-6 unless a test says otherwise; the differences measured for each test
are given in its comments.
"""

from __future__ import annotations

import pytest
import torch

import fused_sched


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: a second intra-op thread only adds spin-waiting, and when another process holds the
    other core of a 2-core machine it slows the transformers runs down ~30x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _data(steps: int):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 8, generator=gen), torch.randn(4, 4, generator=gen)) for _ in range(steps)]


def _optimizer(kind: str, params, lr=1e-2):
    if kind == "fused":
        return fused_sched.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)


def _cosine(kind: str, opt, steps: int):
    schedulers = fused_sched.lr_scheduler if kind == "fused" else torch.optim.lr_scheduler
    return schedulers.CosineAnnealingLR(opt, T_max=steps, eta_min=1e-3)


TOLERANCE = {"rtol": 1.3e-6, "atol": 1e-6}


def _assert_params_close(ours: torch.nn.Module, theirs: torch.nn.Module, **tolerance) -> None:
    tolerance = tolerance or TOLERANCE
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), msg=lambda m, name=name: f"{name}: {m}", **tolerance)


def _record_graph(graphs: list, gm, example_inputs):
    graphs.append(gm)
    return gm.forward


def _graph_calls(graphs: list, namespace: str) -> list[str]:
    """The operators of `namespace` that the captured graphs call, in order."""
    return [str(node.target) for gm in graphs for node in gm.graph.nodes
            if node.op == "call_function" and str(node.target).startswith(namespace + ".")]
