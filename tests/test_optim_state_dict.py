"""state_dicts are interchangeable with torch.optim: saved by one, loaded by the other, same trajectory."""

import io

import pytest
import torch

import fused_sched
from optim_reference import FUSED, TORCH, clone_leaves, compare, draw_grads, grouped, make_params, set_grads

CASES = [
    ("AdamW", {"lr": 1e-2, "weight_decay": 0.1}, [{}, {"lr": 3e-3, "amsgrad": True}]),
    ("Adam", {"lr": 1e-2, "weight_decay": 0.1}, [{"maximize": True}, {}]),
    ("SGD", {"lr": 1e-2, "momentum": 0.9}, [{}, {"nesterov": True, "momentum": 0.5}]),
    ("SGD", {"lr": 1e-2}, [{}]),
]


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _run(opt, params, grads_per_step):
    for grads in grads_per_step:
        set_grads(params, grads)
        opt.step()


@pytest.mark.parametrize("direction", ["fused_to_torch", "torch_to_fused"])
@pytest.mark.parametrize("name,defaults,groups", CASES, ids=lambda c: str(c))
def test_state_dict_loads_across_and_continues_the_trajectory(name, defaults, groups, direction):
    base = make_params()
    first = [draw_grads(base, s) for s in range(10)]
    second = [draw_grads(base, s) for s in range(10, 20)]
    src_cls, dst_cls = (FUSED[name], TORCH[name]) if direction == "fused_to_torch" else (TORCH[name], FUSED[name])
    kw = {"backend": "cpu"}

    # the source runs 10 steps, its state_dict goes through torch.save / torch.load into a new optimizer of the
    # other library, and both continue for 10 more steps
    src_params = clone_leaves(base)
    src = src_cls(grouped(src_params, groups), **defaults, **(kw if src_cls is FUSED[name] else {}))
    _run(src, src_params, first)
    saved = _roundtrip(src.state_dict())
    dst_params = [p.detach().clone().requires_grad_(True) for p in src_params]
    dst = dst_cls(grouped(dst_params, groups), **defaults, **(kw if dst_cls is FUSED[name] else {}))
    dst.load_state_dict(saved)
    _run(src, src_params, second)
    _run(dst, dst_params, second)
    fused, ref = (src, dst) if direction == "fused_to_torch" else (dst, src)
    fused_p, ref_p = (src_params, dst_params) if direction == "fused_to_torch" else (dst_params, src_params)
    compare(fused, ref, fused_p, ref_p)


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_state_dict_has_torchs_layout(name):
    kwargs = {"momentum": 0.9} if name == "SGD" else {"amsgrad": True}
    ours_p, theirs_p = clone_leaves(make_params()), clone_leaves(make_params())
    ours, theirs = FUSED[name](ours_p, **kwargs), TORCH[name](theirs_p, **kwargs)
    grads = draw_grads(ours_p, 0)
    set_grads(ours_p, grads)
    set_grads(theirs_p, grads)
    ours.step()
    theirs.step()
    a, b = ours.state_dict(), theirs.state_dict()
    # torch's keys, plus fused_sched's own group options (which torch ignores when it loads them).
    extra = ({"master_weights", "stochastic_rounding", "state_dtype", "state_rounding"} if name == "AdamW"
             else {"master_weights", "state_dtype", "state_rounding"})
    assert [set(g) for g in a["param_groups"]] == [set(g) | extra for g in b["param_groups"]]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert set(a["state"][k]) == set(b["state"][k])
        if "step" in a["state"][k]:
            assert a["state"][k]["step"].dtype == torch.float32 and a["state"][k]["step"].dim() == 0


def test_loading_torchs_state_dict_keeps_fused_sched_options():
    """torch's param groups lack master_weights / stochastic_rounding: loading them keeps the constructor's."""
    ours_p, theirs_p = clone_leaves(make_params()), clone_leaves(make_params())
    theirs = torch.optim.AdamW(theirs_p)
    ours = fused_sched.AdamW(ours_p, stochastic_rounding=True)
    ours.load_state_dict(theirs.state_dict())
    assert all(g["stochastic_rounding"] and not g["master_weights"] for g in ours.param_groups)


def test_bf16_params_keep_float32_states_through_load():
    p = torch.nn.Parameter(torch.randn(10).bfloat16())
    opt = FUSED["AdamW"]([p])
    p.grad = torch.randn(10).bfloat16()
    opt.step()
    saved = _roundtrip(opt.state_dict())
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = FUSED["AdamW"]([q])
    opt2.load_state_dict(saved)
    assert opt2.state[q]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt2.state[q]["exp_avg"], opt.state[p]["exp_avg"])


def test_loaded_state_is_a_copy():
    p = torch.nn.Parameter(torch.randn(5))
    opt = FUSED["AdamW"]([p])
    p.grad = torch.randn(5)
    opt.step()
    sd = opt.state_dict()
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = FUSED["AdamW"]([q])
    opt2.load_state_dict(sd)
    before = opt.state[p]["exp_avg"].clone()
    q.grad = torch.randn(5)
    opt2.step()
    assert torch.equal(opt.state[p]["exp_avg"], before)
