"""torch.amp.GradScaler without a sync: against torch, and skipped steps skip the schedule too."""

from __future__ import annotations

import pytest
import torch
import transformers

import fused_sched
from large_model_cases import (
    BACKENDS,
    INF_STEPS,
    SHAPES,
    _amp_loop,
    _assert_same_snapshot,
    _grads,
    _set,
    _snapshot,
)
from optim_reference import ATOL, clone_leaves, make_params


# -- torch.amp.GradScaler ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_chained_scheduler_with_skipped_steps_reports_what_it_applies(backend, device):
    """ChainedScheduler (whose last_epoch belongs to its children) under GradScaler overflows: reading
    get_last_lr() every step does not change what the kernels apply, and it reports that lr."""
    results = []
    for read in (False, True):
        p = torch.zeros(3, device=device, requires_grad=True)
        opt = fused_sched.SGD([p], lr=1.0, backend=backend)
        sched = fused_sched.lr_scheduler.ChainedScheduler(
            [fused_sched.lr_scheduler.ExponentialLR(opt, gamma=0.5),
             fused_sched.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=1)])
        scaler = torch.amp.GradScaler(device, init_scale=1.0, growth_interval=10**6)
        applied, reported = [], []
        for step in range(5):
            before = p.detach().clone()
            opt.zero_grad()
            scaler.scale(p.sum() * 1.0).backward()
            if step == 1:
                p.grad[0] = float("inf")
            scaler.step(opt)
            scaler.update()
            applied.append(float((before - p.detach())[1]))
            sched.step()
            if read:
                reported.append(sched.get_last_lr()[0])
        results.append((applied, reported))
    assert results[0][0] == results[1][0] == [1.0, 0.0, 0.5, 0.25, 0.125]
    assert results[1][1][1:] == [0.5, 0.25, 0.125, 0.0625]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_grad_scaler_matches_torch(backend, device, name):
    kwargs = {"lr": 1e-2, "weight_decay": 0.01} if name == "AdamW" else {"lr": 1e-2, "momentum": 0.9}
    base = make_params(SHAPES, device=device)
    ours, theirs = clone_leaves(base), clone_leaves(base)
    opt = getattr(fused_sched, name)(ours, **kwargs, backend=backend)
    ref = getattr(torch.optim, name)(theirs, **kwargs, foreach=False)
    # INF_STEPS include step 2 of 12, and SGD's buffers are created at step 0: the buffer path is covered below.
    scaler_a = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=3)
    scaler_b = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=3)
    _amp_loop(opt, ours, scaler_a)
    _amp_loop(ref, theirs, scaler_b)
    assert scaler_a.get_scale() == scaler_b.get_scale()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=ATOL)
        for key, value in ref.state[b].items():
            torch.testing.assert_close(opt.state[a][key].to(value.dtype), value, rtol=1e-5, atol=ATOL)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("clip", [False, True])
def test_gradients_after_the_step_are_unscaled_and_clipped_like_torch(backend, device, clip):
    """torch's fused optimizers leave GradScaler's gradients unscaled after the step (the unscale_ path leaves them
    so too) and clip_grad_norm_ leaves them clipped: so does fused_sched (max_grad_norm: the norm of the unscaled
    gradients)."""
    base = make_params(SHAPES, dtype=torch.bfloat16, device=device)
    ours, theirs = clone_leaves(base), clone_leaves(base)
    opt = fused_sched.AdamW(ours, lr=1e-2, backend=backend, max_grad_norm=5.0 if clip else None)
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    for step in range(3):
        grads = _grads(base, step, scale=256.0)
        _set(ours, grads)
        _set(theirs, [g.float().mul(1 / 256.0).to(g.dtype) for g in grads])  # what the scaler's unscale_ leaves
        if clip:
            torch.nn.utils.clip_grad_norm_(theirs, 5.0, foreach=False)
        opt.grad_scale = torch.full((1,), 256.0, device=device)
        opt.found_inf = torch.zeros(1, device=device)
        opt.step()
        del opt.grad_scale, opt.found_inf
        ref.step()
        for a, b in zip(ours, theirs, strict=True):
            # bf16 gradients: the clip coefficients agree to float32 rounding, the products round to bf16.
            torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_sgd_buffers_created_by_a_skipped_step_start_fresh(backend, device):
    base = make_params(SHAPES, device=device)
    ours, theirs = clone_leaves(base), clone_leaves(base)
    opt = fused_sched.SGD(ours, lr=0.1, momentum=0.9, dampening=0.5, backend=backend)
    ref = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, dampening=0.5, foreach=False)
    _amp_loop(opt, ours, torch.amp.GradScaler(device, init_scale=4.0), steps=4, inf_steps=(0,))
    _amp_loop(ref, theirs, torch.amp.GradScaler(device, init_scale=4.0), steps=4, inf_steps=(0,))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=ATOL)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_found_inf_step_changes_nothing(backend, device):
    params = make_params(SHAPES, dtype=torch.bfloat16, device=device)
    opt = fused_sched.AdamW(params, master_weights=True, backend=backend, max_grad_norm=1.0)
    _set(params, _grads(params, 0))
    opt.step()
    before = _snapshot(opt, params)
    _set(params, _grads(params, 1))
    opt.grad_scale = torch.full((1,), 8.0, device=device)
    opt.found_inf = torch.ones(1, device=device)
    opt.step()
    del opt.grad_scale, opt.found_inf
    _assert_same_snapshot(before, _snapshot(opt, params))
    opt.step()
    assert all(opt.state[p]["step"].item() == 2 for p in params)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("hf_style", [False, True], ids=["every_step", "trainer_rule"])
def test_skipped_steps_hold_the_device_schedule_back(backend, device, hf_style):
    """Reference: torch AdamW + transformers' cosine schedule stepped only after steps that ran (the Trainer's
    rule). fused_sched: the same whether scheduler.step() is called after every step (the device skips) or only
    after steps that ran (the host skips, the device flag is back to 1 by then): no double counting."""
    base = make_params(SHAPES, device=device)
    ours, theirs = clone_leaves(base), clone_leaves(base)
    opt = fused_sched.AdamW(ours, lr=1e-2, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    sched = fused_sched.get_cosine_schedule_with_warmup(opt, 4, 12)
    ref_sched = transformers.get_cosine_schedule_with_warmup(ref, 4, 12)
    lrs = _amp_loop(opt, ours, torch.amp.GradScaler(device, init_scale=2.0**10), sched, hf_style=hf_style)
    ref_lrs = _amp_loop(ref, theirs, torch.amp.GradScaler(device, init_scale=2.0**10), ref_sched, hf_style=True)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=ATOL)
    assert sched.last_epoch == ref_sched.last_epoch == 12 - len(INF_STEPS)
    assert sched.get_last_lr() == pytest.approx(ref_sched.get_last_lr(), rel=1e-12)
    if hf_style:
        assert [lr for step in lrs for lr in step] == pytest.approx([lr for step in ref_lrs for lr in step], rel=1e-12)
    state = sched.state_dict()
    assert state["last_epoch"] == ref_sched.state_dict()["last_epoch"]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_per_epoch_scheduler_is_not_held_back_by_one_skipped_step(backend, device):
    """A scheduler stepped once per epoch advances when any optimizer step of the epoch ran: here the epoch's last
    step overflows (torch: StepLR stepped every epoch, the skipped step simply does not update)."""
    applied = {}
    for kind in ("torch", "fused"):
        p = torch.ones(4, device=device, requires_grad=True)
        if kind == "fused":
            opt = fused_sched.SGD([p], lr=1.0, backend=backend)
            sched = fused_sched.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
        else:
            opt = torch.optim.SGD([p], lr=1.0, foreach=False)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
        scaler = torch.amp.GradScaler(device, init_scale=1.0, growth_interval=10**6)
        lrs = []
        for epoch in range(3):
            for it in range(3):
                before = p.detach().clone()
                opt.zero_grad()
                scaler.scale((p * 1.0).sum()).backward()
                if epoch == 0 and it == 2:
                    p.grad[0] = float("inf")
                scaler.step(opt)
                scaler.update()
                lrs.append(float((before - p.detach())[1]))  # the lr the step applied (gradient 1)
            sched.step()
        applied[kind] = lrs
    assert applied["fused"] == pytest.approx(applied["torch"], rel=1e-6)


def test_grad_scaler_step_reads_nothing_on_the_host(monkeypatch):
    """No .item() / bool() of a device value in the step: found_inf and grad_scale stay tensors (checked on CPU by
    making Tensor.item and Tensor.__bool__ fail during opt.step())."""
    params = make_params(SHAPES)
    opt = fused_sched.AdamW(params, max_grad_norm=1.0)
    _set(params, _grads(params, 0))
    opt.grad_scale = torch.full((1,), 4.0)
    opt.found_inf = torch.zeros(1)

    def refuse(*_):
        raise AssertionError("host read in step()")

    monkeypatch.setattr(torch.Tensor, "item", refuse)
    monkeypatch.setattr(torch.Tensor, "__bool__", refuse)
    opt.step()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_skipped_first_sgd_step_then_a_rebuilt_plan_keeps_the_buffer_fresh(backend, device):
    """The step that creates momentum buffers overflows; before the next step another parameter loses its
    gradient (a new plan): the buffers are still filled from the gradient, as torch's first step does."""
    results = []
    for kind in ("torch", "fused"):
        a = torch.zeros(3, device=device, requires_grad=True)
        b = torch.zeros(3, device=device, requires_grad=True)
        kwargs = {"lr": 1.0, "momentum": 0.9, "dampening": 0.5}
        opt = (fused_sched.SGD([a, b], **kwargs, backend=backend) if kind == "fused"
               else torch.optim.SGD([a, b], **kwargs, foreach=False))
        scaler = torch.amp.GradScaler(device, init_scale=1.0, growth_interval=10**6)
        for step in range(3):
            opt.zero_grad()
            loss = (a * 2.0).sum() + ((b * 1.0).sum() if step == 0 else 0.0)
            scaler.scale(loss).backward()
            if step == 0:
                a.grad[0] = float("inf")
            scaler.step(opt)
            scaler.update()
        results.append((a.detach().cpu(), opt.state[a]["momentum_buffer"].cpu()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[1][1].float(), results[0][1].float(), rtol=1e-6, atol=1e-6)
