"""fused_sched under torch.distributed, 2 CPU processes on gloo: DistributedDataParallel, ZeroRedundancyOptimizer
and FSDP2 (``fully_shard``, DTensor parameters) with torch.distributed.checkpoint. Every test trains the same model
on the same data with fused_sched and with torch.optim.AdamW (foreach=False, the for-loop reference) in the same
processes and compares the parameters on every rank.

The workers are spawned (torch.multiprocessing, start method "spawn") and joined under a deadline, and the process
group has a collective timeout, so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import copy
import datetime
import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fused_sched

WORLD = 2
JOIN_TIMEOUT_S = 180
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
STEPS = 10
# Parameters are O(0.1 .. 1): the float32 defaults' rtol (1.3e-6) with atol 1e-6 instead of 1e-5. Measured
# (fused_sched against torch.optim.AdamW, float32): at most 4.5e-8 (DDP), 3e-8 (ZeroRedundancyOptimizer; FSDP2 with
# the DTensor parameters handed to the kernels as their local shards).
TOLERANCE = {"rtol": 1.3e-6, "atol": 1e-6}

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


# -- process harness ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, port: int, args: tuple, backend: str = "gloo", world: int = WORLD) -> None:
    torch.set_num_threads(1)  # two processes share the CI machine's cores
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        fn(rank, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # A finished worker leaves without the interpreter's teardown: in about 1 run in 16 of the DDP / ZeRO tests on
    # the 2-core CI machine, a worker aborted there ("terminate called without an active exception", SIGABRT)
    # after every rank had passed the barrier and destroyed its process group, i.e. after the test's work was
    # done and checked. Not reproduced by a standalone DDP script (16 runs each with torch.optim and fused_sched);
    # the cause (a C++ thread destroyed at exit) is not identified.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run(fn, *args, backend: str = "gloo", world: int = WORLD) -> None:
    """Run ``fn(rank, *args)`` in `world` spawned processes; an exception in any of them fails the test with its
    traceback (torch.multiprocessing.ProcessRaisedException)."""
    context = mp.start_processes(_entry, args=(fn, _free_port(), args, backend, world), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"distributed workers did not finish within {JOIN_TIMEOUT_S} s")


# -- shared pieces ----------------------------------------------------------------------------------------------
def _mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 24), torch.nn.Tanh(), torch.nn.Linear(24, 4)
    )


def _batches(rank: int, steps: int, start: int = 0):
    """The batches of `rank` for steps start .. start+steps-1: each rank sees its own data, identical for the
    fused_sched and the torch run."""
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(1000 * rank + step)
        yield torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)


def _train(model, opt, sched, rank: int, steps: int, start: int = 0) -> list[float]:
    losses = []
    for x, y in _batches(rank, steps, start):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _local(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.to_local() if hasattr(t, "to_local") else t


def _assert_params_equal(ours, theirs, rank: int) -> None:
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        torch.testing.assert_close(_local(a), _local(b), msg=lambda m, name=name: f"rank {rank}, {name}: {m}",
                                   **TOLERANCE)


def _assert_same_on_every_rank(model) -> None:
    for name, p in model.named_parameters():
        gathered = [torch.empty_like(p.detach()) for _ in range(WORLD)]
        dist.all_gather(gathered, p.detach().contiguous())
        for other in gathered[1:]:
            torch.testing.assert_close(other, gathered[0], rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


# -- DistributedDataParallel ------------------------------------------------------------------------------------
def _ddp_worker(rank: int) -> None:
    from torch.nn.parallel import DistributedDataParallel

    base = _mlp()
    runs = {}
    for kind, opt_class, schedulers in (
        ("fused", fused_sched.AdamW, fused_sched.lr_scheduler),
        ("torch", torch.optim.AdamW, torch.optim.lr_scheduler),
    ):
        model = DistributedDataParallel(copy.deepcopy(base))
        extra = {} if kind == "fused" else {"foreach": False}
        opt = opt_class(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, **extra)
        # OneCycleLR drives lr and beta1 every step: with fused_sched both are computed by the update kernel.
        sched = schedulers.OneCycleLR(opt, max_lr=2e-2, total_steps=STEPS)
        losses = _train(model, opt, sched, rank, STEPS)
        runs[kind] = (model.module, losses, sched.get_last_lr())
    (ours, our_losses, our_lr), (theirs, their_losses, their_lr) = runs["fused"], runs["torch"]
    assert our_lr == their_lr
    torch.testing.assert_close(our_losses, their_losses)
    _assert_params_equal(ours, theirs, rank)
    _assert_same_on_every_rank(ours)
    # The models trained: the comparison is not between two untouched copies.
    assert not torch.equal(ours[0].weight, base[0].weight)


def test_ddp_matches_torch_adamw():
    _run(_ddp_worker)


# -- ZeroRedundancyOptimizer ------------------------------------------------------------------------------------
def _zero(model, opt_class, **kw):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    extra = {"foreach": False} if opt_class is torch.optim.AdamW else {}
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=opt_class, lr=1e-2, weight_decay=0.1,
                                  **extra, **kw)
    assert isinstance(opt.optim, opt_class)
    return opt


def _zero_worker(rank: int) -> None:
    from torch.nn.parallel import DistributedDataParallel

    base = _mlp()
    runs = {}
    for kind, opt_class, schedulers in (
        ("fused", fused_sched.AdamW, fused_sched.lr_scheduler),
        ("torch", torch.optim.AdamW, torch.optim.lr_scheduler),
    ):
        model = DistributedDataParallel(copy.deepcopy(base))
        opt = _zero(model, opt_class)
        # The scheduler drives the ZeroRedundancyOptimizer (a torch Optimizer, not a fused_sched one): the lr
        # reaches the local fused_sched.AdamW through its param groups, as a host value, at every step.
        sched = schedulers.CosineAnnealingLR(opt, T_max=STEPS, eta_min=1e-3)
        losses = _train(model, opt, sched, rank, STEPS)
        opt.consolidate_state_dict(to=0)
        state = opt.state_dict() if rank == 0 else None
        runs[kind] = (model, opt, losses, state)
    (ours, _, our_losses, our_state), (theirs, their_opt, their_losses, their_state) = runs["fused"], runs["torch"]
    torch.testing.assert_close(our_losses, their_losses)
    _assert_params_equal(ours.module, theirs.module, rank)
    _assert_same_on_every_rank(ours.module)
    assert not torch.equal(ours.module[0].weight, base[0].weight)
    if rank == 0:
        # Rank 0 holds the whole consolidated state: every parameter's exp_avg / exp_avg_sq / step, equal to torch's.
        assert len(our_state["state"]) == len(their_state["state"]) == len(list(base.parameters()))
        for index, their_entry in their_state["state"].items():
            our_entry = our_state["state"][index]
            assert set(our_entry) == set(their_entry)
            for key, value in their_entry.items():
                torch.testing.assert_close(our_entry[key], value, msg=lambda m, i=index, k=key: f"state {i} {k}: {m}",
                                           **TOLERANCE)
        # Every hyper-parameter torch has, with torch's value (fused_sched's groups may hold options of their own;
        # "foreach" is None for fused_sched, its default, and False as the reference was built).
        for ours_group, theirs_group in zip(our_state["param_groups"], their_state["param_groups"], strict=True):
            assert {k: ours_group[k] for k in theirs_group if k != "foreach"} == {
                k: v for k, v in theirs_group.items() if k != "foreach"
            }
    # The consolidated state loads into a fresh ZeroRedundancyOptimizer of fused_sched.AdamW (every rank takes its
    # shard of it) and training goes on as the uninterrupted torch run does.
    holder = [our_state]
    dist.broadcast_object_list(holder, src=0)
    resumed = DistributedDataParallel(copy.deepcopy(ours.module))
    resumed_opt = _zero(resumed, fused_sched.AdamW)
    resumed_opt.load_state_dict(holder[0])
    torch.testing.assert_close(_train(resumed, resumed_opt, None, rank, 3, start=STEPS),
                               _train(theirs, their_opt, None, rank, 3, start=STEPS))
    _assert_params_equal(resumed.module, theirs.module, rank)


def test_zero_redundancy_optimizer_matches_torch_adamw():
    _run(_zero_worker)


# -- FSDP2 (fully_shard) and torch.distributed.checkpoint ----------------------------------------------------------
def _sharded_mlp(seed: int = 0):
    from torch.distributed.fsdp import fully_shard

    model = _mlp()
    if seed:
        torch.manual_seed(seed)
        for p in model.parameters():
            torch.nn.init.normal_(p.data)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _fsdp_optimizer(kind: str, model):
    if kind == "fused":
        opt = fused_sched.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
        return opt, fused_sched.lr_scheduler.CosineAnnealingLR(opt, T_max=2 * STEPS, eta_min=1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=False,
                            fused=False)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2 * STEPS, eta_min=1e-3)


def _fsdp_worker(rank: int) -> None:
    from torch.distributed.tensor import DTensor

    runs = {}
    for kind in ("torch", "fused"):
        model = _sharded_mlp()
        assert all(isinstance(p, DTensor) for p in model.parameters())
        opt, sched = _fsdp_optimizer(kind, model)
        runs[kind] = (model, _train(model, opt, sched, rank, STEPS))
    (ours, our_losses), (theirs, their_losses) = runs["fused"], runs["torch"]
    torch.testing.assert_close(our_losses, their_losses)
    _assert_params_equal(ours, theirs, rank)


def test_fsdp2_matches_torch_adamw():
    _run(_fsdp_worker)


def _fsdp_clip_worker(rank: int) -> None:
    """fused_sched's clip (max_grad_norm, in the step) against torch.nn.utils.clip_grad_norm_ on the same FSDP2
    model: the norm of the whole model is reduced across the ranks' shards on the device."""
    runs = {}
    for kind in ("torch", "fused"):
        model = _sharded_mlp()
        if kind == "fused":
            opt = fused_sched.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, max_grad_norm=0.5)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False, fused=False)
        norms, losses = [], []
        for x, y in _batches(rank, STEPS):
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            if kind == "torch":
                norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5, foreach=False).full_tensor())
            opt.step()
            if kind == "fused":
                norms.append(opt.last_grad_norm.clone())
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        runs[kind] = (model, torch.stack(norms), losses)
    (ours, our_norms, our_losses), (theirs, their_norms, their_losses) = runs["fused"], runs["torch"]
    assert bool((their_norms > 0.5).any())  # the clip is active on some steps
    # 2-norms in another summation order: ~1 float32 ulp (tests/test_large_model.py measures up to 1.24e-6 over p).
    torch.testing.assert_close(our_norms, their_norms, rtol=2e-6, atol=0)
    # The norms agree to float32 rounding (another summation order), so the clipped updates and the losses after
    # them agree to a few ulps (measured 2.4e-7 on a loss of 1.23), not to the bit.
    torch.testing.assert_close(our_losses, their_losses, **TOLERANCE)
    _assert_params_equal(ours, theirs, rank)


def test_fsdp2_fused_clipping_matches_torch():
    _run(_fsdp_clip_worker)


def _fsdp_clip_without_gradients_worker(rank: int) -> None:
    """Rank 1 holds no gradient at all (dropped after backward): it still joins the norm's all-reduce, so rank 0
    does not wait forever, and both get the norm of the gradients that exist (rank 0's shards). Once through
    clip_grad_norm_() (then a step that applies it), once through max_grad_norm inside the step."""
    from torch.distributed.tensor import DTensor

    model = _sharded_mlp()
    opt = fused_sched.AdamW(model.parameters(), lr=1e-2, max_grad_norm=0.5)
    for step, (x, y) in enumerate(_batches(rank, 2)):
        torch.nn.functional.mse_loss(model(x), y).backward()
        if rank == 1:
            opt.zero_grad(set_to_none=True)
        local = [p.grad._local_tensor.double().flatten() for p in model.parameters() if isinstance(p.grad, DTensor)]
        expected = torch.cat(local).square().sum() if local else torch.zeros((), dtype=torch.float64)
        dist.all_reduce(expected)  # rank 0's shards only
        if step == 0:
            norm = opt.clip_grad_norm_(1.0)
            torch.testing.assert_close(norm.double(), expected.sqrt(), rtol=2e-6, atol=0)
        opt.step()
        torch.testing.assert_close(opt.last_grad_norm.double(), expected.sqrt(), rtol=2e-6, atol=0)
        opt.zero_grad(set_to_none=True)


def test_fsdp2_clip_on_a_rank_without_gradients():
    _run(_fsdp_clip_without_gradients_worker)


def _dcp_worker(rank: int, kind: str, directory: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    first, rest = 6, 4
    # Uninterrupted: first + rest steps.
    straight = _sharded_mlp()
    opt, sched = _fsdp_optimizer(kind, straight)
    straight_losses = _train(straight, opt, sched, rank, first + rest)

    # Interrupted: `first` steps, save model and optimizer with torch.distributed.checkpoint ...
    model = _sharded_mlp()
    opt, sched = _fsdp_optimizer(kind, model)
    losses = _train(model, opt, sched, rank, first)
    saved_sched = sched.state_dict()
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=directory)
    optim_state = get_optimizer_state_dict(model, opt)
    del model, opt, sched

    # ... then a fresh model (other weights) and optimizer load them and train `rest` more steps.
    model = _sharded_mlp(seed=123)
    opt, sched = _fsdp_optimizer(kind, model)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=directory)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    sched.load_state_dict(saved_sched)
    # The restored optimizer state is the saved one, DTensor shards included.
    restored = get_optimizer_state_dict(model, opt)
    for name, entry in optim_state["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(_local(restored["state"][name][key]), _local(value), rtol=0, atol=0)
    losses += _train(model, opt, sched, rank, rest, start=first)

    # Saving and loading is exact: the resumed run is the uninterrupted one, bit for bit.
    torch.testing.assert_close(losses, straight_losses, rtol=0, atol=0)
    for (name, a), (_, b) in zip(model.named_parameters(), straight.named_parameters(), strict=True):
        torch.testing.assert_close(_local(a), _local(b), rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
    if kind == "fused":
        # And it is torch's run.
        reference = _sharded_mlp()
        opt, sched = _fsdp_optimizer("torch", reference)
        torch.testing.assert_close(losses, _train(reference, opt, sched, rank, first + rest))
        _assert_params_equal(model, reference, rank)


@pytest.mark.parametrize("kind", ["torch", "fused"])
def test_fsdp2_checkpoint_resume_equals_uninterrupted(kind, tmp_path):
    """kind="torch" checks the harness (FSDP2 on gloo CPU with torch.optim.AdamW(foreach=False, fused=False) and
    the checkpoint round trip); kind="fused" is what fused_sched must do."""
    _run(_dcp_worker, kind, str(tmp_path / "checkpoint"))


def test_get_optimizer_state_dict_of_a_fresh_optimizer_leaves_params_untouched():
    """The checkpoint API's state initialization must not move the parameters: torch.optim.AdamW with its scheduler
    does not; neither must fused_sched.AdamW with its own (in process: no process group is needed)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    for kind, opt_class, schedulers in (
        ("torch", torch.optim.AdamW, torch.optim.lr_scheduler),
        ("fused", fused_sched.AdamW, fused_sched.lr_scheduler),
    ):
        model = _mlp()
        before = [p.detach().clone() for p in model.parameters()]
        opt = opt_class(model.parameters(), lr=0.1, weight_decay=0.5)
        schedulers.CosineAnnealingLR(opt, T_max=10)
        state = get_optimizer_state_dict(model, opt)
        assert len(state["state"]) == len(before)
        for p, b in zip(model.parameters(), before, strict=True):
            torch.testing.assert_close(p.detach(), b, rtol=0, atol=0, msg=lambda m, kind=kind: f"{kind}: {m}")


def _fsdp_cuda_worker(rank: int) -> None:
    """FSDP2 on one GPU with NCCL: fused_sched (Triton kernels, fused clipping) against torch.optim.AdamW."""
    from torch.distributed.fsdp import fully_shard

    runs = {}
    for kind in ("torch", "fused"):
        model = _mlp().cuda()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        if kind == "fused":
            opt = fused_sched.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, max_grad_norm=0.5)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
        losses = []
        for x, y in _batches(rank, STEPS):
            loss = torch.nn.functional.mse_loss(model(x.cuda()), y.cuda())
            loss.backward()
            if kind == "torch":
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5, foreach=False)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        runs[kind] = (model, losses)
    (ours, our_losses), (theirs, their_losses) = runs["fused"], runs["torch"]
    torch.testing.assert_close(our_losses, their_losses, **TOLERANCE)
    _assert_params_equal(ours, theirs, rank)


@pytest.mark.skipif(not torch.cuda.is_available() or not dist.is_nccl_available(), reason="needs a GPU and NCCL")
def test_fsdp2_on_one_gpu_with_nccl():
    _run(_fsdp_cuda_worker, backend="nccl", world=1)
