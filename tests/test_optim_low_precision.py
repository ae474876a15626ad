"""bfloat16 / float16 parameters: fused_sched (float32 math and states) judged against a float64 reference run,
with an error at most twice the error of torch.optim itself in that dtype."""

import pytest
import torch

from optim_reference import FUSED, TORCH, clone_leaves, draw_grads, make_params, set_grads

CASES = [
    ("AdamW", {"lr": 1e-2, "weight_decay": 0.1}),
    ("AdamW", {"lr": 1e-2, "amsgrad": True, "maximize": True}),
    ("Adam", {"lr": 1e-2, "weight_decay": 0.1}),
    ("SGD", {"lr": 1e-2, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("SGD", {"lr": 1e-2, "momentum": 0.9, "dampening": 0.3}),
    ("SGD", {"lr": 1e-2}),
]
SHAPES = [(1,), (7,), (4099,), (), (64, 33)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name,kwargs", CASES, ids=lambda c: str(c))
def test_low_precision_error_at_most_twice_torch(name, kwargs, dtype):
    base = make_params(SHAPES, dtype=dtype)  # the starting point is exactly representable in `dtype`
    ours, theirs = clone_leaves(base), clone_leaves(base)
    exact = [p.detach().to(torch.float64).requires_grad_(True) for p in base]
    opt = FUSED[name](ours, **kwargs, backend="cpu")
    ref = TORCH[name](theirs, **kwargs, foreach=False)
    gold = TORCH[name](exact, **kwargs, foreach=False)
    for step in range(20):
        grads = [g.to(dtype) for g in draw_grads(base, step)]  # every run sees the same rounded gradients
        for params in (ours, theirs, exact):
            set_grads(params, grads)
        opt.step()
        ref.step()
        gold.step()
    ours_all = torch.cat([a.detach().double().flatten() for a in ours])
    torch_all = torch.cat([b.detach().double().flatten() for b in theirs])
    exact_all = torch.cat([e.detach().flatten() for e in exact])
    assert torch.isfinite(ours_all).all()
    # torch's float16 Adam keeps float16 states, whose squared gradients underflow and turn some elements into
    # NaN; its error is judged on the elements it got finite, and ours on the same elements.
    judged = torch.isfinite(torch_all)
    assert judged.float().mean() > 0.5
    our_err = (ours_all - exact_all)[judged].abs().max().item()
    torch_err = (torch_all - exact_all)[judged].abs().max().item()
    assert our_err <= 2 * torch_err, f"fused_sched error {our_err:.3e} vs torch {torch_err:.3e}"
    # states stay float32 whatever the parameter dtype
    for p in ours:
        for key, value in opt.state[p].items():
            assert value.dtype == torch.float32, key
