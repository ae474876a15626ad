"""bfloat16 moments (state_dtype=torch.bfloat16) of Adam / AdamW and bfloat16 momentum buffers of SGD: float32 math,
stochastic rounding of the states by default."""

from __future__ import annotations

import pytest
import torch

import fused_sched
from fused_sched.optim import state_format as sf
from large_model_cases import BACKENDS
from state_format_reference import adam_step64, sgd_step64


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


#: (optimizer of one param with a bfloat16 state, the state's key, zero gradients before the ones): a moment /
#: buffer m that a constant gradient 1 moves by 0.001 * (1 - m) per step, to 1 - 0.999^t after t steps. SGD: momentum
#: 0.999 with dampening 0.999, after a first gradient 0 (its fresh buffer takes the gradient as it is).
SMALL_UPDATES = {
    "adamw": (lambda p, rounding: fused_sched.AdamW([p], lr=0.0, betas=(0.999, 0.999), weight_decay=0.0,
                                                    state_dtype=torch.bfloat16, state_rounding=rounding),
              "exp_avg", 0),
    "sgd": (lambda p, rounding: fused_sched.SGD([p], lr=0.0, momentum=0.999, dampening=0.999,
                                                state_dtype=torch.bfloat16, state_rounding=rounding),
            "momentum_buffer", 1),
}


@pytest.mark.parametrize("name", sorted(SMALL_UPDATES))
def test_stochastic_rounding_keeps_small_updates(name):
    """In bfloat16 with round to nearest the increments 0.001 * (1 - m) fall below half a spacing once m passes 0.5
    and are lost (the known failure of bf16 states); stochastic rounding keeps them on average."""
    make, key, zeros = SMALL_UPDATES[name]
    results = {}
    for rounding in ("stochastic", "nearest"):
        p = torch.zeros(4096, requires_grad=True)
        opt = make(p, rounding)
        for step in range(zeros + 1500):
            p.grad = torch.zeros_like(p) if step < zeros else torch.ones_like(p)
            opt.step()
        results[rounding] = opt.state[p][key].float().mean().item()
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


# -- SGD: a bfloat16 momentum buffer --

@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_buffer_is_the_float64_update_rounded_once(backend, device, rounding, nesterov):
    """From the optimizer's own bf16 buffer, each step's buffer is the float64 update within one bfloat16 spacing
    (stochastic) or half of one (nearest), and the param moves by the unrounded float32 buffer."""
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(3000, generator=gen).to(device).requires_grad_(True)
    opt = fused_sched.SGD([p], lr=1e-2, momentum=0.9, dampening=0.0 if nesterov else 0.1, weight_decay=0.01,
                          nesterov=nesterov, state_dtype=torch.bfloat16, state_rounding=rounding, backend=backend)
    for step in range(1, 4):
        p.grad = torch.randn(3000, generator=gen).to(device)
        state = opt.state[p]
        buf0 = state["momentum_buffer"].double().cpu() if state else torch.zeros(3000, dtype=torch.float64)
        p0 = p.detach().cpu().clone()
        opt.step()
        state = opt.state[p]
        assert state["momentum_buffer"].dtype == torch.bfloat16
        assert ("step" in state) == (rounding == "stochastic")
        if rounding == "stochastic":
            assert state["step"].item() == step
        p_ref, buf_ref = sgd_step64(p0, p.grad.cpu(), buf0, 1e-2, 0.9, 0.0 if nesterov else 0.1, 0.01, nesterov,
                                    fresh=step == 1)
        got = state["momentum_buffer"].double().cpu()
        # The rounding to bfloat16, plus the float32 arithmetic before it: a few float32 ulps of the operands, which
        # may nearly cancel (0.9 * buf and the gradient), so counted on their magnitudes, not the result's.
        operands = 0.9 * buf0.abs() + p.grad.double().cpu().abs() + 0.01 * p0.double().abs()
        bound = _ulp_bf16(buf_ref) * (1.0 if rounding == "stochastic" else 0.5) + 4 * 2.0 ** -24 * operands
        assert bool(((got - buf_ref).abs() <= bound).all())
        # float32 math on float32 values of magnitude ~3: a few float32 ulps
        torch.testing.assert_close(p.detach().double().cpu(), p_ref, rtol=0, atol=4e-6)


def test_sgd_stochastic_bits_follow_the_seed_step_and_param():
    """The CPU kernel's buffer equals the mirror's rounding of the same float32 values under the key of (seed,
    step after its increment, param index); a found_inf step advances no step."""
    p, q = torch.zeros(1000, requires_grad=True), torch.zeros(700, requires_grad=True)
    opt = fused_sched.SGD([p, q], lr=0.0, momentum=0.9, state_dtype=torch.bfloat16, rounding_seed=77)
    gen = torch.Generator().manual_seed(3)
    g = [torch.randn(1000, generator=gen), torch.randn(700, generator=gen)]
    p.grad, q.grad = g[0].clone(), g[1].clone()
    opt.step()  # the fresh buffers are the gradients
    for i, t in enumerate((p, q)):
        expect = sf.bf16_stochastic(g[i], sf.state_key(sf.rounding_key(77, 1, i), 0))
        assert torch.equal(opt.state[t]["momentum_buffer"].view(torch.int16), expect.view(torch.int16))
    before = {t: opt.state[t]["momentum_buffer"].clone() for t in (p, q)}
    opt.grad_scale, opt.found_inf = torch.ones(1), torch.ones(1)  # as torch.amp.GradScaler hands them over
    opt.step()
    del opt.grad_scale, opt.found_inf
    for t in (p, q):
        assert opt.state[t]["step"].item() == 1.0
        assert torch.equal(opt.state[t]["momentum_buffer"], before[t])
    p.grad, q.grad = torch.randn(1000, generator=gen), torch.randn(700, generator=gen)
    opt.step()
    for i, t in enumerate((p, q)):
        wide = before[t].float() * 0.9 + t.grad  # fma(g, 1 - 0, buf * 0.9): the product rounded, then the sum
        expect = sf.bf16_stochastic(wide, sf.state_key(sf.rounding_key(77, 2, i), 0))
        assert torch.equal(opt.state[t]["momentum_buffer"].view(torch.int16), expect.view(torch.int16))


def test_sgd_state_dict_round_trips_with_torch():
    """A torch.optim.SGD state_dict loads (the buffer rounded to bfloat16, a step created at the next step), the
    optimizer's own state_dict resumes bit for bit, and to_torch_state_dict gives torch.optim.SGD the widened
    buffer without the step."""
    gen = torch.Generator().manual_seed(5)
    p = torch.randn(500, generator=gen, requires_grad=True)
    ref = torch.optim.SGD([p], lr=1e-2, momentum=0.9)
    p.grad = torch.randn(500, generator=gen)
    ref.step()
    q = p.detach().clone().requires_grad_(True)
    opt = fused_sched.SGD([q], lr=1e-2, momentum=0.9, state_dtype=torch.bfloat16, rounding_seed=3)
    opt.load_state_dict(ref.state_dict())
    grads = [torch.randn(500, generator=gen) for _ in range(4)]
    q.grad = grads[0].clone()
    opt.step()
    assert opt.state[q]["momentum_buffer"].dtype == torch.bfloat16 and opt.state[q]["step"].item() == 1.0
    # resume: a copy of the optimizer from its state_dict takes the same steps to the bit
    r = q.detach().clone().requires_grad_(True)
    again = fused_sched.SGD([r], lr=1e-2, momentum=0.9, state_dtype=torch.bfloat16, rounding_seed=3)
    again.load_state_dict(opt.state_dict())
    for g in grads[1:]:
        q.grad, r.grad = g.clone(), g.clone()
        opt.step()
        again.step()
    assert torch.equal(q, r)
    for key in ("momentum_buffer", "step"):
        assert torch.equal(opt.state[q][key], again.state[r][key])
    back = torch.optim.SGD([p], lr=1e-2, momentum=0.9)
    back.load_state_dict(fused_sched.to_torch_state_dict(opt.state_dict()))
    assert set(back.state[p]) == {"momentum_buffer"}
    assert back.state[p]["momentum_buffer"].dtype == torch.float32
    assert torch.equal(back.state[p]["momentum_buffer"], opt.state[q]["momentum_buffer"].float())


@pytest.mark.parametrize("kwargs,match", [
    ({"state_dtype": torch.float16}, "state_dtype must be"),
    ({"state_rounding": "up"}, "state_rounding must be"),
    ({"rounding_seed": -1}, "rounding_seed must be"),
])
def test_sgd_state_options_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fused_sched.SGD([torch.zeros(2, requires_grad=True)], momentum=0.9, **kwargs)


def test_sgd_state_bytes_per_parameter():
    """Measured from the state tensors, the step included: a bfloat16 buffer takes half of float32's 4 bytes."""
    p = torch.zeros(1 << 20, requires_grad=True)
    opt = fused_sched.SGD([p], momentum=0.9, state_dtype=torch.bfloat16)
    p.grad = torch.ones_like(p)
    opt.step()
    total = sum(v.numel() * v.element_size() for v in opt.state[p].values() if isinstance(v, torch.Tensor))
    assert total == 2 * p.numel() + 4  # the bfloat16 buffer and the float32 step


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_sgd_rounding_switched_to_stochastic_between_steps(backend, device):
    """A group switched from nearest to stochastic rounding gets its step at the next step, whose bits are keyed on
    step 1, then 2: never the same bits twice."""
    p = torch.zeros(1000, device=device, requires_grad=True)
    opt = fused_sched.SGD([p], lr=0.0, momentum=0.9, state_dtype=torch.bfloat16, state_rounding="nearest",
                          rounding_seed=9, backend=backend)
    gen = torch.Generator().manual_seed(4)
    for _ in range(2):
        p.grad = torch.randn(1000, generator=gen).to(device)
        opt.step()
    assert "step" not in opt.state[p]
    opt.param_groups[0]["state_rounding"] = "stochastic"
    for step in (1, 2):
        buf = opt.state[p]["momentum_buffer"].float().cpu()
        g = torch.randn(1000, generator=gen)
        p.grad = g.to(device)
        opt.step()
        assert opt.state[p]["step"].item() == step
        expect = sf.bf16_stochastic(buf * 0.9 + g, sf.state_key(sf.rounding_key(9, step, 0), 0))
        assert torch.equal(opt.state[p]["momentum_buffer"].cpu().view(torch.int16), expect.view(torch.int16))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_sgd_without_momentum_keeps_no_buffer_and_no_step(backend, device):
    """state_dtype=torch.bfloat16 with momentum 0: no buffer to round, no step; the update is torch's."""
    gen = torch.Generator().manual_seed(6)
    p = torch.randn(700, generator=gen).to(device).requires_grad_(True)
    q = p.detach().cpu().clone().requires_grad_(True)
    opt = fused_sched.SGD([p], lr=0.1, weight_decay=0.01, state_dtype=torch.bfloat16, backend=backend)
    ref = torch.optim.SGD([q], lr=0.1, weight_decay=0.01)
    for _ in range(2):
        g = torch.randn(700, generator=gen)
        p.grad, q.grad = g.to(device), g.clone()
        opt.step()
        ref.step()
    assert "step" not in opt.state[p] and "momentum_buffer" not in opt.state[p]
    torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=0, atol=1e-7)
