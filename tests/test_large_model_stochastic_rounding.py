"""Stochastic rounding of bfloat16 parameters: unbiased, tracking float32, the same streams on every backend."""

from __future__ import annotations

import math

import pytest
import torch

import fused_sched
from large_model_cases import (
    BACKENDS,
    DEVICE,
)


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


def test_stochastic_rounding_switched_on_for_float16_is_refused():
    p = torch.ones(4, dtype=torch.float16, requires_grad=True)
    opt = fused_sched.AdamW([p])
    p.grad = torch.ones_like(p)
    opt.step()
    opt.param_groups[0]["stochastic_rounding"] = True
    with pytest.raises(ValueError, match="bfloat16"):
        opt.step()
    with pytest.raises(ValueError, match="SGD does not round its parameters stochastically"):
        fused_sched.SGD([torch.zeros(1, requires_grad=True)]).add_param_group(
            {"params": [torch.zeros(1, requires_grad=True)], "stochastic_rounding": True})
