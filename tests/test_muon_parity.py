"""fused_sched.Muon against torch.optim.Muon on the CPU backend: 20 steps within the bfloat16 rounding of the
orthogonalized update (float32 params), state_dicts both ways, schedules, GradScaler, fused clipping, flattened
convolution weights, launches that grow with shapes, validation, and a rejected step that changes nothing.

How close: the elementwise passes are torch's operations exactly (tests/muon_reference.py, the backend tests); the
batched Newton-Schulz runs torch's bfloat16 operations, but torch's CPU bmm / baddbmm round some entries of small
matrices differently from mm / addmm (the same rounding for 768 x 768). test_batched_newton_schulz_rounding measures
that: at most 10 bfloat16 ulps of the update's largest entry, in about 10% of the entries, for random inputs; the
bound below allows 16. The params then differ by at most 16 such ulps times the summed lr * ratio, and often not at
all (the 20-step cases here come out bit for bit; a two-layer model's Muon matrices differ by 1 ulp in 3 of 1024
entries)."""

from __future__ import annotations

import pytest
import torch

import fused_sched
from fused_sched.optim._muon_work import newton_schulz
from fused_sched.optim.muon import NS_COEFFICIENTS, adjusted_lr_ratio
from muon_reference import momentum_pass, update_pass

# Tall, wide and square matrices, two shapes held by several params (batched together), an odd narrow one.
SHAPES = [(64, 32), (32, 96), (48, 48), (64, 32), (96, 16), (64, 32), (3, 70)]
STEPS = 20


def _params(shapes=SHAPES, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dtype)) for s in shapes]


def _grads(shapes, steps, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(steps)]


def _train(opt, params, grads, scheduler=None, before_step=None):
    for step in grads:
        for p, g in zip(params, step, strict=True):
            p.grad = g.clone()
        if before_step is not None:
            before_step(params)
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _assert_equal(ours, ref):
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


#: bfloat16 ulps (at the update's largest entry) by which the batched Newton-Schulz may differ from torch's.
NS_ULPS = 16


def _assert_muon_close(ours, ref, lr_sum, adjust_lr_fn=None):
    """Params within NS_ULPS bfloat16 ulps of the orthogonalized update per unit of lr * ratio summed over the steps
    (lr_sum: the lrs summed); the entries of an orthogonalized matrix stay below 1, where an ulp is at most 2^-8."""
    for a, b in zip(ours, ref, strict=True):
        a, b = a.detach().reshape(a.shape[0], -1), b.detach().reshape(b.shape[0], -1)
        bound = NS_ULPS * 2.0**-8 * lr_sum * adjusted_lr_ratio(adjust_lr_fn, *a.shape)
        assert (a - b).abs().max().item() <= bound, ((a - b).abs().max().item(), bound)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw"])
@pytest.mark.parametrize("momentum,weight_decay", [(0.95, 0.1), (0.3, 0.0)])
def test_matches_torch_muon(nesterov, adjust_lr_fn, momentum, weight_decay):
    """momentum 0.3 takes the other branch of both lerps (weight < 0.5)."""
    kwargs = dict(lr=0.02, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    grads = _grads(SHAPES, STEPS)
    ref, ours = _params(), _params()
    ref[2].data = ref[2].data.t().contiguous().t()  # a transposed layout: the kernels walk memory, NS the matrix
    ours[2].data = ours[2].data.t().contiguous().t()
    _train(torch.optim.Muon(ref, **kwargs), ref, grads)
    opt = fused_sched.Muon(ours, **kwargs)
    _train(opt, ours, grads)
    _assert_muon_close(ours, ref, 0.02 * STEPS, adjust_lr_fn)
    # The momentum buffers too (float32, as torch's for float32 params).
    torch_opt = torch.optim.Muon(_params(), **kwargs)
    assert set(opt.state[ours[0]]) == {"momentum_buffer"}
    assert torch_opt.defaults.keys() <= opt.defaults.keys()


def test_spectral_unclamped_ratio():
    """torch 2.14's third adjust_lr_fn, sqrt(A / B) without the clamp at 1, accepted on every supported torch and
    compared with torch.optim.Muon on every one: where torch lacks it, the same update is torch's "original" with
    each matrix's lr scaled by sqrt(A / B) / sqrt(max(1, A / B)) and its weight decay by the inverse (lr * wd, the
    decay's factor, unchanged). The scale is below 1 only for wide matrices, which SHAPES holds."""
    grads = _grads(SHAPES, 4)
    ours = _params()
    _train(fused_sched.Muon(ours, lr=0.02, adjust_lr_fn="spectral_unclamped"), ours, grads)
    assert adjusted_lr_ratio("spectral_unclamped", 32, 96) == (32 / 96) ** 0.5
    ref = _params()
    try:
        torch_opt = torch.optim.Muon(ref, lr=0.02, adjust_lr_fn="spectral_unclamped")
    except ValueError:  # torch < 2.14
        groups = []
        for p in ref:
            rows, cols = p.shape
            scale = adjusted_lr_ratio("spectral_unclamped", rows, cols) / adjusted_lr_ratio("original", rows, cols)
            groups.append({"params": [p], "lr": 0.02 * scale, "weight_decay": 0.1 / scale})
        assert min(g["lr"] for g in groups) < 0.02
        torch_opt = torch.optim.Muon(groups, lr=0.02)
    _train(torch_opt, ref, grads)
    _assert_muon_close(ours, ref, 0.02 * 4, "spectral_unclamped")


def test_two_groups_with_their_own_settings():
    groups = lambda ps: [{"params": ps[:3], "ns_steps": 3, "lr": 0.05},  # noqa: E731
                         {"params": ps[3:], "ns_coefficients": (3.4, -4.7, 2.0), "eps": 1e-5, "nesterov": False}]
    grads = _grads(SHAPES, 8)
    ref, ours = _params(), _params()
    _train(torch.optim.Muon(groups(ref), lr=0.02), ref, grads)
    _train(fused_sched.Muon(groups(ours), lr=0.02), ours, grads)
    _assert_muon_close(ours, ref, 0.05 * 8)


def test_settings_changed_between_steps_apply_at_the_next_step():
    """ns_steps, ns_coefficients, adjust_lr_fn and eps are in no hyper row: the plan follows them anyway."""
    grads = _grads(SHAPES, 6)
    ref, ours = _params(), _params()
    torch_opt, opt = torch.optim.Muon(ref, lr=0.02), fused_sched.Muon(ours, lr=0.02)
    _train(torch_opt, ref, grads[:3])
    _train(opt, ours, grads[:3])
    for o in (torch_opt, opt):
        o.param_groups[0].update(ns_steps=2, ns_coefficients=(3.0, -4.0, 2.0), adjust_lr_fn="match_rms_adamw")
    _train(torch_opt, ref, grads[3:])
    _train(opt, ours, grads[3:])
    _assert_muon_close(ours, ref, 0.02 * 6, "match_rms_adamw")
    opt.param_groups[0]["ns_steps"] = 100
    for p, g in zip(ours, grads[0], strict=True):
        p.grad = g
    with pytest.raises(ValueError, match="less than 100"):
        opt.step()


def test_state_dict_loads_both_ways():
    grads = _grads(SHAPES, 6)
    kwargs = dict(lr=0.02, momentum=0.9)
    # fused -> torch
    ours, ref = _params(), _params()
    opt = fused_sched.Muon(ours, **kwargs)
    torch_opt = torch.optim.Muon(ref, **kwargs)
    _train(opt, ours, grads[:3])
    _train(torch_opt, ref, grads[:3])
    resumed = torch.optim.Muon([torch.nn.Parameter(p.detach().clone()) for p in ours], **kwargs)
    resumed.load_state_dict(opt.state_dict())
    continued = list(resumed.param_groups[0]["params"])
    _train(resumed, continued, grads[3:])
    _train(torch_opt, ref, grads[3:])
    _assert_muon_close(continued, ref, 0.02 * 6)
    # torch -> fused
    back = fused_sched.Muon([torch.nn.Parameter(p.detach().clone()) for p in continued], **kwargs)
    back.load_state_dict(resumed.state_dict())
    assert back.param_groups[0]["flatten"] is False  # filled in from the defaults
    mine = list(back.param_groups[0]["params"])
    _train(back, mine, grads[:2])
    _train(resumed, continued, grads[:2])
    _assert_muon_close(mine, continued, 0.02 * 8)


def test_cosine_schedule_on_the_device_matches_lambdalr():
    grads = _grads(SHAPES, STEPS)
    ref, ours = _params(), _params()
    torch_opt = torch.optim.Muon(ref, lr=0.02)
    opt = fused_sched.Muon(ours, lr=0.02)
    import math

    def factor(step, warmup=3, total=STEPS):  # transformers' get_cosine_schedule_with_warmup
        if step < warmup:
            return float(step) / float(max(1, warmup))
        progress = float(step - warmup) / float(max(1, total - warmup))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))

    _train(torch_opt, ref, grads, torch.optim.lr_scheduler.LambdaLR(torch_opt, factor))
    _train(opt, ours, grads, fused_sched.get_cosine_schedule_with_warmup(opt, 3, STEPS))
    _assert_muon_close(ours, ref, 0.02 * STEPS)
    assert opt._schedule is not None  # the lr came from the device program


def test_one_cycle_drives_lr_and_momentum():
    grads = _grads(SHAPES, 12)
    ref, ours = _params(), _params()
    torch_opt = torch.optim.Muon(ref, lr=0.02)
    opt = fused_sched.Muon(ours, lr=0.02)
    kw = dict(max_lr=0.05, total_steps=12, base_momentum=0.8, max_momentum=0.95)
    _train(torch_opt, ref, grads, torch.optim.lr_scheduler.OneCycleLR(torch_opt, **kw))
    _train(opt, ours, grads, fused_sched.lr_scheduler.OneCycleLR(opt, **kw))
    _assert_muon_close(ours, ref, 0.05 * 12)


def test_gradscaler_skips_and_unscales():
    ours, ref = _params(), _params()
    opt = fused_sched.Muon(ours, lr=0.02)
    torch_opt = torch.optim.Muon(ref, lr=0.02)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    scaler.scale(torch.ones(()))  # makes its scale, as scaling a loss would
    for step, grads in enumerate(_grads(SHAPES, 4)):
        for p, q, g in zip(ours, ref, grads, strict=True):
            p.grad = g * 2.0**8 if step != 1 else torch.full_like(g, float("inf"))
            q.grad = g.clone()
        before = [p.detach().clone() for p in ours]
        buffers = [opt.state[p]["momentum_buffer"].clone() for p in ours] if step else None
        scaler.step(opt)
        scaler.update()
        if step == 1:  # found_inf: nothing changed, torch's optimizer does not step either
            _assert_equal([p.detach() for p in ours], before)
            _assert_equal([opt.state[p]["momentum_buffer"] for p in ours], buffers)
            scaler.update(2.0**8)
            continue
        torch_opt.step()
    _assert_muon_close(ours, ref, 0.02 * 3)


def test_fused_clipping_matches_clip_grad_norm():
    grads = _grads(SHAPES, 5)
    ours, ref = _params(), _params()
    torch_opt = torch.optim.Muon(ref, lr=0.02)
    _train(torch_opt, ref, grads, before_step=lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1.0))
    _train(fused_sched.Muon(ours, lr=0.02, max_grad_norm=1.0), ours, grads)
    _assert_muon_close(ours, ref, 0.02 * 5)


def test_flatten_takes_convolutions_as_out_by_rest_matrices():
    shapes = [(8, 3, 3, 3), (16, 8, 1, 1), (8, 3, 3, 3)]
    grads = _grads(shapes, 6)
    ours = _params(shapes)
    ref = [torch.nn.Parameter(p.detach().reshape(p.shape[0], -1).clone()) for p in ours]
    with pytest.raises(ValueError, match="Muon only supports 2D parameters.*flatten=True"):
        fused_sched.Muon(ours)
    _train(fused_sched.Muon(ours, lr=0.02, flatten=True), ours, grads)
    _train(torch.optim.Muon(ref, lr=0.02), ref, [[g.reshape(g.shape[0], -1) for g in step] for step in grads])
    _assert_muon_close([p.detach().reshape(p.shape[0], -1) for p in ours], ref, 0.02 * 6)


def test_newton_schulz_runs_once_per_shape_not_per_tensor():
    shapes = [(32, 16)] * 12 + [(16, 48)] * 5
    params = _params(shapes)
    opt = fused_sched.Muon(params, lr=0.02, ns_steps=5)
    for p, g in zip(params, _grads(shapes, 1)[0], strict=True):
        p.grad = g
    opt.step()
    assert len(opt._plan.buckets) == 1 and len(opt._plan.buckets[0].extra.groups) == 2
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    counts = {e.key: e.count for e in prof.key_averages()}
    # Per shape group and iteration: one bmm (X X^T) and two baddbmm; the elementwise work: two passes.
    assert counts.get("aten::baddbmm") == 2 * 5 * 2
    assert counts.get("fused_sched::muon_step_") == 2
    assert "aten::addmm" not in counts and "aten::lerp_" not in counts


def test_batched_newton_schulz_rounding():
    """The batched iteration against torch's per-matrix one on the same bfloat16 inputs: equal but for bmm /
    baddbmm's rounding, measured (see the module docstring): at most 10 ulps of the largest entry, about 10% of the
    entries, on these 60 matrices."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    gen = torch.Generator().manual_seed(0)
    worst, differing, total = 0.0, 0, 0
    for shape in [(16, 64), (64, 16), (48, 48), (96, 40)]:
        for _ in range(5):
            x = torch.randn((3, *shape), generator=gen).bfloat16()
            ref = torch.stack([_zeropower_via_newtonschulz(m, NS_COEFFICIENTS, 5, 1e-7) for m in x])
            ours = newton_schulz(x, NS_COEFFICIENTS, 5, 1e-7)
            assert ours.dtype == torch.bfloat16 and ours.shape == ref.shape
            diff = (ours.float() - ref.float()).abs()
            ulp = 2.0 ** (torch.floor(torch.log2(ref.float().abs().amax())).item() - 7)
            worst = max(worst, diff.max().item() / ulp)
            differing += int((diff > 0).sum())
            total += diff.numel()
    assert worst <= NS_ULPS
    assert differing <= 0.25 * total


def test_closure_zero_grad_and_low_precision_params():
    params = _params(dtype=torch.bfloat16)
    opt = fused_sched.Muon(params, lr=0.02)
    calls = []

    def closure():
        calls.append(1)
        for p, g in zip(params, _grads(SHAPES, 1, dtype=torch.bfloat16)[0], strict=True):
            p.grad = g
        return torch.tensor(1.5)

    before = [p.detach().clone() for p in params]
    assert opt.step(closure).item() == 1.5 and calls == [1]
    assert all(not torch.equal(a, b) for a, b in zip(params, before, strict=True))
    assert opt.state[params[0]]["momentum_buffer"].dtype == torch.float32
    opt.zero_grad()
    assert all(p.grad is None for p in params)


def test_low_precision_params_follow_the_float32_mirror():
    """A bfloat16 param: float32 arithmetic (torch would run bfloat16 arithmetic), rounded once; the orthogonalized
    update is what the reference computes from the same bfloat16 update."""
    (p,) = _params([(40, 24)], dtype=torch.bfloat16)
    (g,) = _grads([(40, 24)], 1, dtype=torch.bfloat16)[0]
    p.grad = g.clone()
    start = p.detach().clone()
    fused_sched.Muon([p], lr=0.02, weight_decay=0.1).step()
    _, _, update = momentum_pass(g, torch.zeros(40, 24), 0.95, True)
    o = newton_schulz(update.unsqueeze(0), NS_COEFFICIENTS, 5, 1e-7)[0]
    expected = update_pass(start, o, 0.02, 0.1, (40 / 24) ** 0.5)
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,message", [
    ({"lr": -1.0}, "Learning rate should be >= 0 but is: -1.0"),
    ({"momentum": -0.1}, "momentum should be >= 0 but is: -0.1"),
    ({"weight_decay": -0.1}, "weight decay should be >= 0 but is: -0.1"),
    ({"adjust_lr_fn": "other"}, "Adjust learning rate function other is not supported"),
    ({"ns_steps": 100}, "Number of steps must be less than 100"),
    ({"ns_coefficients": (1.0, 2.0)}, "Coefficients must be a tuple of exactly 3 values"),
    ({"lr": torch.tensor([0.1, 0.2])}, "Tensor lr must be 1-element"),
    ({"flatten": 1}, "flatten must be a bool"),
])
def test_validation_in_torchs_words(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        fused_sched.Muon(_params(), **kwargs)
    opt = fused_sched.Muon(_params())
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        opt.add_param_group({"params": _params(seed=3), **kwargs})
    assert len(opt.param_groups) == 1


def test_rejected_step_changes_nothing():
    params = _params()
    complex_param = torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.complex64))
    opt = fused_sched.Muon([{"params": params}, {"params": [complex_param]}], lr=0.02)
    _train(opt, params, _grads(SHAPES, 2))
    saved = [p.detach().clone() for p in params]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in params]
    for p, g in zip(params, _grads(SHAPES, 1, seed=5)[0], strict=True):
        p.grad = g
    complex_param.grad = torch.ones_like(complex_param)  # checked after every other param: still nothing written
    with pytest.raises(RuntimeError, match="Muon does not support complex parameters"):
        opt.step()
    _assert_equal([p.detach() for p in params], saved)
    _assert_equal([opt.state[p]["momentum_buffer"] for p in params], buffers)
    assert complex_param not in opt.state


def test_compiled_step_runs_the_eager_one():
    """torch.compile of a function calling opt.step(): Muon's step runs eagerly inside it (one graph break) and gives
    the eager bits."""
    compiled_params, eager_params = _params(), _params()
    compiled_opt, eager_opt = fused_sched.Muon(compiled_params, lr=0.02), fused_sched.Muon(eager_params, lr=0.02)
    step = torch.compile(compiled_opt.step)
    for grads in _grads(SHAPES, 3):
        for p, q, g in zip(compiled_params, eager_params, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        step()
        eager_opt.step()
    _assert_equal(compiled_params, eager_params)
