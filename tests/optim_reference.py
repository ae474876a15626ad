"""Helpers that run a fused_sched optimizer and its torch.optim reference side by side on identical inputs."""

from __future__ import annotations

import copy

import torch

import fused_sched

# Parameters are O(1) (randn). An element that drifts through zero keeps the absolute rounding error (an ulp or
# two of an O(1) value, ~2.4e-7, measured up to 1.6e-7 on SGD with momentum) that it picked up while it was large,
# so near zero only an absolute bound can judge it: 1e-6 is ~8 ulps at 1.0. rtol stays 1e-5.
ATOL = 1e-6

SHAPES = [(1,), (7,), (278011,), (), (13, 17)]

FUSED = {"AdamW": fused_sched.AdamW, "Adam": fused_sched.Adam, "SGD": fused_sched.SGD}
TORCH = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam, "SGD": torch.optim.SGD}


def make_params(shapes=SHAPES, dtype=torch.float32, device="cpu"):
    return [torch.randn(s, dtype=torch.float64).to(dtype=dtype, device=device) for s in shapes]


def grouped(params, group_kwargs):
    """Split `params` round-robin into len(group_kwargs) param groups with their own hyper-parameters."""
    groups = [{"params": [], **kw} for kw in group_kwargs]
    for i, p in enumerate(params):
        groups[i % len(groups)]["params"].append(p)
    return [g for g in groups if g["params"]]


def clone_leaves(params):
    return [p.detach().clone().requires_grad_(True) for p in params]


def draw_grads(params, step, skip_every=0):
    """Gradients for one step in float64 (callers cast); param i gets None on steps where (i + step) % skip == 0."""
    grads = []
    for i, p in enumerate(params):
        if skip_every and (i + step) % skip_every == 0:
            grads.append(None)
        else:
            grads.append(torch.randn(p.shape, dtype=torch.float64))
    return grads


def set_grads(params, grads):
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else g.to(dtype=p.dtype, device=p.device)


def twin_run(name, defaults, group_kwargs, *, steps=20, shapes=SHAPES, skip_every=0, lr_tensor=False,
             backend="cpu", device="cpu", check_every_step=False, rtol=1e-5, atol=ATOL):
    """Run fused_sched and torch.optim (foreach=False) for `steps` steps; compare params and every state entry."""
    base = make_params(shapes, device=device)
    ours, theirs = clone_leaves(base), clone_leaves(base)
    kw = dict(defaults)
    if lr_tensor:
        kw["lr"] = torch.tensor(kw.get("lr", 1e-3))
    opt = FUSED[name](grouped(ours, group_kwargs), **copy.deepcopy(kw), backend=backend)
    ref = TORCH[name](grouped(theirs, group_kwargs), **copy.deepcopy(kw), foreach=False)
    for step in range(steps):
        grads = draw_grads(base, step, skip_every)
        set_grads(ours, grads)
        set_grads(theirs, grads)
        opt.step()
        ref.step()
        if check_every_step or step == steps - 1:
            compare(opt, ref, ours, theirs, rtol=rtol, atol=atol)
    return opt, ref, ours, theirs


def compare(opt, ref, ours, theirs, rtol=1e-5, atol=ATOL):
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        torch.testing.assert_close(
            a.detach().cpu(), b.detach(), rtol=rtol, atol=atol, msg=lambda m, i=i: f"param {i}: {m}"
        )
        sa, sb = opt.state.get(a, {}), ref.state.get(b, {})
        assert set(sa) == {k for k, v in sb.items() if v is not None}, (i, set(sa), set(sb))
        for key, vb in sb.items():
            if vb is None:
                continue
            va = sa[key]
            torch.testing.assert_close(
                va.detach().cpu().to(vb.dtype), vb.detach().cpu(), rtol=rtol, atol=atol,
                msg=lambda m, i=i, key=key: f"param {i} state {key}: {m}",
            )
