"""fused_sched on FSDP2 (``fully_shard``, DTensor parameters; 2 CPU processes on gloo, one GPU with NCCL)
against torch.optim.AdamW in the same processes, fused clipping included (tests/distributed_cases.py: the harness).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import fused_sched
from distributed_cases import (
    STEPS,
    TOLERANCE,
    _assert_params_equal,
    _batches,
    _fsdp_optimizer,
    _mlp,
    _run,
    _sharded_mlp,
    _train,
)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


# -- FSDP2 (fully_shard) and torch.distributed.checkpoint ----------------------------------------------------------
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
    # 2-norms in another summation order: ~1 float32 ulp (tests/test_large_model_clipping.py measures up to 1.24e-6
    # over p).
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
