"""The Triton backend against torch.optim and against the CPU backend. Without a GPU these run on CPU tensors
under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py); with one, on CUDA tensors."""

import pytest
import torch

import fused_sched
from fused_sched import backends
from optim_reference import FUSED, TORCH, clone_leaves, draw_grads, make_params, set_grads, twin_run

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not backends.triton_interpreted(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1"
)

ADAM_CASES = [
    ("AdamW", {"lr": 1e-2, "weight_decay": 0.1}, [{}, {"lr": 3e-2, "amsgrad": True}]),
    ("AdamW", {"lr": 1e-2, "maximize": True, "weight_decay": 0.0}, [{}]),
    ("Adam", {"lr": 1e-2, "weight_decay": 0.1}, [{"betas": (0.8, 0.95)}, {"amsgrad": True, "maximize": True}]),
    ("Adam", {"lr": 1e-2}, [{}]),
]
SGD_CASES = [
    ("SGD", {"lr": 1e-2}, [{}]),
    ("SGD", {"lr": 1e-2, "momentum": 0.9, "dampening": 0.3}, [{}, {"nesterov": True, "dampening": 0.0}]),
    ("SGD", {"lr": 1e-2, "momentum": 0.9, "weight_decay": 0.1, "maximize": True}, [{}]),
]


@pytest.mark.parametrize("name,defaults,groups", ADAM_CASES + SGD_CASES, ids=lambda c: str(c))
def test_triton_matches_torch(name, defaults, groups):
    twin_run(name, defaults, groups, steps=20, backend="triton", device=DEVICE, check_every_step=True)


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_triton_lr_tensor_and_skipped_grads(name):
    extra = {"momentum": 0.9} if name == "SGD" else {}
    twin_run(name, {"lr": 2e-2, **extra}, [{}, {"lr": 5e-3}], steps=12, skip_every=3, lr_tensor=True,
             backend="triton", device=DEVICE, check_every_step=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name,kwargs", [("AdamW", {"lr": 1e-2, "amsgrad": True}),
                                         ("SGD", {"lr": 1e-2, "momentum": 0.9, "nesterov": True})], ids=str)
def test_triton_matches_cpu_backend(name, kwargs, dtype):
    """Same inputs through both backends: float32 agrees to a couple of ulps, 16-bit params bit for bit or 1 ulp."""
    base = make_params([(1,), (7,), (70001,), (), (33, 65)], dtype=dtype)
    on_cpu, on_triton = clone_leaves(base), [p.detach().to(DEVICE).requires_grad_(True) for p in base]
    a = FUSED[name](on_cpu, **kwargs, backend="cpu")
    b = FUSED[name](on_triton, **kwargs, backend="triton")
    for step in range(8):
        grads = [g.to(dtype) for g in draw_grads(base, step)]
        set_grads(on_cpu, grads)
        set_grads(on_triton, grads)
        a.step()
        b.step()
    for x, y in zip(on_cpu, on_triton, strict=True):
        if dtype == torch.float32:
            torch.testing.assert_close(y.detach().cpu(), x.detach(), rtol=1e-6, atol=1e-7)
        else:
            # float32 results that straddle a 16-bit rounding boundary may round apart: at most one 16-bit ulp
            ulp = torch.finfo(dtype).eps * x.detach().float().abs().clamp_min(torch.finfo(dtype).tiny)
            assert ((y.detach().cpu().float() - x.detach().float()).abs() <= ulp).all()
        for key, value in a.state[x].items():
            torch.testing.assert_close(b.state[y][key].cpu(), value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_low_precision_error_at_most_twice_torch(dtype):
    base = make_params([(7,), (4099,), ()], dtype=dtype)
    ours = [p.detach().to(DEVICE).requires_grad_(True) for p in base]
    theirs, exact = clone_leaves(base), [p.detach().double().requires_grad_(True) for p in base]
    kwargs = {"lr": 1e-2, "weight_decay": 0.1}
    opt = fused_sched.AdamW(ours, **kwargs, backend="triton")
    ref, gold = torch.optim.AdamW(theirs, **kwargs, foreach=False), torch.optim.AdamW(exact, **kwargs, foreach=False)
    for step in range(20):
        grads = [g.to(dtype) for g in draw_grads(base, step)]
        for params in (ours, theirs, exact):
            set_grads(params, grads)
        opt.step()
        ref.step()
        gold.step()
    ours_all = torch.cat([p.detach().cpu().double().flatten() for p in ours])
    torch_all = torch.cat([p.detach().double().flatten() for p in theirs])
    exact_all = torch.cat([p.detach().flatten() for p in exact])
    judged = torch.isfinite(torch_all)  # torch's float16 states underflow into NaN on some elements
    assert torch.isfinite(ours_all).all() and judged.float().mean() > 0.5
    our_err = (ours_all - exact_all)[judged].abs().max().item()
    torch_err = (torch_all - exact_all)[judged].abs().max().item()
    assert our_err <= 2 * torch_err


def _runner(opt):
    (bucket,) = opt._plan.buckets
    return bucket.runner


def test_tables_are_uploaded_only_when_an_address_changes():
    params = [torch.nn.Parameter(torch.randn(n, device=DEVICE)) for n in (5, 300, 1)]
    opt = fused_sched.AdamW(params, backend="triton")
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    opt.step()
    runner = _runner(opt)
    assert runner.uploads == 1
    for _ in range(3):  # the same gradient tensors: nothing to upload
        opt.step()
    assert _runner(opt) is runner and runner.uploads == 1
    for p in params:  # gradients re-created, as after zero_grad(set_to_none=True) and backward
        p.grad = torch.randn_like(p)
    opt.step()
    assert runner.uploads == 2
    params[1].data = torch.randn(300, device=DEVICE)  # param.data = ...
    opt.step()
    assert runner.uploads == 3


def test_table_follows_add_param_group_and_load_state_dict():
    a, b = torch.nn.Parameter(torch.randn(10, device=DEVICE)), torch.nn.Parameter(torch.randn(20, device=DEVICE))
    ref_a, ref_b = torch.nn.Parameter(a.detach().cpu().clone()), torch.nn.Parameter(b.detach().cpu().clone())
    opt = fused_sched.AdamW([a], lr=1e-2, backend="triton")
    ref = torch.optim.AdamW([ref_a], lr=1e-2, foreach=False)
    for step in range(6):
        if step == 2:
            opt.add_param_group({"params": [b], "lr": 3e-2})
            ref.add_param_group({"params": [ref_b], "lr": 3e-2})
        if step == 4:
            opt.load_state_dict(opt.state_dict())
        for p, q in ((a, ref_a), (b, ref_b)):
            g = torch.randn(q.shape)
            p.grad, q.grad = g.to(DEVICE), g
        opt.step()
        ref.step()
    for p, q in ((a, ref_a), (b, ref_b)):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-5, atol=1e-6)


def test_registered_triton_op_matches_the_cpu_op():
    p, g = torch.randn(1000), torch.randn(1000)
    hyper = torch.tensor([[1e-2, 0.9, 0.999, 1e-8, 0.1, 0.0, 0.0, 8.0]], dtype=torch.float64)
    q, m, v, s = p.clone(), torch.zeros(1000), torch.zeros(1000), torch.zeros(())
    torch.ops.fused_sched.adam_step_([q], [g], [m], [v], [], [s], hyper, [0])
    dq, dm, dv, ds = (t.to(DEVICE) for t in (p, torch.zeros(1000), torch.zeros(1000), torch.zeros(())))
    torch.ops.fused_sched.triton_adam_step_([dq], [g.to(DEVICE)], [dm], [dv], [], [ds], hyper.to(DEVICE), [0])
    torch.testing.assert_close(dq.cpu(), q, rtol=1e-6, atol=1e-7)
    assert ds.item() == 1.0


def test_torch_reference_and_fused_backends_agree_on_a_model():
    """A small MLP trained 10 steps with torch AdamW and with fused_sched (triton): same weights."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    twin = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    twin.load_state_dict(model.state_dict())
    model.to(DEVICE)
    opt = fused_sched.AdamW(model.parameters(), lr=1e-2, backend="triton")
    ref = TORCH["AdamW"](twin.parameters(), lr=1e-2, foreach=False)
    for _ in range(10):
        x, y = torch.randn(8, 16), torch.randn(8, 4)
        for m, o, dev in ((model, opt, DEVICE), (twin, ref, "cpu")):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x.to(dev)), y.to(dev)).backward()
            o.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-4, atol=1e-5)
