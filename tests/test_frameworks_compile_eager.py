"""A compiled step (torch.compile(opt.step) or the whole train step) equals the eager step bit for bit: with a
scheduler, clipping, AMP and low precision, loaded state, DTensor parameters; its operators pass opcheck.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import fused_sched
from frameworks_cases import (
    _cosine,
    _data,
    _graph_calls,
    _mlp,
    _one_thread,  # noqa: F401 (an autouse fixture: pytest finds it in this module)
    _record_graph,
)


def _compiled_versus_eager(algorithm: str, backend: str, mode: str, steps: int = 6, **options):
    """The same training run twice from the same initial state: eager (mode "eager"), with torch.compile(opt.step)
    (mode "opt_step") or with the whole train step compiled (mode "train_step"), both on the aot_eager backend
    (functionalization included) and with a fused_sched scheduler attached (AdamW: cosine; SGD: one-cycle, which
    drives the momentum too). options: "clip" (fused clipping: AdamW max_grad_norm, SGD clip_grad_norm_ with the inf
    norm before every step), "amp" (gradients scaled by 2**k and GradScaler's grad_scale / found_inf handed to the
    step, the first step and step 3 skipped), "bf16" (bfloat16 model; AdamW: master weights in one param group and
    stochastic rounding in the other, SGD: master weights). Returns (params, states, losses, last grad norms,
    frames compiled after each step, Dynamo's "unimplemented" graph-break reasons)."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _mlp()
    dtype = torch.bfloat16 if options.get("bf16") else torch.float32
    model.to(dtype)
    first, second = list(model[0].parameters()), list(model[2].parameters())
    if algorithm == "adamw":
        groups = [{"params": first, "master_weights": dtype != torch.float32},
                  {"params": second, "stochastic_rounding": dtype != torch.float32}]
        opt = fused_sched.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, backend=backend,
                                max_grad_norm=0.5 if options.get("clip") else None, rounding_seed=7)
        sched = fused_sched.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=1e-3)
    else:
        groups = [{"params": first, "master_weights": dtype != torch.float32}, {"params": second, "dampening": 0.1}]
        opt = fused_sched.SGD(groups, lr=1e-2, momentum=0.9, weight_decay=1e-3, backend=backend)
        sched = fused_sched.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps + 1)
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(opt.step, backend=counter) if mode == "opt_step" else opt.step

    def train_step(x, y, scale):
        loss = torch.nn.functional.mse_loss(model(x).float(), y)
        (loss * scale).backward()
        if options.get("clip") and algorithm == "sgd":
            opt.clip_grad_norm_(0.5, norm_type=math.inf)
        step()
        opt.zero_grad()
        return loss

    if mode == "train_step":
        train_step = torch.compile(train_step, backend=counter)
    losses, norms, frames = [], [], []
    for k, (x, y) in enumerate(_data(steps)):
        scale = 1.0
        if options.get("amp"):
            scale = 2.0 ** (k % 3 + 1)
            opt.grad_scale = torch.tensor(scale)
            opt.found_inf = torch.tensor(1.0 if k in (0, 3) else 0.0)
        losses.append(train_step(x.to(dtype), y, scale).item())
        if options.get("amp"):
            del opt.grad_scale, opt.found_inf
        sched.step()
        norms.append(None if opt.last_grad_norm is None else opt.last_grad_norm.item())
        frames.append(counter.frame_count)
    unimplemented = [" ".join(reason.splitlines()[:2]) for reason in counters["unimplemented"]]
    torch._dynamo.reset()
    params = [p.detach().clone() for p in model.parameters()]
    states = [(key, value.clone()) for p in model.parameters() for key, value in opt.state[p].items()]
    return params, states, losses, norms, frames, unimplemented


def _assert_same_run(ours, theirs) -> None:
    for a, b in zip(ours[0], theirs[0], strict=True):
        assert torch.equal(a, b), (a - b).abs().max()
    assert [key for key, _ in ours[1]] == [key for key, _ in theirs[1]]
    for (key, a), (_, b) in zip(ours[1], theirs[1], strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), key
    assert ours[2] == theirs[2]  # losses
    assert ours[3] == theirs[3]  # fused clipping's total norms


_BACKENDS = ["cpu", pytest.param("triton", marks=pytest.mark.skipif(
    not fused_sched.backends.triton_importable(), reason="triton is not installed"))]


@pytest.mark.parametrize("mode", ["opt_step", "train_step"])
@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("algorithm", ["adamw", "sgd"])
def test_compiled_step_equals_the_eager_step(algorithm, backend, mode):
    """A compiled step runs the eager step's kernels on the same arguments: parameters, states and losses are
    bitwise equal to the eager run's. The compiled opt.step meets nothing untraceable, and neither recompiles once
    warm (the second call sees the state that the first created) while the scheduler moves the lr (and SGD's
    momentum). Triton runs under the interpreter on CPU tensors here: its kernels are custom ops, opaque to Dynamo."""
    steps = 6
    eager = _compiled_versus_eager(algorithm, backend, "eager", steps)
    compiled = _compiled_versus_eager(algorithm, backend, mode, steps)
    _assert_same_run(compiled, eager)
    frames = compiled[4]
    assert frames[1:] == [frames[1]] * (steps - 1), frames
    if mode == "opt_step":
        assert compiled[5] == [], compiled[5]


@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("algorithm", ["adamw", "sgd"])
def test_compiled_step_with_clipping_amp_and_low_precision_equals_eager(algorithm, backend):
    """Fused clipping (AdamW: max_grad_norm; SGD: clip_grad_norm_ with the inf norm), GradScaler's grad_scale and
    found_inf (two skipped steps, the first one among them) and bfloat16 parameters with master weights and
    stochastic rounding: the compiled step (torch.compile(opt.step)) is bitwise the eager one, and so are the total
    norms, with nothing Dynamo cannot trace. SGD's first step, skipped, creates momentum buffers that the next step
    must treat as new again (as the eager step does), although no graph reads found_inf on the host."""
    steps = 6
    options = {"clip": True, "amp": True, "bf16": True}
    eager = _compiled_versus_eager(algorithm, backend, "eager", steps, **options)
    compiled = _compiled_versus_eager(algorithm, backend, "opt_step", steps, **options)
    _assert_same_run(compiled, eager)
    assert all(norm is not None for norm in compiled[3])
    assert compiled[5] == [], compiled[5]


@pytest.mark.parametrize("algorithm", ["adamw", "sgd"])
def test_compiled_step_follows_gradients_and_loaded_state(algorithm):
    """A gradient that vanishes for two steps and comes back, then load_state_dict() rolling the state back to an
    earlier step: the compiled step (recompiled where its guards see the change) stays bitwise the eager one. No
    scheduler here: an lr that load_state_dict() writes into a scheduled group holds for one eager step only (a
    compiled step always follows the schedule program, _current_rows)."""
    import copy

    import torch._dynamo

    def run(compiled: bool):
        torch._dynamo.reset()
        model = _mlp()
        if algorithm == "adamw":
            opt = fused_sched.AdamW(model.parameters(), lr=1e-2)
        else:
            opt = fused_sched.SGD(model.parameters(), lr=1e-2, momentum=0.9)
        step = torch.compile(opt.step, backend="eager") if compiled else opt.step
        history, saved = [], None
        for k, (x, y) in enumerate(_data(9)):
            torch.nn.functional.mse_loss(model(x), y).backward()
            if k in (3, 4):
                model[0].bias.grad = None
            if k == 2:
                saved = copy.deepcopy(opt.state_dict())
            if k == 6:
                opt.load_state_dict(saved)
            step()
            opt.zero_grad()
            history.append([p.detach().clone() for p in model.parameters()])
        torch._dynamo.reset()
        return history

    for ours, theirs in zip(run(True), run(False), strict=True):
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b)


def test_compiled_train_step_with_clipping_has_no_untraceable_step():
    """The whole train step compiled with fused clipping (clip_grad_norm_ then step(), the inf norm): bitwise the
    eager run, the clip's norm pass and the update in the graph as fused_sched operators."""
    import torch._dynamo

    steps = 4
    eager = _compiled_versus_eager("sgd", "cpu", "eager", steps, clip=True)
    compiled = _compiled_versus_eager("sgd", "cpu", "train_step", steps, clip=True)
    _assert_same_run(compiled, eager)

    torch._dynamo.reset()
    model = _mlp()
    opt = fused_sched.AdamW(model.parameters(), lr=1e-2, max_grad_norm=1.0)
    _cosine("fused", opt, 10)
    for x, y in _data(2):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    graphs = []
    torch.compile(opt.step, backend=functools.partial(_record_graph, graphs))()
    torch._dynamo.reset()
    assert _graph_calls(graphs, "fused_sched") == ["fused_sched.grad_norm_clip", "fused_sched.adam_step_"]


def test_compiled_step_of_dtensor_params_runs_the_eager_step():
    """DTensor parameters (FSDP2; here a one-process gloo mesh) are not traced: the compiled step calls the eager
    one through torch.compiler.disable, a deliberate graph break, and gives its results."""
    import socket

    import torch._dynamo
    import torch.distributed as dist
    from torch._dynamo.utils import counters

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed")
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        runs = {}
        for mode in ("eager", "compiled"):
            torch._dynamo.reset()
            counters.clear()
            torch.manual_seed(0)
            params = [torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)])) for _ in range(2)]
            opt = fused_sched.AdamW(params, lr=1e-2, max_grad_norm=0.5)
            sched = fused_sched.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
            step = torch.compile(opt.step, backend="eager") if mode == "compiled" else opt.step
            for _ in range(3):
                for p in params:
                    p.grad = distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)])
                step()
                sched.step()
            runs[mode] = [p.full_tensor() for p in params]
            breaks = [reason.splitlines()[0] for reason in counters["graph_break"]]
            assert counters["unimplemented"] == {}
        assert "Skip calling `torch.compiler.disable()`d function" in breaks
        for a, b in zip(runs["eager"], runs["compiled"], strict=True):
            assert torch.equal(a, b)
    finally:
        torch._dynamo.reset()
        dist.destroy_process_group()


def test_compiled_path_operators_pass_opcheck():
    """The operators the compiled step calls: fake implementations and schemas agree with the kernels."""
    from fused_sched._extension import load_extension

    load_extension()
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(64, generator=gen), torch.randn(3, 5, generator=gen).bfloat16()]
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.fused_sched.grad_norm_clip.default, ([grads[0]], [1], 2.0, 1.0), test_utils=utils)
    torch.library.opcheck(torch.ops.fused_sched.grad_norm_clip.default, (grads, [1, 1], math.inf, 0.5),
                          {"grad_scale": torch.tensor([4.0])}, test_utils=utils)
    if not fused_sched.backends.triton_importable():
        return
    from fused_sched.backends.triton import adam as triton_adam
    from fused_sched.backends.triton import sgd as triton_sgd

    torch.library.opcheck(torch.ops.fused_sched.triton_grad_norm_clip.default, (grads, [1, 1], 2.0, 0.5),
                          test_utils=utils)
    # The Triton ops take the C++ ops' schemas. With a grad_scale or a clip_coef the kernels write the prescaled
    # gradients back, which a schema must declare (grads mutable) for those inputs to be checked here.
    adam_writes_grads = "grads" in triton_adam._ADAM_WRITES
    sgd_writes_grads = "grads" in triton_sgd._SGD_WRITES
    q = torch.randn(64, generator=gen).bfloat16()
    master = q.float()
    hyper = torch.tensor([[1e-2, 0.9, 0.999, 1e-8, 0.1, 0.0, 0.0, 8.0]], dtype=torch.float64)
    advance = torch.zeros(1, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.fused_sched.triton_adam_step_.default,
        ([q], [torch.randn(64, generator=gen).bfloat16()], [torch.zeros(64)], [torch.zeros(64)], [],
         [torch.zeros(())], hyper, [0]),
        {"master_params": [master], "found_inf": torch.zeros(1), "step_advance": advance, "param_ids": [3],
         "sr_seed": 5, **({"grad_scale": torch.tensor([2.0])} if adam_writes_grads else {})},
        test_utils=utils,
    )
    torch.library.opcheck(
        torch.ops.fused_sched.triton_sgd_step_.default,
        ([torch.randn(64, generator=gen)], [torch.randn(64, generator=gen)], [torch.zeros(64)], hyper, [0], [1]),
        {"step_advance": advance, **({"clip_coef": torch.tensor([0.5])} if sgd_writes_grads else {})},
        test_utils=utils,
    )
