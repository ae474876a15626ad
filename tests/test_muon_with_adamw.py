"""fused_sched.MuonWithAdamW and muon_param_groups: one optimizer and one scheduler against torch.optim.Muon +
torch.optim.AdamW with a scheduler each; the split of a model; state_dict resume; fused clipping over both parts."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fused_sched
from fused_sched.optim.muon import adjusted_lr_ratio
from optim_reference import ATOL
from test_muon_parity import NS_ULPS

STEPS = 12


class TinyGPT(nn.Module):
    def __init__(self, vocab=50, width=16, tied=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": nn.LayerNorm(width), "up": nn.Linear(width, 4 * width),
                           "down": nn.Linear(4 * width, width)}) for _ in range(2))
        self.lm_head = nn.Linear(width, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight


def _model(seed=0, tied=False):
    torch.manual_seed(seed)
    return TinyGPT(tied=tied)


def test_muon_param_groups_makes_the_usual_split():
    model = _model()
    muon, adamw = fused_sched.muon_param_groups(model)
    assert muon["use_muon"] and not adamw["use_muon"]
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in muon["params"]) == sorted(
        f"blocks.{i}.{m}.weight" for i in range(2) for m in ("up", "down"))
    assert {names[id(p)] for p in adamw["params"]} >= {"embed.weight", "lm_head.weight", "blocks.0.norm.weight",
                                                        "blocks.1.up.bias"}
    tied = _model(tied=True)
    groups = fused_sched.muon_param_groups(tied)
    assert sum(len(g["params"]) for g in groups) == len(list(tied.parameters()))
    assert all(p is not tied.embed.weight for p in groups[0]["params"])


def _grads(model, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen) for p in model.parameters()] for _ in range(steps)]


def _factor(step, warmup=3, total=STEPS):
    """transformers' get_cosine_schedule_with_warmup."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def _torch_pair(model, muon_lr=0.02, adamw_lr=3e-3):
    muon, adamw = fused_sched.muon_param_groups(model)
    opt_m = torch.optim.Muon(muon["params"], lr=muon_lr, weight_decay=0.1)
    opt_a = torch.optim.AdamW(adamw["params"], lr=adamw_lr, weight_decay=0.01, foreach=False)
    return opt_m, opt_a


def _fused(model, **kwargs):
    return fused_sched.MuonWithAdamW(fused_sched.muon_param_groups(model), lr=0.02, weight_decay=0.1,
                                     adamw_lr=3e-3, adamw_weight_decay=0.01, **kwargs)


def _set_grads(model, grads):
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g.clone()


def _compare(ours, ref, lr_sum):
    """Muon's params within the batched Newton-Schulz's bfloat16 rounding (test_muon_parity.py NS_ULPS; lr_sum: the
    Muon lrs summed over the steps), AdamW's to the project's float32 tolerance (tests/optim_reference.py ATOL:
    fused_sched.AdamW's parity with torch's for-loop AdamW). The gradients are given, not computed, so the two parts
    do not feed each other's differences."""
    muon_ids = {id(p) for p in fused_sched.muon_param_groups(ours)[0]["params"]}
    for (name, a), b in zip(ours.named_parameters(), ref.parameters(), strict=True):
        if id(a) in muon_ids:
            bound = NS_ULPS * 2.0**-8 * lr_sum * adjusted_lr_ratio(None, *a.shape)
            assert (a - b).abs().max().item() <= bound, (name, (a - b).abs().max().item(), bound)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=ATOL, msg=lambda m, name=name: f"{name}: {m}")


def test_one_optimizer_one_schedule_matches_torch_muon_plus_adamw():
    ours, ref = _model(), _model()
    opt_m, opt_a = _torch_pair(ref)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, _factor) for o in (opt_m, opt_a)]
    opt = _fused(ours)
    sched = fused_sched.get_cosine_schedule_with_warmup(opt, 3, STEPS)
    for grads in _grads(ours, STEPS):
        _set_grads(ours, grads)
        _set_grads(ref, grads)
        opt.step()
        sched.step()
        opt_m.step()
        opt_a.step()
        for s in scheds:
            s.step()
    _compare(ours, ref, 0.02 * STEPS)
    assert sorted(b.family for b in opt._plan.buckets) == ["adam", "muon"]
    muon_param = ours.blocks[0].up.weight
    adam_param = ours.embed.weight
    assert set(opt.state[muon_param]) == {"momentum_buffer"}
    assert set(opt.state[adam_param]) == {"step", "exp_avg", "exp_avg_sq"}


def test_torch_schedulers_work_unchanged():
    ours, ref = _model(), _model()
    opt_m, opt_a = _torch_pair(ref)
    kw = dict(step_size=4, gamma=0.5)
    scheds = [torch.optim.lr_scheduler.StepLR(o, **kw) for o in (opt_m, opt_a)]
    opt = _fused(ours)
    sched = fused_sched.lr_scheduler.StepLR(opt, **kw)
    for grads in _grads(ours, STEPS):
        _set_grads(ours, grads)
        _set_grads(ref, grads)
        for o in (opt, opt_m, opt_a):
            o.step()
        for s in (sched, *scheds):
            s.step()
    _compare(ours, ref, 0.02 * STEPS)
    with pytest.raises(ValueError, match="cycle_momentum=False"):
        fused_sched.lr_scheduler.OneCycleLR(_fused(_model()), max_lr=0.05, total_steps=10)


def test_fused_clipping_covers_both_parts():
    ours, ref = _model(), _model()
    opt_m, opt_a = _torch_pair(ref)
    opt = _fused(ours, max_grad_norm=0.5)
    for grads in _grads(ours, 4):
        _set_grads(ours, grads)
        _set_grads(ref, grads)
        opt.step()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt_m.step()
        opt_a.step()
    _compare(ours, ref, 0.02 * 4)


def test_state_dict_resume_equals_uninterrupted_run():
    grads = _grads(_model(), 6)
    whole, first = _model(), _model()
    opt_whole, opt_first = _fused(whole), _fused(first)
    for g in grads:
        _set_grads(whole, g)
        opt_whole.step()
    for g in grads[:3]:
        _set_grads(first, g)
        opt_first.step()
    resumed = _model()
    resumed.load_state_dict(first.state_dict())
    opt_resumed = _fused(resumed)
    opt_resumed.load_state_dict(opt_first.state_dict())
    for g in grads[3:]:
        _set_grads(resumed, g)
        opt_resumed.step()
    for a, b in zip(resumed.parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_groups_must_say_which_part():
    model = _model()
    with pytest.raises(ValueError, match="use_muon=True"):
        fused_sched.MuonWithAdamW(model.parameters())
    with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
        fused_sched.MuonWithAdamW([{"params": list(model.parameters()), "use_muon": True}])
    with pytest.raises(ValueError, match="Invalid beta parameter"):
        fused_sched.MuonWithAdamW(fused_sched.muon_param_groups(model), adamw_betas=(1.5, 0.9))
    opt = fused_sched.MuonWithAdamW(fused_sched.muon_param_groups(model), adamw_betas=(0.8, 0.9))
    adam_group = opt.param_groups[1]
    assert adam_group["betas"] == (0.8, 0.9) and adam_group["eps"] == 1e-8 and adam_group["weight_decay"] == 0.01
    assert opt.param_groups[0]["eps"] == 1e-7 and opt.param_groups[0]["weight_decay"] == 0.1
