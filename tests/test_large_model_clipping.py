"""Fused gradient clipping (clip_grad_norm_, max_grad_norm) against torch.nn.utils.clip_grad_norm_."""

from __future__ import annotations

import math

import pytest
import torch

import fused_sched
from large_model_cases import (
    BACKENDS,
    SHAPES,
    _assert_same_snapshot,
    _grads,
    _set,
    _snapshot,
)
from optim_reference import ATOL, clone_leaves, make_params


# -- fused gradient clipping ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0, 3.0], ids=["l2", "inf", "l1", "l3"])
def test_clip_grad_norm_matches_torch(backend, device, norm_type):
    base = make_params(SHAPES, device=device)
    ours, theirs = clone_leaves(base), clone_leaves(base)
    opt = fused_sched.AdamW(ours, lr=1e-2, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    max_norm = {2.0: 100.0, math.inf: 7.0, 1.0: 5000.0, 3.0: 30.0}[norm_type]  # clips 4-7 of the 10 steps
    clipped = 0
    for step in range(10):
        grads = _grads(base, step, scale=1.0 + step % 3)
        _set(ours, grads)
        _set(theirs, grads)
        total = opt.clip_grad_norm_(max_norm, norm_type)
        ref_total = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type, foreach=False)
        # Different summation orders (and, for p = 3, Triton's exp2/log2 power): measured at most 1.24e-6 relative
        # over these 4 norm types x 2 backends x 10 steps (~10 float32 ulps, for p = 3; ~1 ulp for p = 2).
        torch.testing.assert_close(total, ref_total, rtol=2e-6, atol=0)
        clipped += bool(ref_total > max_norm)
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=ATOL)
    assert 0 < clipped < 10
    assert opt.last_grad_norm is total


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_max_grad_norm_option_equals_explicit_clip(backend, device):
    base = make_params(SHAPES, device=device)
    a, b = clone_leaves(base), clone_leaves(base)
    opt_a = fused_sched.AdamW(a, lr=1e-2, max_grad_norm=20.0, backend=backend)
    opt_b = fused_sched.AdamW(b, lr=1e-2, backend=backend)
    for step in range(6):
        grads = _grads(base, step, scale=1.0 + step % 3)
        _set(a, grads)
        _set(b, grads)
        opt_a.step()
        norm = opt_b.clip_grad_norm_(20.0)
        opt_b.step()
        assert torch.equal(opt_a.last_grad_norm, norm)
    _assert_same_snapshot(_snapshot(opt_a, a), _snapshot(opt_b, b))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_clip_inside_grad_scaler_step_matches_unscale_then_clip(backend, device):
    """max_grad_norm under GradScaler (the norm of grad / scale, computed in the step) equals torch's recipe:
    scaler.unscale_(opt); clip_grad_norm_; scaler.step(opt)."""
    base = make_params(SHAPES, device=device)
    ours, theirs = clone_leaves(base), clone_leaves(base)
    opt = fused_sched.AdamW(ours, lr=1e-2, max_grad_norm=5.0, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    scaler_a = torch.amp.GradScaler(device, init_scale=2.0**8)
    scaler_b = torch.amp.GradScaler(device, init_scale=2.0**8)
    for step in range(8):
        grads = _grads(base, step)
        for params, scaler in ((ours, scaler_a), (theirs, scaler_b)):
            loss = sum((p * g.to(p.device)).sum() for p, g in zip(params, grads, strict=True))
            for p in params:
                p.grad = None
            scaler.scale(loss).backward()
        scaler_a.step(opt)
        scaler_a.update()
        scaler_b.unscale_(ref)
        ref_norm = torch.nn.utils.clip_grad_norm_(theirs, 5.0, foreach=False)
        scaler_b.step(ref)
        scaler_b.update()
        torch.testing.assert_close(opt.last_grad_norm, ref_norm, rtol=2e-6, atol=0)  # see test_clip_grad_norm_...
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=ATOL)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_clip_non_finite_like_torch(backend, device):
    base = make_params(SHAPES, device=device)
    ours, theirs = clone_leaves(base), clone_leaves(base)
    opt = fused_sched.AdamW(ours, lr=1e-2, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    first = _grads(base, 1)
    _set(ours, first)
    _set(theirs, first)
    opt.step()
    ref.step()
    for bad in (float("nan"), float("inf")):
        grads = _grads(base, 0)
        grads[1][5] = bad
        _set(ours, grads)
        _set(theirs, grads)
        before = _snapshot(opt, ours)
        with pytest.raises(RuntimeError, match="non-finite"):
            opt.clip_grad_norm_(1.0, error_if_nonfinite=True)
        with pytest.raises(RuntimeError, match="non-finite"):
            torch.nn.utils.clip_grad_norm_(theirs, 1.0, error_if_nonfinite=True, foreach=False)
        assert opt._pending_clip is None
        _assert_same_snapshot(before, _snapshot(opt, ours))
    # Without the error: the NaN / zero coefficient goes into the update as in torch.
    total = opt.clip_grad_norm_(1.0)
    ref_total = torch.nn.utils.clip_grad_norm_(theirs, 1.0, foreach=False)
    assert math.isinf(total.item()) and math.isinf(ref_total.item())
    opt.step()
    ref.step()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=ATOL, equal_nan=True)


def test_clip_validation():
    params = make_params(SHAPES)
    opt = fused_sched.AdamW(params)
    _set(params, _grads(params, 0))
    with pytest.raises(ValueError, match="norm_type"):
        opt.clip_grad_norm_(1.0, norm_type=0.0)
    with pytest.raises(ValueError, match="max_norm"):
        opt.clip_grad_norm_(-1.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        fused_sched.AdamW(params, max_grad_norm="1")
    assert opt._pending_clip is None
    assert float(fused_sched.AdamW(make_params(SHAPES)).clip_grad_norm_(1.0)) == 0.0  # no gradients: torch's 0


def test_zero_grad_drops_a_pending_clip():
    ours, theirs = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    opt, ref = fused_sched.SGD([ours], lr=1.0), torch.optim.SGD([theirs], lr=1.0)
    ours.grad, theirs.grad = torch.full((1,), 100.0), torch.full((1,), 100.0)
    opt.clip_grad_norm_(1.0)
    torch.nn.utils.clip_grad_norm_([theirs], 1.0)
    opt.zero_grad()  # the step is not taken (a NaN-loss guard, a clip for logging only)
    ref.zero_grad()
    ours.grad, theirs.grad = torch.full((1,), 0.1), torch.full((1,), 0.1)
    opt.step()
    ref.step()
    assert torch.equal(ours.detach(), theirs.detach())
