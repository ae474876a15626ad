"""Every state format on every backend: the cpu, triton (interpreter) and cuda (host emulation) runs of the same
optimizer agree bit for bit, with a device schedule, GradScaler inputs (one step skipped by found_inf) and fused
clipping, in one launch per bucket mixing formats."""

from __future__ import annotations

import pytest
import torch

import fused_sched
from large_model_cases import DEVICE

FORMATS = {
    "adamw8bit": ("AdamW8bit", {"min_8bit_size": 1000, "block_size": 128}),
    "adamw8bit-remainder": ("AdamW8bit", {"min_8bit_size": 1000, "master_weights": "remainder"}),
    "adamw-bf16-stochastic": ("AdamW", {"state_dtype": torch.bfloat16, "rounding_seed": 7}),
    "adamw-bf16-nearest": ("AdamW", {"state_dtype": torch.bfloat16, "state_rounding": "nearest"}),
    "adam-bf16-amsgrad": ("Adam", {"state_dtype": torch.bfloat16, "amsgrad": True, "weight_decay": 0.01}),
    "adamw-remainder-sr-moments": ("AdamW", {"state_dtype": torch.bfloat16, "master_weights": "remainder"}),
    "sgd8bit": ("SGD8bit", {"momentum": 0.9, "nesterov": True, "min_8bit_size": 1000}),
    "sgd8bit-remainder": ("SGD8bit", {"momentum": 0.9, "dampening": 0.1, "min_8bit_size": 1000,
                                      "master_weights": "remainder"}),
    "sgd-bf16-stochastic": ("SGD", {"momentum": 0.9, "state_dtype": torch.bfloat16, "rounding_seed": 11}),
    "sgd-bf16-nearest": ("SGD", {"momentum": 0.9, "nesterov": True, "state_dtype": torch.bfloat16,
                                 "state_rounding": "nearest"}),
    "sgd-bf16-remainder": ("SGD", {"momentum": 0.9, "dampening": 0.1, "state_dtype": torch.bfloat16,
                                   "master_weights": "remainder"}),
}
SHAPES = [(40, 130), (3000,), (7,), (300,)]


def _run(backend, device, name, kwargs, dtype):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_(True) for s in SHAPES]
    opt = getattr(fused_sched, name)(params, lr=1e-2, weight_decay=kwargs.pop("weight_decay", 0.05),
                                     max_grad_norm=1.0, backend=backend, **kwargs)
    sched = fused_sched.get_cosine_schedule_with_warmup(opt, 2, 8)
    scale = torch.full((1,), 4.0, device=device)
    for step in range(5):
        g = torch.Generator().manual_seed(10 + step)
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * 0.4).to(device=device, dtype=dtype)
        opt.grad_scale = scale
        opt.found_inf = torch.full((1,), 1.0 if step == 2 else 0.0, device=device)
        opt.step()
        del opt.grad_scale, opt.found_inf
        sched.step()
    return params, opt


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_backends_agree(fmt, cuda_backend):
    name, kwargs = FORMATS[fmt]
    dtype = torch.bfloat16 if "remainder" in fmt or "bf16" in fmt else torch.float32
    runs = {backend: _run(backend, device, name, dict(kwargs), dtype)
            for backend, device in (("cpu", "cpu"), ("triton", DEVICE), ("cuda", DEVICE))}
    params, opt = runs["cpu"]
    for backend in ("triton", "cuda"):
        others, other_opt = runs[backend]
        for p, q in zip(params, others, strict=True):
            assert torch.equal(p.detach().view(torch.uint8) if p.dtype == torch.bfloat16 else p.detach(),
                               (q.detach().cpu().view(torch.uint8) if q.dtype == torch.bfloat16
                                else q.detach().cpu())), f"{backend}: param differs"
            state, other = opt.state[p], other_opt.state[q]
            assert set(state) == set(other)
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    a = value.detach().reshape(-1).contiguous().view(torch.uint8)
                    b = other[key].detach().cpu().reshape(-1).contiguous().view(torch.uint8)
                    assert torch.equal(a, b), f"{backend}: state {key} differs"
