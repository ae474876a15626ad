"""Large-model training features against torch references, on every backend that runs here (cpu; triton under the
interpreter without a GPU, on the GPU with one): fp32 master weights, stochastic rounding, torch.amp.GradScaler
without a sync (skipped steps skip the schedule too), fused gradient clipping."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import transformers

import fused_sched
from optim_reference import ATOL, clone_leaves, make_params

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


# -- fp32 master weights ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_master_weights_follow_torch_in_float32(backend, device, dtype, name):
    """The master copy follows torch.optim run in float32 on the same (low-precision) gradients, and the parameter
    is the master rounded to nearest even after every step."""
    kwargs = {"lr": 1e-2, "weight_decay": 0.1}
    if name == "SGD":
        kwargs.update(momentum=0.9, nesterov=True, weight_decay=1e-3)
    base = make_params(SHAPES, dtype=dtype, device=device)
    ours = clone_leaves(base)
    ref = [p.detach().float().clone().requires_grad_(True) for p in base]
    opt = getattr(fused_sched, name)(ours, **kwargs, master_weights=True, backend=backend)
    ref_opt = getattr(torch.optim, name)(ref, **kwargs, foreach=False)
    for step in range(15):
        grads = _grads(base, step)
        _set(ours, grads)
        _set(ref, [g.float() for g in grads])
        opt.step()
        ref_opt.step()
        for p, r in zip(ours, ref, strict=True):
            master = opt.state[p]["master_param"]
            assert master.dtype == torch.float32
            torch.testing.assert_close(master, r.detach(), rtol=1e-5, atol=ATOL)
            assert torch.equal(p.detach(), master.to(dtype))


def test_master_weights_make_bf16_training_track_float32():
    """A bf16 model trained with master weights stays close to the float32 run; stochastic rounding lands between
    it and plain bf16 rounding of every update, which drifts furthest."""

    def train(dtype, **opt_kwargs):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).to(dtype)
        data_gen = torch.Generator().manual_seed(1)
        x = torch.randn(256, 32, generator=data_gen)
        y = torch.sin(x.sum(1, keepdim=True))
        if dtype == torch.float32:
            opt = torch.optim.AdamW(model.parameters(), lr=2e-3, foreach=False)
        else:
            opt = fused_sched.AdamW(model.parameters(), lr=2e-3, **opt_kwargs)
        losses = []
        for _ in range(150):
            loss = torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if opt_kwargs.get("master_weights"):
            weights = [opt.state[p]["master_param"] for p in model.parameters()]
        else:
            weights = [p.detach().float() for p in model.parameters()]
        return torch.cat([w.flatten() for w in weights]), torch.tensor(losses)

    reference, ref_losses = train(torch.float32)
    runs = {kind: train(torch.bfloat16, **{kind: True}) if kind != "plain" else train(torch.bfloat16)
            for kind in ("master_weights", "stochastic_rounding", "plain")}
    drift = {kind: float((w - reference).norm() / reference.norm()) for kind, (w, _) in runs.items()}
    loss_gap = {kind: float((losses - ref_losses).abs().max()) for kind, (_, losses) in runs.items()}
    # Measured over seeds 0-2 (bf16 forward/backward in all three runs): weight drift relative to the float32 run
    # 0.014-0.025 with master weights, 0.038-0.043 with stochastic rounding, 0.056-0.067 plain; largest loss gap
    # 5e-4-7e-4 with master weights, 2.0e-3-2.5e-3 plain.
    assert drift["master_weights"] < 0.04
    assert loss_gap["master_weights"] < 1.5e-3
    assert drift["master_weights"] < drift["stochastic_rounding"] < drift["plain"]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_master_weights_resume_bit_identical(backend, device):
    base = make_params(SHAPES, dtype=torch.bfloat16, device=device)
    straight, resumed = clone_leaves(base), clone_leaves(base)
    opt = fused_sched.AdamW(straight, lr=1e-2, master_weights=True, backend=backend)
    first = fused_sched.AdamW(resumed, lr=1e-2, master_weights=True, backend=backend)
    for step in range(10):
        _set(straight, _grads(base, step))
        opt.step()
        if step < 5:
            _set(resumed, _grads(base, step))
            first.step()
        if step == 4:
            buffer = io.BytesIO()
            torch.save(first.state_dict(), buffer)
            buffer.seek(0)
            second = fused_sched.AdamW(resumed, lr=1e-2, master_weights=True, backend=backend)
            second.load_state_dict(torch.load(buffer))
            assert all(second.state[p]["master_param"].dtype == torch.float32 for p in resumed)
        if step >= 5:
            _set(resumed, _grads(base, step))
            second.step()
    _assert_same_snapshot(_snapshot(opt, straight), _snapshot(second, resumed))


def test_master_weights_state_dict_loads_into_torch():
    """torch.optim.AdamW loads a state_dict with master copies (it ignores the extra state key)."""
    params = make_params(SHAPES, dtype=torch.bfloat16)
    opt = fused_sched.AdamW(params, master_weights=True)
    _set(params, _grads(params, 0))
    opt.step()
    ref = torch.optim.AdamW(clone_leaves(params))
    ref.load_state_dict(opt.state_dict())
    assert all("exp_avg" in s for s in ref.state.values())


# -- stochastic rounding ---------------------------------------------------------------------------------------
def _decay_run(backend, device, steps, n, seed=0, **kwargs):
    """AdamW with zero gradients: each step multiplies the weights by 1 - lr * wd and rounds to bf16."""
    p = torch.ones(n, dtype=torch.bfloat16, device=device, requires_grad=True)
    opt = fused_sched.AdamW([p], lr=1e-3, weight_decay=1.0, backend=backend, rounding_seed=seed, **kwargs)
    for _ in range(steps):
        p.grad = torch.zeros_like(p)
        opt.step()
    return p.detach().float().cpu()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_stochastic_rounding_is_unbiased(backend, device):
    """One step from 1.0: the float32 result 0.999 lies between the bf16 values 0.99609375 and 1.0 (rounding to
    nearest always gives 1.0). Stochastic rounding rounds up with probability q = 0.749..., so the mean of n
    roundings is 0.999 within a few standard errors."""
    n = 1 << 16
    x = float(torch.tensor(1.0, dtype=torch.float32) * torch.tensor(1.0 - 1e-3 * 1.0, dtype=torch.float32))
    lo, hi = 0.99609375, 1.0
    q = (x - lo) / (hi - lo)
    sigma = (hi - lo) * math.sqrt(q * (1 - q) / n)
    values = _decay_run(backend, device, 1, n, stochastic_rounding=True)
    assert set(values.unique().tolist()) == {lo, hi}
    assert abs(values.mean().item() - x) < 5 * sigma  # measured: within 1 sigma with seed 0
    assert torch.all(_decay_run(backend, device, 1, n) == 1.0)  # nearest rounding: stuck


def test_stochastic_rounding_tracks_float32_over_many_steps():
    """300 decays of 0.1%: rounding to nearest never leaves 1.0; stochastic rounding follows the float32 curve."""
    n = 1 << 14
    expected = 1.0
    for _ in range(300):
        expected = float(torch.tensor(expected, dtype=torch.float32) * torch.tensor(0.999, dtype=torch.float32))
    values = _decay_run("cpu", "cpu", 300, n, stochastic_rounding=True)
    assert torch.all(_decay_run("cpu", "cpu", 300, 64) == 1.0)
    # Each element is a random walk whose rounding noise has a standard deviation of about spacing * 0.5 per step,
    # spread over 300 steps and averaged over n elements: 1e-3 is > 5 standard errors.
    assert abs(values.mean().item() - expected) < 1e-3, (values.mean().item(), expected)


def test_stochastic_rounding_is_deterministic_and_backend_independent():
    n = 5000
    a = _decay_run("cpu", "cpu", 3, n, seed=7, stochastic_rounding=True)
    b = _decay_run("cpu", "cpu", 3, n, seed=7, stochastic_rounding=True)
    c = _decay_run("cpu", "cpu", 3, n, seed=8, stochastic_rounding=True)
    t = _decay_run("triton", DEVICE, 3, n, seed=7, stochastic_rounding=True)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(a, t)


@pytest.mark.parametrize("seed", [0, 2**31 + 5, 2**32 - 1, 2**63 - 1, (2**40) | 7])
def test_stochastic_rounding_streams_equal_across_backends_for_any_seed(seed):
    a = _decay_run("cpu", "cpu", 2, 4099, seed=seed, stochastic_rounding=True)
    t = _decay_run("triton", DEVICE, 2, 4099, seed=seed, stochastic_rounding=True)
    assert torch.equal(a, t)


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


def test_stochastic_rounding_rejects_float16_and_master_weights():
    p = torch.zeros(4, dtype=torch.float16, requires_grad=True)
    opt = fused_sched.AdamW([p], stochastic_rounding=True)
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="bfloat16"):
        opt.step()
    assert torch.all(p == 0) and not opt.state
    with pytest.raises(ValueError, match="exclude each other"):
        fused_sched.AdamW([p], master_weights=True, stochastic_rounding=True)
    with pytest.raises(ValueError, match="rounding_seed"):
        fused_sched.AdamW([p], rounding_seed=-1)


# -- torch.amp.GradScaler ----------------------------------------------------------------------------------------
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


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_backends_agree_bit_for_bit_on_everything_at_once(backend):
    """Master weights + stochastic rounding groups, GradScaler, fused clip: the C++, Triton and CUDA kernels share
    their math (optim_math.h, included by the CPU and CUDA kernels, and its Triton mirror) and agree to the bit."""
    results = []
    for name, device in (("cpu", "cpu"), (backend, DEVICE)):
        torch.manual_seed(3)
        base = make_params(SHAPES, dtype=torch.bfloat16, device=device)
        half = len(base) // 2
        params = clone_leaves(base)
        opt = fused_sched.AdamW([{"params": params[:half], "master_weights": True},
                                 {"params": params[half:], "stochastic_rounding": True}],
                                lr=1e-2, max_grad_norm=10.0, backend=name, rounding_seed=5)
        scaler = torch.amp.GradScaler(device, init_scale=2.0**6)
        _amp_loop(opt, params, scaler, steps=6, inf_steps=(3,))
        results.append(_snapshot(opt, params))
    _assert_same_snapshot(*results)


# -- review fixes --------------------------------------------------------------------------------------------------
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


def test_master_weights_switched_on_and_off_mid_training():
    """Off -> on: a master copy is made from the parameter; on -> off: the parameter is the value again, and a
    later on starts from it (not from the stale copy)."""
    p = torch.ones(8, dtype=torch.bfloat16, requires_grad=True)
    opt = fused_sched.AdamW([p], lr=1e-3, weight_decay=1.0)
    group = opt.param_groups[0]

    def step():
        p.grad = torch.zeros_like(p)
        opt.step()

    step()
    assert "master_param" not in opt.state[p]
    group["master_weights"] = True
    step()
    master = opt.state[p]["master_param"]
    assert torch.equal(master, torch.full((8,), 0.999, dtype=torch.float32))  # 1.0 * (1 - 1e-3), not rounded
    group["master_weights"] = False
    step()
    assert "master_param" not in opt.state[p]
    with torch.no_grad():
        p.fill_(0.5)
    group["master_weights"] = True
    step()
    assert torch.allclose(opt.state[p]["master_param"], torch.full((8,), 0.5 * 0.999))


def test_stochastic_rounding_switched_on_for_float16_is_refused():
    p = torch.ones(4, dtype=torch.float16, requires_grad=True)
    opt = fused_sched.AdamW([p])
    p.grad = torch.ones_like(p)
    opt.step()
    opt.param_groups[0]["stochastic_rounding"] = True
    with pytest.raises(ValueError, match="bfloat16"):
        opt.step()
    with pytest.raises(ValueError, match="SGD does not round stochastically"):
        fused_sched.SGD([torch.zeros(1, requires_grad=True)]).add_param_group(
            {"params": [torch.zeros(1, requires_grad=True)], "stochastic_rounding": True})


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
