"""fused_sched inside training frameworks, each against the same run with torch.optim.AdamW in the same test:
the Hugging Face Trainer, torch.compile (a compiled model; a compiled step with opt.step() inside), Lightning, and
the scripts under examples/.

Tolerances: fused_sched's float32 update matches torch.optim's to a few ulps per step (tests/optim_reference.py),
so losses are compared with torch.testing.assert_close's float32 defaults (rtol 1.3e-6, atol 1e-5) and parameters
(O(0.1 .. 1)) with rtol 1.3e-6 and atol 1e-6 unless a test says otherwise; the differences measured for each test
are given in its comments.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_sched

ROOT = Path(__file__).resolve().parent.parent


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


# -- Hugging Face Trainer ---------------------------------------------------------------------------------------
def _hf_run(kind: str, tmp_path: Path, steps: int):
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    config = GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    ids = torch.randint(config.vocab_size, (48, 16), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "labels": row.clone()} for row in ids]
    if kind == "fused":
        opt = fused_sched.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
        sched = fused_sched.get_cosine_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=steps)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1, foreach=False)
        sched = transformers.get_cosine_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=steps)
    args = TrainingArguments(
        output_dir=str(tmp_path / kind), max_steps=steps, per_device_train_batch_size=8, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, optimizers=(opt, sched))
    trainer.train()
    wrapped = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's AcceleratedOptimizer
    assert wrapped is opt
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in history] == list(range(1, steps + 1))
    return model, history


def test_hf_trainer_gpt2_matches_torch_adamw(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    steps = 10
    ours, our_log = _hf_run("fused", tmp_path, steps)
    theirs, their_log = _hf_run("torch", tmp_path, steps)
    # The logged learning rates are the schedulers' host values: transformers' own lambda in both runs, exactly.
    assert [e["learning_rate"] for e in our_log] == [e["learning_rate"] for e in their_log]
    assert len({e["learning_rate"] for e in our_log}) > steps // 2  # warmup then cosine: the lr moves
    # Measured: the losses are equal or 1 ulp apart (4.8e-7 at 4.2), the gradient norms 6e-8 apart. Parameters: at
    # most 2.8e-6 apart after 10 steps (1.8e-6 to 3.2e-6 over seeds 1-6), always in attn.c_attn.bias: the key bias
    # has a zero gradient in exact arithmetic, so its float32 gradient is rounding noise, which Adam's
    # normalization m / (sqrt(v) + eps) amplifies; torch.optim.AdamW(fused=True) differs from the for-loop AdamW by the
    # same 2.0e-6 there. Hence the float32 defaults (atol 1e-5) for the parameters here, not atol 1e-6.
    torch.testing.assert_close([e["loss"] for e in our_log], [e["loss"] for e in their_log])
    torch.testing.assert_close([e["grad_norm"] for e in our_log], [e["grad_norm"] for e in their_log])
    _assert_params_close(ours, theirs, rtol=1.3e-6, atol=1e-5)
    assert our_log[-1]["loss"] != our_log[0]["loss"]


# -- examples/ --------------------------------------------------------------------------------------------------
def _run_example(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _logged(stdout: str) -> list[tuple[int, float, float]]:
    """The (step, loss, lr) lines the examples print."""
    rows = []
    for line in stdout.splitlines():
        words = line.split()
        if len(words) == 6 and words[0] == "step" and words[2] == "loss" and words[4] == "lr":
            rows.append((int(words[1]), float(words[3]), float(words[5])))
    return rows


def test_example_plain_pytorch_loop():
    rows = _logged(_run_example("plain_pytorch_loop.py", "--steps", "30", "--log-every", "1"))
    assert [r[0] for r in rows] == list(range(1, 31))
    assert rows[-1][1] < rows[0][1] - 0.5  # it learns
    lrs = [r[2] for r in rows]
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(3e-3, rel=1e-3) and lrs[-1] < 1e-4  # warmup, then cosine


def test_example_hf_trainer_gpt2():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    rows = _logged(_run_example("hf_trainer_gpt2.py", "--steps", "4"))
    assert [r[0] for r in rows] == [1, 2, 3, 4]
    assert all(r[1] > 0 for r in rows)


def test_example_plain_loop_matches_torch():
    """The example's loop with fused_sched and with torch.optim + transformers' schedule: the same losses."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import plain_pytorch_loop
    finally:
        sys.path.remove(str(ROOT / "examples"))
    ours = plain_pytorch_loop.main(["--steps", "12", "--log-every", "100"])
    theirs = plain_pytorch_loop.main(["--steps", "12", "--log-every", "100", "--optimizer", "torch"])
    torch.testing.assert_close(ours, theirs)


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


def _record_graph(graphs: list, gm, example_inputs):
    graphs.append(gm)
    return gm.forward


def _graph_calls(graphs: list, namespace: str) -> list[str]:
    """The operators of `namespace` that the captured graphs call, in order."""
    return [str(node.target) for gm in graphs for node in gm.graph.nodes
            if node.op == "call_function" and str(node.target).startswith(namespace + ".")]


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


# -- Lightning --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["CosineAnnealingLR", "get_cosine_schedule_with_warmup"])
def test_lightning_module_matches_torch_adamw(schedule):
    lightning = pytest.importorskip("lightning")
    if schedule == "get_cosine_schedule_with_warmup":
        transformers = pytest.importorskip("transformers")
    steps = 8

    class Module(lightning.LightningModule):
        def __init__(self, kind: str):
            super().__init__()
            self.net = _mlp()
            self.kind = kind
            self.losses, self.lrs = [], []

        def training_step(self, batch, batch_index):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.losses.append(loss.item())
            self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
            return loss

        def configure_optimizers(self):
            opt = _optimizer(self.kind, self.parameters())
            if schedule == "CosineAnnealingLR":
                sched = _cosine(self.kind, opt, steps)
            elif self.kind == "fused":
                sched = fused_sched.get_cosine_schedule_with_warmup(opt, 2, steps)
            else:
                sched = transformers.get_cosine_schedule_with_warmup(opt, 2, steps)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    xs, ys = zip(*_data(steps), strict=True)
    dataset = torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))
    runs = {}
    for kind in ("fused", "torch"):
        module = Module(kind)
        trainer = lightning.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False,
                                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, torch.utils.data.DataLoader(dataset, batch_size=4))
        assert type(trainer.optimizers[0]) is (fused_sched.AdamW if kind == "fused" else torch.optim.AdamW)
        assert len(module.losses) == steps
        runs[kind] = module
    ours, theirs = runs["fused"], runs["torch"]
    # Stepped at every step ("interval": "step"): a new lr at each step (warmup-cosine repeats 0.005 once).
    assert ours.lrs == theirs.lrs and len(set(ours.lrs)) >= steps - 1
    # Measured: losses at most 1.2e-7 apart, params at most 3e-8.
    torch.testing.assert_close(ours.losses, theirs.losses)
    _assert_params_close(ours, theirs)
