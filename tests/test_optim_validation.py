"""Bad input gets a clear error, and a rejected call leaves parameters, state and groups untouched."""

import copy

import pytest
import torch

import fused_sched


def _snapshot(opt, params):
    return (
        [p.detach().clone() for p in params],
        {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for p, s in opt.state.items()},
        copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]),
        [len(g["params"]) for g in opt.param_groups],
    )


def _assert_same(before, after):
    for a, b in zip(before[0], after[0], strict=True):
        assert torch.equal(a, b)
    assert before[1].keys() == after[1].keys()
    for pid in before[1]:
        assert before[1][pid].keys() == after[1][pid].keys()
        for k in before[1][pid]:
            assert torch.equal(before[1][pid][k], after[1][pid][k])
    assert before[2] == after[2] and before[3] == after[3]


@pytest.mark.parametrize(
    "cls,kwargs,message",
    [
        (fused_sched.AdamW, {"lr": -1.0}, "Invalid learning rate: -1.0"),
        (fused_sched.AdamW, {"eps": -1e-8}, "Invalid epsilon value"),
        (fused_sched.AdamW, {"betas": (1.0, 0.999)}, "Invalid beta parameter at index 0"),
        (fused_sched.AdamW, {"betas": (0.9, -0.1)}, "Invalid beta parameter at index 1"),
        (fused_sched.AdamW, {"weight_decay": -0.1}, "Invalid weight_decay value"),
        (fused_sched.AdamW, {"lr": torch.tensor([1e-3, 1e-3])}, "Tensor lr must be 1-element"),
        (fused_sched.AdamW, {"differentiable": True}, "differentiable"),
        (fused_sched.Adam, {"lr": -1e-3}, "Invalid learning rate"),
        (fused_sched.Adam, {"weight_decay": -1.0}, "Invalid weight_decay value"),
        (fused_sched.SGD, {"lr": -0.1}, "Invalid learning rate"),
        (fused_sched.SGD, {"momentum": -0.5}, "Invalid momentum value"),
        (fused_sched.SGD, {"weight_decay": -0.5}, "Invalid weight_decay value"),
        (fused_sched.SGD, {"nesterov": True}, "Nesterov momentum requires a momentum and zero dampening"),
        (fused_sched.SGD, {"nesterov": True, "momentum": 0.9, "dampening": 0.1}, "Nesterov"),
        (fused_sched.AdamW, {"backend": "tpu"}, "Invalid backend"),
        (fused_sched.SGD, {"backend": None}, "Invalid backend"),
    ],
)
def test_constructor_validation(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls([torch.nn.Parameter(torch.randn(3))], **kwargs)


def test_cuda_backend_unavailable_is_a_clear_error():
    from fused_sched._extension import load_extension

    if load_extension().cuda_compiled():
        # Built with the kernels: backend="cuda" is accepted, and refused for CPU tensors at the first step.
        p = torch.nn.Parameter(torch.randn(3))
        opt = fused_sched.AdamW([p], backend="cuda")
        p.grad = torch.randn(3)
        before = _snapshot(opt, [p])
        with pytest.raises(ValueError, match="backend='cuda' runs CUDA tensors only"):
            opt.step()
        _assert_same(before, _snapshot(opt, [p]))
    else:
        with pytest.raises(ValueError, match="backend='cuda' is unavailable.*built without its CUDA kernels"):
            fused_sched.AdamW([torch.nn.Parameter(torch.randn(3))], backend="cuda")


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    p = torch.nn.Parameter(torch.randn(3))
    opt = fused_sched.AdamW([p], backend="triton")
    p.grad = torch.randn(3)
    before = _snapshot(opt, [p])
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        opt.step()
    _assert_same(before, _snapshot(opt, [p]))


@pytest.mark.parametrize("cls", [fused_sched.AdamW, fused_sched.SGD])
def test_invalid_param_group_is_rejected_and_nothing_changes(cls):
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = cls([a], lr=0.1)
    before = _snapshot(opt, [a])
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.add_param_group({"params": [b], "lr": -1.0})
    _assert_same(before, _snapshot(opt, [a]))


def test_same_param_in_two_groups_is_an_error_like_torch():
    a = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        fused_sched.AdamW([{"params": [a]}, {"params": [a]}])


def _trained(cls=fused_sched.AdamW, **kwargs):
    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(torch.randn(4).bfloat16())
    opt = cls([a, b], **kwargs)
    for _ in range(2):
        a.grad, b.grad = torch.randn(5), torch.randn(4).bfloat16()
        opt.step()
    return opt, a, b


def _set_foreign_dtype_grad(p, grad):
    # torch >= 2.12 refuses a gradient of another dtype unless the parameter's grad_dtype allows any
    if hasattr(p, "grad_dtype"):
        p.grad_dtype = None
    p.grad = grad


@pytest.mark.parametrize(
    "corrupt,error,message",
    [
        (lambda a, b: _set_foreign_dtype_grad(b, torch.randn(4)), ValueError, "gradient dtype"),
        (lambda a, b: setattr(a, "grad", torch.randn(5).to_sparse()), RuntimeError, "sparse"),
    ],
    ids=["grad_dtype", "sparse_grad"],
)
def test_bad_gradient_rejected_before_any_bucket_runs(corrupt, error, message):
    # a (float32) and b (bfloat16) sit in two buckets: a bad gradient in either stops both
    opt, a, b = _trained()
    a.grad, b.grad = torch.randn(5), torch.randn(4).bfloat16()
    corrupt(a, b)
    before = _snapshot(opt, [a, b])
    with pytest.raises(error, match=message):
        opt.step()
    _assert_same(before, _snapshot(opt, [a, b]))


def test_group_value_made_invalid_after_construction_is_rejected_at_step():
    opt, a, b = _trained()
    a.grad, b.grad = torch.randn(5), torch.randn(4).bfloat16()
    opt.param_groups[0]["lr"] = -0.5
    before = _snapshot(opt, [a, b])
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.step()
    _assert_same(before, _snapshot(opt, [a, b]))


@pytest.mark.parametrize(
    "param,message",
    [
        (torch.randn(3, dtype=torch.float64), "float32, bfloat16 and float16"),
        (torch.randn(3, dtype=torch.complex64), "complex"),
    ],
    ids=["float64", "complex"],
)
def test_unsupported_param_dtype_is_a_clear_error(param, message):
    p = torch.nn.Parameter(param)
    opt = fused_sched.AdamW([p])
    p.grad = torch.ones_like(param)
    before = _snapshot(opt, [p])
    with pytest.raises(ValueError, match=message):
        opt.step()
    _assert_same(before, _snapshot(opt, [p]))


def test_transposed_param_is_updated_like_torch():
    w = torch.randn(4, 6)
    ours, theirs = torch.nn.Parameter(w.clone().t()), torch.nn.Parameter(w.clone().t())
    assert not ours.is_contiguous()
    opt, ref = fused_sched.AdamW([ours], lr=0.1), torch.optim.AdamW([theirs], lr=0.1, foreach=False)
    for _ in range(3):
        g = torch.randn(4, 6).t()
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=1e-7)


def test_load_state_dict_with_wrong_shapes_changes_nothing():
    opt, a, b = _trained()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = torch.zeros(7)
    before = _snapshot(opt, [a, b])
    with pytest.raises(ValueError, match="does not match"):
        opt.load_state_dict(sd)
    _assert_same(before, _snapshot(opt, [a, b]))


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_param_given_another_shape_after_a_step_is_rejected_and_nothing_changes(backend):
    """p.data replaced by a tensor of another shape (and a gradient of that shape): the bucket built for the old
    shape notices (OptimBucket keeps each param's layout), the plan is rebuilt, and the state made for the old
    shape is refused before anything is written."""
    a, b = torch.nn.Parameter(torch.randn(4, 6)), torch.nn.Parameter(torch.randn(5))
    opt = fused_sched.AdamW([a, b], backend=backend)
    a.grad, b.grad = torch.randn(4, 6), torch.randn(5)
    opt.step()
    a.data = torch.randn(6, 4)
    a.grad, b.grad = torch.randn(6, 4), torch.randn(5)
    before = _snapshot(opt, [a, b])
    with pytest.raises(ValueError, match="state 'exp_avg' of shape \\(4, 6\\) does not match"):
        opt.step()
    _assert_same(before, _snapshot(opt, [a, b]))


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_param_re_laid_out_after_a_step_is_updated_like_torch(backend):
    """p.data replaced by a transposed tensor of the same shape: its states follow the new layout, so every element
    keeps its own state as in torch.optim."""
    ours, theirs = torch.nn.Parameter(torch.randn(4, 6)), torch.nn.Parameter(torch.randn(4, 6))
    theirs.data.copy_(ours.data)
    opt = fused_sched.AdamW([ours], lr=1e-2, backend=backend)
    ref = torch.optim.AdamW([theirs], lr=1e-2, foreach=False)
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        if step == 2:
            new = torch.randn(6, 4, generator=gen).t()  # the same shape, transposed strides
            ours.data, theirs.data = new.clone().t().contiguous().t(), new.clone().t().contiguous().t()
        g = torch.randn(4, 6, generator=gen)
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert ours.stride() == (1, 4)
    for key in ("exp_avg", "exp_avg_sq"):
        assert opt.state[ours][key].stride() == ours.stride()
        torch.testing.assert_close(opt.state[ours][key], ref.state[theirs][key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-6)
