"""Shared by the tests/test_large_model_*.py modules, which test large-model training features against torch
references, on every backend that runs here (cpu; triton under the interpreter without a GPU, on the GPU with one):
fp32 master weights, stochastic rounding, torch.amp.GradScaler without a sync (skipped steps skip the schedule too),
fused gradient clipping."""

from __future__ import annotations

import copy

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (backend, device): the C++ CPU backend, the Triton kernels (interpreted on CPU tensors without a GPU) and the
# CUDA kernels (their host build on CPU tensors without a GPU: conftest.py).
BACKENDS = [pytest.param("cpu", "cpu", id="cpu"), pytest.param("triton", DEVICE, id="triton"),
            pytest.param("cuda", DEVICE, id="cuda")]
SHAPES = [(7,), (3000,), (), (13, 17)]


def _grads(params, step, dtype=None, scale=1.0):
    gen = torch.Generator().manual_seed(1000 + step)
    return [(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale).to(dtype or p.dtype) for p in params]


def _set(params, grads):
    for p, g in zip(params, grads, strict=True):
        p.grad = g.to(device=p.device, dtype=p.dtype, copy=True)  # never shared: torch's clip writes in place


def _snapshot(opt, params):
    return copy.deepcopy(([p.detach().cpu() for p in params],
                          {i: {k: v.cpu() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
                           for i, p in enumerate(params) if p in opt.state}))


def _assert_same_snapshot(a, b):
    for x, y in zip(a[0], b[0], strict=True):
        assert torch.equal(x, y)
    assert a[1].keys() == b[1].keys()
    for i in a[1]:
        assert a[1][i].keys() == b[1][i].keys()
        for k in a[1][i]:
            assert torch.equal(a[1][i][k], b[1][i][k]), (i, k)


INF_STEPS = (2, 6, 7)


def _amp_loop(opt, params, scaler, sched=None, steps=12, hf_style=False, inf_steps=INF_STEPS):
    """A GradScaler loop with gradients that overflow on `inf_steps`. hf_style: the transformers Trainer's rule,
    scheduler.step() only when the optimizer step was not skipped (decided on the host from the scale)."""
    data = [torch.randn(p.shape, generator=torch.Generator().manual_seed(7 + i), dtype=torch.float64)
            for i, p in enumerate(params)]
    lrs = []
    for step in range(steps):
        weight = (1 + step) ** 0.5
        loss = sum((p * d.to(p.dtype).to(p.device) * weight).sum() for p, d in zip(params, data, strict=True))
        opt.zero_grad()
        scaler.scale(loss).backward()
        if step in inf_steps:
            params[step % len(params)].grad.view(-1)[0] = float("inf")
        scale_before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if sched is not None and (not hf_style or scaler.get_scale() >= scale_before):
            sched.step()
            lrs.append(sched.get_last_lr())
    return lrs
