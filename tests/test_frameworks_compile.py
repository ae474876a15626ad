"""fused_sched under torch.compile: a compiled model, a compiled train step with opt.step() inside (against torch,
without recompiling when the lr changes), a compiled opt.step() without a graph break.
"""

from __future__ import annotations

import functools

import pytest
import torch

from frameworks_cases import (
    TOLERANCE,
    _assert_params_close,
    _cosine,
    _data,
    _graph_calls,
    _mlp,
    _one_thread,  # noqa: F401 (an autouse fixture: pytest finds it in this module)
    _optimizer,
    _record_graph,
)


# -- torch.compile ----------------------------------------------------------------------------------------------
def test_compiled_model_trains_with_fused_adamw():
    """A torch.compile'd model (inductor), fused_sched.AdamW stepping eagerly. Measured: losses 6e-8 apart (1 ulp),
    params 3e-8 after 6 steps."""
    runs = {}
    for kind in ("fused", "torch"):
        model = _mlp()
        compiled = torch.compile(model)
        opt = _optimizer(kind, model.parameters())
        sched = _cosine(kind, opt, 6)
        losses = []
        for x, y in _data(6):
            loss = torch.nn.functional.mse_loss(compiled(x), y)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(loss.item())
        runs[kind] = (model, losses)
    torch.testing.assert_close(runs["fused"][1], runs["torch"][1])
    _assert_params_close(runs["fused"][0], runs["torch"][0])
    assert not torch.equal(runs["fused"][0][0].weight, _mlp()[0].weight)


@functools.cache
def _compiled_train_step(kind: str, lr_kind: str, steps: int = 8):
    """`train_step` (forward, backward, opt.step(), zero_grad) compiled as one function; between calls the scheduler
    (lr_kind "scheduler": a float lr) or an in-place change of a tensor lr (lr_kind "tensor") moves the lr. Returns
    the trained parameters, the losses and how many frames Dynamo had compiled after each call (cached: two tests
    read the same runs)."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = _mlp()
    lr = torch.tensor(1e-2) if lr_kind == "tensor" else 1e-2
    opt = _optimizer(kind, model.parameters(), lr=lr)
    sched = _cosine(kind, opt, steps) if lr_kind == "scheduler" else None
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=counter)
    def train_step(x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    losses, frames = [], []
    for step, (x, y) in enumerate(_data(steps)):
        losses.append(train_step(x, y).item())
        if sched is not None:
            sched.step()
        else:
            lr.fill_(1e-2 * 0.8 ** (step + 1))
        frames.append(counter.frame_count)
    torch._dynamo.reset()
    return [p.detach().clone() for p in model.parameters()], losses, frames


@pytest.mark.parametrize("lr_kind", ["scheduler", "tensor"])
def test_compiled_train_step_with_opt_step_inside_matches_torch(lr_kind):
    """fused_sched's step inside a compiled function gives torch's results. Measured (fused_sched against torch, both
    compiled the same way): losses at most 1.2e-7 apart, params 4.5e-8."""
    our_params, our_losses, _ = _compiled_train_step("fused", lr_kind)
    their_params, their_losses, _ = _compiled_train_step("torch", lr_kind)
    torch.testing.assert_close(our_losses, their_losses)
    torch.testing.assert_close(our_params, their_params, **TOLERANCE)


@pytest.mark.parametrize("lr_kind", ["scheduler", "tensor"])
def test_compiled_train_step_does_not_recompile_when_the_lr_changes(lr_kind):
    """Once warm (two calls: the first builds the state and fused_sched's plan, the second sees them built), a
    compiled step recompiles no more, whatever the lr does.

    Measured (torch 2.13, frames compiled after each call): with a scheduler (float lr), fused_sched [2, 4, 4, ...]
    and torch.optim.AdamW + torch's scheduler [2, 3, 3, ...]: one recompilation at call 2 in both, Dynamo's automatic
    dynamic turning the changed float lr into an input (reading an optimizer's param_groups makes Dynamo guard on
    every value in them; fused_sched's kernels take the scheduled lr from the schedule program on the device, so the
    float is never used). fused_sched's first-step host work (state, hyper table, step counters) runs while the
    first call is traced (fused_sched/optim/_compiled.py _prepare), so it causes no recompilation. With a tensor lr,
    which fused_sched copies into its hyper table with a traced tensor operation (never reading it on the host),
    neither recompiles after the first call: [2, 2, 2, ...] both.
    """
    for kind in ("torch", "fused"):
        frames = _compiled_train_step(kind, lr_kind)[2]
        warm = 2 if lr_kind == "scheduler" else 1
        assert frames[warm - 1:] == [frames[warm - 1]] * (len(frames) - warm + 1), (kind, frames)


def test_compiled_opt_step_has_no_graph_break():
    """torch.compile(opt.step) in steady state (state and fused_sched's plan built, a scheduler attached): Dynamo
    meets nothing it cannot trace. Graph breaks Dynamo counts as "unimplemented" are the ones caused by untraceable
    code; deliberate ones (torch._dynamo.graph_break(), functions Dynamo skips on purpose) are not counted there."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    untraceable = {}
    for kind in ("torch", "fused"):
        torch._dynamo.reset()
        model = _mlp()
        opt = _optimizer(kind, model.parameters())
        _cosine(kind, opt, 10)
        for x, y in _data(3):
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        counters.clear()
        graphs = []
        torch.compile(opt.step, backend=functools.partial(_record_graph, graphs))()
        untraceable[kind] = [" ".join(reason.splitlines()[:2]) for reason in counters["unimplemented"]]
        if kind == "fused":
            # The update itself is in the graph: one fused_sched operator call (one (device, dtype) bucket).
            assert _graph_calls(graphs, "fused_sched") == ["fused_sched.adam_step_"]
    torch._dynamo.reset()
    assert untraceable["torch"] == []
    assert untraceable["fused"] == [], untraceable["fused"]
