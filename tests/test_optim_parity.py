"""fused_sched optimizers against torch.optim (foreach=False), float32, step after step: what every optimizer
shares (param groups, tensor lrs, params without grad, CPU capabilities, closure, zero_grad, the registered ops).
One optimizer's flags: tests/test_adam_parity.py, tests/test_sgd_parity.py."""

import pytest
import torch

import fused_sched._C as native
from optim_reference import twin_run


@pytest.mark.parametrize("name", ["AdamW", "Adam", "SGD"])
def test_param_groups_with_their_own_hyperparameters(name):
    if name == "SGD":
        groups = [{"lr": 0.05, "momentum": 0.9}, {"momentum": 0.5, "dampening": 0.1}, {"nesterov": True,
                                                                                        "momentum": 0.7}]
        defaults = {"lr": 1e-2}
    else:
        groups = [{"lr": 3e-2, "amsgrad": True}, {"betas": (0.8, 0.95), "weight_decay": 0.0}, {"maximize": True}]
        defaults = {"lr": 1e-2, "weight_decay": 0.1}
    twin_run(name, defaults, groups, steps=20, check_every_step=True)


@pytest.mark.parametrize("name", ["AdamW", "Adam", "SGD"])
def test_lr_as_tensor(name):
    extra = {"momentum": 0.9} if name == "SGD" else {}
    twin_run(name, {"lr": 2e-2, **extra}, [{}], steps=20, lr_tensor=True)


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_params_without_grad_are_skipped(name):
    extra = {"momentum": 0.9} if name == "SGD" else {}
    # every third (param, step) pair has no gradient: its state and step must not advance, as in torch
    twin_run(name, {"lr": 1e-2, **extra}, [{}, {"lr": 5e-3}], steps=24, skip_every=3, check_every_step=True)


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_every_cpu_capability_matches_torch(capability):
    try:
        native.set_cpu_capability(capability)
    except RuntimeError:
        pytest.skip(f"this CPU cannot run the {capability} kernels")
    try:
        twin_run("AdamW", {"lr": 1e-2, "amsgrad": True}, [{}, {"maximize": True, "weight_decay": 0.0}], steps=20)
        twin_run("SGD", {"lr": 1e-2, "momentum": 0.9, "dampening": 0.2}, [{}], steps=20)
    finally:
        native.set_cpu_capability(_best_capability())


def _best_capability():
    for name in ("avx512", "avx2", "default"):
        try:
            native.set_cpu_capability(name)
            return name
        except RuntimeError:
            continue
    raise AssertionError("no CPU capability accepted")


def test_closure_is_called_with_grad_enabled_and_its_loss_returned():
    import fused_sched

    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = fused_sched.AdamW([w], lr=0.1)

    def closure():
        opt.zero_grad()
        assert torch.is_grad_enabled()
        loss = (w**2).sum()
        loss.backward()
        return loss

    ref_w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    ref = torch.optim.AdamW([ref_w], lr=0.1, foreach=False)

    def ref_closure():
        ref.zero_grad()
        loss = (ref_w**2).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        for _ in range(5):
            assert opt.step(closure).item() == pytest.approx(ref.step(ref_closure).item(), rel=1e-6)
    torch.testing.assert_close(w.detach(), ref_w.detach(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    import fused_sched

    w = torch.nn.Parameter(torch.ones(3))
    opt = fused_sched.SGD([w], lr=0.1)
    w.grad = torch.ones(3)
    opt.zero_grad(set_to_none=set_to_none)
    if set_to_none:
        assert w.grad is None
    else:
        assert torch.equal(w.grad, torch.zeros(3))


def test_step_without_any_grad_is_a_no_op():
    import fused_sched

    w = torch.nn.Parameter(torch.ones(3))
    opt = fused_sched.AdamW([w])
    opt.step()
    assert torch.equal(w.detach(), torch.ones(3))
    assert len(opt.state) == 0


def test_registered_op_matches_the_optimizer():
    """torch.ops.fused_sched.adam_step_ (the dispatcher path) gives what fused_sched.AdamW gives."""
    import fused_sched

    p = torch.randn(1000)
    g = torch.randn(1000)
    w = torch.nn.Parameter(p.clone())
    opt = fused_sched.AdamW([w], lr=1e-2, weight_decay=0.1)
    w.grad = g.clone()
    opt.step()
    q, m, v, s = p.clone(), torch.zeros(1000), torch.zeros(1000), torch.zeros(())
    hyper = torch.tensor([[1e-2, 0.9, 0.999, 1e-8, 0.1, 0.0, 0.0, 8.0]], dtype=torch.float64)
    torch.ops.fused_sched.adam_step_([q], [g], [m], [v], [], [s], hyper, [0])
    assert torch.equal(q, w.detach())
    assert torch.equal(m, opt.state[w]["exp_avg"]) and torch.equal(v, opt.state[w]["exp_avg_sq"])
    assert s.item() == 1.0


def test_registered_ops_schemas_pass_opcheck():
    q, g, m, v, s = torch.randn(64), torch.randn(64), torch.zeros(64), torch.zeros(64), torch.zeros(())
    hyper = torch.tensor([[1e-2, 0.9, 0.999, 1e-8, 0.1, 0.0, 0.0, 8.0]], dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.fused_sched.adam_step_.default, ([q], [g], [m], [v], [], [s], hyper, [0]),
        test_utils=("test_schema", "test_faketensor"),
    )
