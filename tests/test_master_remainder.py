"""master_weights="remainder": bfloat16 parameters whose 16 low master bits live in the state (int16): the float32
master bit for bit that of master_weights=True, the parameters equal except at exact rounding ties."""

from __future__ import annotations

import pytest
import torch

import fused_sched
from fused_sched.optim import state_format as sf
from large_model_cases import BACKENDS


def test_split_and_join_are_exact():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(100000, generator=gen) * torch.logspace(-30, 30, 100000)
    x[:6] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.3895e38, 1e-40])
    param, rem = sf.split_remainder(x)
    assert torch.equal(sf.join_remainder(param, rem).view(torch.int32), x.view(torch.int32))
    rne = x.to(torch.bfloat16)
    differ = param.view(torch.int16) != rne.view(torch.int16)
    low = x.view(torch.int32) & 0xFFFF
    assert bool((low[differ] == 0x8000).all())  # only at exact ties
    nan = sf.split_remainder(torch.tensor([float("nan")]))
    assert nan[0].isnan().all() and nan[1].item() == 0


def _loop(name, backend, device, master, steps=8, **kwargs):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(device=device, dtype=torch.bfloat16).requires_grad_(True)
              for s in [(3000,), (7, 11), (1,)]]
    opt = getattr(fused_sched, name)(params, lr=1e-3, master_weights=master, backend=backend, **kwargs)
    history = []
    for step in range(steps):
        g = torch.Generator().manual_seed(50 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(device=device, dtype=torch.bfloat16)
        opt.step()
        history.append([(p.detach().clone(), _master(opt, p)) for p in params])
    return history


def _master(opt, p):
    state = opt.state[p]
    if sf.REMAINDER_KEY in state:
        return sf.join_remainder(p.detach(), state[sf.REMAINDER_KEY])
    return state["master_param"].clone()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name,kwargs", [("AdamW", {"weight_decay": 0.1}),
                                          ("SGD", {"momentum": 0.9, "weight_decay": 1e-3}),
                                          ("AdamW8bit", {"min_8bit_size": 1000})])
def test_masters_bit_identical_to_float32_copies(backend, device, name, kwargs):
    ours = _loop(name, backend, device, "remainder", **kwargs)
    ref = _loop(name, backend, device, True, **kwargs)
    for step_ours, step_ref in zip(ours, ref, strict=True):
        for (p, m), (p_ref, m_ref) in zip(step_ours, step_ref, strict=True):
            assert torch.equal(m.view(torch.int32), m_ref.view(torch.int32))
            differ = p.view(torch.int16) != p_ref.view(torch.int16)
            low = m_ref.view(torch.int32) & 0xFFFF
            assert bool((low[differ] == 0x8000).all()), "params differ away from a tie"


def test_switching_between_copy_and_remainder_keeps_the_master():
    p = torch.randn(1000).bfloat16().requires_grad_(True)
    opt = fused_sched.AdamW([p], lr=1e-3, master_weights=True)
    p.grad = torch.randn(1000).bfloat16()
    opt.step()
    master = opt.state[p]["master_param"].clone()
    opt.param_groups[0]["master_weights"] = "remainder"
    p.grad = torch.zeros(1000).bfloat16()
    opt.param_groups[0]["lr"] = 0.0
    opt.param_groups[0]["weight_decay"] = 0.0
    opt.step()
    assert "master_param" not in opt.state[p]
    assert torch.equal(sf.join_remainder(p.detach(), opt.state[p][sf.REMAINDER_KEY]).view(torch.int32),
                       master.view(torch.int32))
    opt.param_groups[0]["master_weights"] = True
    opt.step()
    assert torch.equal(opt.state[p]["master_param"].view(torch.int32), master.view(torch.int32))


def test_float16_parameters_are_refused_untouched():
    p = torch.randn(10).half().requires_grad_(True)
    opt = fused_sched.AdamW([p], master_weights="remainder")
    p.grad = torch.ones_like(p)
    value = p.detach().clone()
    with pytest.raises(ValueError, match="bfloat16"):
        opt.step()
    assert torch.equal(p, value) and not opt.state[p]
