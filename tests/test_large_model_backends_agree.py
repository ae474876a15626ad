"""Every large-model feature at once (master weights, stochastic rounding, GradScaler, fused clip): the C++,
Triton and CUDA kernels agree to the bit.
"""

from __future__ import annotations

import pytest
import torch

import fused_sched
from large_model_cases import (
    DEVICE,
    SHAPES,
    _amp_loop,
    _assert_same_snapshot,
    _snapshot,
)
from optim_reference import clone_leaves, make_params


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
