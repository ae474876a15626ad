"""bfloat16 moments (state_dtype=torch.bfloat16): float32 math, stochastic rounding of the states by default."""

from __future__ import annotations

import pytest
import torch

import fused_sched
from fused_sched.optim import state_format as sf
from large_model_cases import BACKENDS
from state_format_reference import adam_step64


def _ulp_bf16(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 values at |x| (float64)."""
    e = torch.floor(torch.log2(x.abs().clamp_min(2.0 ** -126)))
    return torch.pow(2.0, e - 7)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_states_are_the_float64_update_rounded_once(backend, device, rounding):
    """From the optimizer's own bf16 state, each step's moments are the float64 update within one bfloat16 spacing
    (stochastic: either neighbour; nearest: the nearest one, so within half a spacing plus float32 error)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(3000, generator=gen).to(device).requires_grad_(True)
    opt = fused_sched.AdamW([p], lr=1e-2, weight_decay=0.1, state_dtype=torch.bfloat16, state_rounding=rounding,
                            backend=backend)
    for step in range(1, 4):
        p.grad = torch.randn(3000, generator=gen).to(device)
        state = opt.state[p]
        m0 = state["exp_avg"].double().cpu() if state else torch.zeros(3000, dtype=torch.float64)
        v0 = state["exp_avg_sq"].double().cpu() if state else torch.zeros(3000, dtype=torch.float64)
        p0 = p.detach().cpu().clone()
        opt.step()
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
        _, m_ref, v_ref = adam_step64(p0, p.grad.cpu(), m0, v0, step, 1e-2, 0.9, 0.999, 1e-8, 0.1)
        for key, ref in (("exp_avg", m_ref), ("exp_avg_sq", v_ref)):
            got = opt.state[p][key].double().cpu()
            bound = _ulp_bf16(ref) * (1.0 if rounding == "stochastic" else 0.5) * (1 + 1e-5)
            assert bool(((got - ref).abs() <= bound).all()), key


def test_stochastic_rounding_keeps_small_updates():
    """exp_avg of a constant gradient 1 with beta1 = 0.999 approaches 1 - 0.999^t. In bfloat16 with round to
    nearest the increments 0.001 * (1 - m) fall below half a spacing once m passes 0.5 and are lost (the known
    failure of bf16 states); stochastic rounding keeps them on average."""
    results = {}
    for rounding in ("stochastic", "nearest"):
        p = torch.zeros(4096, requires_grad=True)
        opt = fused_sched.AdamW([p], lr=0.0, betas=(0.999, 0.999), weight_decay=0.0, state_dtype=torch.bfloat16,
                                state_rounding=rounding)
        for _ in range(1500):
            p.grad = torch.ones_like(p)
            opt.step()
        results[rounding] = opt.state[p]["exp_avg"].float().mean().item()
    exact = 1 - 0.999 ** 1500
    assert abs(results["stochastic"] - exact) < 0.01 * exact
    assert results["nearest"] < exact - 0.1  # stuck


def test_stochastic_bits_follow_the_seed_and_state():
    """The bits of a state's rounding depend on (seed, step, param index, state): the CPU kernel's states equal
    the mirror's rounding of the same float32 values."""
    p = torch.zeros(1000, requires_grad=True)
    opt = fused_sched.AdamW([p], lr=0.0, weight_decay=0.0, state_dtype=torch.bfloat16, rounding_seed=123)
    gen = torch.Generator().manual_seed(3)
    p.grad = torch.randn(1000, generator=gen)
    opt.step()
    m = (1 - 0.9) * p.grad  # torch's lerp from 0 with weight 0.1: fma(0.1, g - 0, 0)
    expect = sf.bf16_stochastic(m, sf.state_key(sf.rounding_key(123, 1, 0), 0))
    assert torch.equal(opt.state[p]["exp_avg"].view(torch.int16), expect.view(torch.int16))


def test_float32_states_load_into_bfloat16_and_back():
    p = torch.randn(500, requires_grad=True)
    ref = torch.optim.AdamW([p], lr=1e-2)
    p.grad = torch.randn(500)
    ref.step()
    q = p.detach().clone().requires_grad_(True)
    opt = fused_sched.AdamW([q], lr=1e-2, state_dtype=torch.bfloat16)
    opt.load_state_dict(ref.state_dict())
    q.grad = torch.randn(500)
    opt.step()
    assert opt.state[q]["exp_avg"].dtype == torch.bfloat16
    back = torch.optim.AdamW([p], lr=1e-2)
    back.load_state_dict(fused_sched.to_torch_state_dict(opt.state_dict()))
    assert back.state[p]["exp_avg"].dtype == torch.float32
    assert torch.equal(back.state[p]["exp_avg"], opt.state[q]["exp_avg"].float())
