"""Robustness: unusual tensors, tensors that move after the optimizer is built, non-finite values, exact resume
in a new process, and property-based parity with torch.optim."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_sched
from fused_sched import backends
from optim_reference import FUSED, TORCH, clone_leaves, compare, grouped, set_grads

# These tests run CPU tensors: the Triton kernels under the interpreter, the CUDA kernels as their host build
# (conftest.py), both only on machines without a GPU.
BACKENDS = (["cpu"] + (["triton"] if backends.triton_interpreted() else [])
            + ([] if torch.cuda.is_available() else ["cuda"]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_zero_size_tensors_step_like_torch(name, backend):
    kwargs = {"lr": 0.1, "momentum": 0.9} if name == "SGD" else {"lr": 0.1}
    base = [torch.randn(0), torch.randn(3, 0), torch.randn(5), torch.randn(())]
    ours, theirs = clone_leaves(base), clone_leaves(base)
    opt, ref = FUSED[name](ours, **kwargs, backend=backend), TORCH[name](theirs, **kwargs, foreach=False)
    for _ in range(3):
        grads = [torch.randn(p.shape, dtype=torch.float64) for p in base]
        set_grads(ours, grads)
        set_grads(theirs, grads)
        opt.step()
        ref.step()
    compare(opt, ref, ours, theirs)


def test_gradient_with_other_strides_is_used_in_the_parameter_layout():
    w = torch.randn(6, 4)
    ours, theirs = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    opt, ref = fused_sched.AdamW([ours], lr=0.1), torch.optim.AdamW([theirs], lr=0.1, foreach=False)
    for _ in range(3):
        g = torch.randn(4, 6).t()  # transposed: same values, other strides than the parameter
        ours.grad, theirs.grad = g.clone(), g.clone()
        assert ours.grad.stride() != ours.stride()
        opt.step()
        ref.step()
    compare(opt, ref, [ours], [theirs])


def test_params_cast_to_half_after_the_optimizer_was_built():
    """model.half() after construction: torch.optim then fails (its float32 states meet float16 gradients in
    lerp_); fused_sched keeps its float32 states and goes on with float32 math and float16 storage. Judged against
    a float64 run of torch.optim that rounds the parameters to float16 at the cast and after every later step."""
    base = [torch.randn(50), torch.randn(7, 3)]
    ours = clone_leaves(base)
    exact = [p.detach().double().requires_grad_(True) for p in base]
    opt = fused_sched.AdamW(ours, lr=1e-2, weight_decay=0.1)
    gold = torch.optim.AdamW(exact, lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(8):
        if step == 3:
            for p in ours:
                p.data = p.data.half()  # what model.half() does to every parameter
            with torch.no_grad():
                for e in exact:
                    e.copy_(e.half().double())
        dtype = torch.float16 if step >= 3 else torch.float32
        grads = [torch.randn(p.shape).to(dtype) for p in base]
        set_grads(ours, grads)
        set_grads(exact, [g.double() for g in grads])
        opt.step()
        gold.step()
        if step >= 3:
            with torch.no_grad():
                for e in exact:
                    e.copy_(e.half().double())
    for p, e in zip(ours, exact, strict=True):
        assert p.dtype == torch.float16 and opt.state[p]["exp_avg"].dtype == torch.float32
        ulp = torch.finfo(torch.float16).eps * e.detach().abs().clamp_min(1e-4)
        assert ((p.detach().double() - e.detach()).abs() <= ulp).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kwargs", [("AdamW", {"lr": 0.1}), ("AdamW", {"lr": 0.1, "amsgrad": True}),
                                         ("SGD", {"lr": 0.1, "momentum": 0.9})], ids=str)
def test_non_finite_values_propagate_like_torch(name, kwargs, backend):
    base = [torch.randn(64)]
    ours, theirs = clone_leaves(base), clone_leaves(base)
    opt, ref = FUSED[name](ours, **kwargs, backend=backend), TORCH[name](theirs, **kwargs, foreach=False)
    for step in range(4):
        g = torch.randn(64, dtype=torch.float64)
        if step == 1:
            g[3], g[10], g[20] = float("nan"), float("inf"), -float("inf")
        set_grads(ours, [g])
        set_grads(theirs, [g])
        opt.step()
        ref.step()
    a, b = ours[0].detach(), theirs[0].detach()
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    finite = torch.isfinite(b)
    torch.testing.assert_close(a[finite], b[finite], rtol=1e-5, atol=1e-6)


_RESUME_SCRIPT = textwrap.dedent("""
    import sys, torch, fused_sched
    mode, path, backend = sys.argv[1], sys.argv[2], sys.argv[3]
    if backend == "cuda":
        import cuda_host_emulation  # tests/ is on PYTHONPATH: the host build of the CUDA kernels
        cuda_host_emulation.install()
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(300,), (7, 11), ()]]
    opt = fused_sched.AdamW([{"params": params[:2]}, {"params": params[2:], "lr": 3e-3}], lr=1e-2,
                            weight_decay=0.1, amsgrad=True, backend=backend)
    sched = fused_sched.get_cosine_schedule_with_warmup(opt, 10, 80)
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(100)]
    first, last = (0, 100) if mode == "full" else ((0, 50) if mode == "first" else (50, 100))
    if mode == "second":
        saved = torch.load(path + ".ckpt", weights_only=True)
        with torch.no_grad():
            for p, v in zip(params, saved["params"]):
                p.copy_(v)
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
    for step in range(first, last):
        for p, g in zip(params, grads[step]):
            p.grad = g.clone()
        opt.step()
        sched.step()
    if mode == "first":
        torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict(), "sched": sched.state_dict()},
                   path + ".ckpt")
    else:
        torch.save({"params": [p.detach() for p in params],
                    "state": [{k: v for k, v in opt.state[p].items()} for p in params]}, path + ".out")
""")


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_in_a_new_process_is_bit_identical(backend, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_RESUME_SCRIPT)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(os.path.abspath(__file__)),
                                                      env.get("PYTHONPATH")]))

    def run(mode, path):
        subprocess.run([sys.executable, str(script), mode, str(path), backend], check=True, env=env)

    run("full", tmp_path / "full")
    run("first", tmp_path / "split")
    run("second", tmp_path / "split")
    full = torch.load(str(tmp_path / "full") + ".out", weights_only=True)
    split = torch.load(str(tmp_path / "split") + ".out", weights_only=True)
    for a, b in zip(full["params"], split["params"], strict=True):
        assert torch.equal(a, b)
    for sa, sb in zip(full["state"], split["state"], strict=True):
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


_shapes = st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple), min_size=1, max_size=5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=_shapes,
    groups=st.integers(1, 3),
    name=st.sampled_from(["AdamW", "Adam", "SGD"]),
    lr=st.floats(1e-4, 0.5),
    weight_decay=st.sampled_from([0.0, 0.01, 0.3]),
    flag_a=st.booleans(),
    flag_b=st.booleans(),
    beta1=st.floats(0.0, 0.99),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    steps=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_property_parity_with_torch(shapes, groups, name, lr, weight_decay, flag_a, flag_b, beta1, momentum, steps,
                                    seed):
    torch.manual_seed(seed)
    if name == "SGD":
        kwargs = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "maximize": flag_a,
                  "nesterov": flag_b and momentum > 0}
    else:
        kwargs = {"lr": lr, "weight_decay": weight_decay, "amsgrad": flag_a, "maximize": flag_b,
                  "betas": (beta1, 0.999)}
    group_kwargs = [{}] + [{"lr": lr * (i + 2) / 3} for i in range(groups - 1)]
    base = [torch.randn(s, dtype=torch.float64).float() for s in shapes]
    ours, theirs = clone_leaves(base), clone_leaves(base)
    opt = FUSED[name](grouped(ours, group_kwargs), **kwargs, backend="cpu")
    ref = TORCH[name](grouped(theirs, group_kwargs), **kwargs, foreach=False)
    for _ in range(steps):
        grads = [torch.randn(p.shape, dtype=torch.float64) for p in base]
        set_grads(ours, grads)
        set_grads(theirs, grads)
        opt.step()
        ref.step()
    compare(opt, ref, ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_step_does_not_keep_gradients_alive(name, backend):
    """After opt.step(); opt.zero_grad() the gradients are freed, as with torch.optim."""
    import weakref

    params = [torch.nn.Parameter(torch.randn(100)) for _ in range(3)]
    opt = FUSED[name](params, lr=0.1, backend=backend)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(100)
        refs = [weakref.ref(p.grad) for p in params]
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert all(r() is None for r in refs)


_SCHEDULES = {
    "step": lambda M, o, n: M.StepLR(o, max(1, n // 3), 0.5),
    "cosine": lambda M, o, n: M.CosineAnnealingLR(o, max(1, n // 2), 1e-4),
    "linear_warmup": lambda M, o, n: M.LinearLR(o, 0.1, 1.0, max(1, n // 2)),
    "one_cycle": lambda M, o, n: M.OneCycleLR(o, 0.05, total_steps=n + 1, cycle_momentum=False),
}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=_shapes,
    name=st.sampled_from(["AdamW", "SGD"]),
    schedule=st.sampled_from(sorted(_SCHEDULES)),
    steps=st.integers(2, 12),
    amsgrad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_parity_with_torch_under_a_schedule(shapes, name, schedule, steps, amsgrad, seed):
    from fused_sched import lr_scheduler

    torch.manual_seed(seed)
    kwargs = {"lr": 0.02, "momentum": 0.9} if name == "SGD" else {"lr": 0.02, "amsgrad": amsgrad}
    base = [torch.randn(s, dtype=torch.float64).float() for s in shapes]
    ours, theirs = clone_leaves(base), clone_leaves(base)
    opt = FUSED[name](ours, **kwargs, backend="cpu")
    ref = TORCH[name](theirs, **kwargs, foreach=False)
    sched = _SCHEDULES[schedule](lr_scheduler, opt, steps)
    ref_sched = _SCHEDULES[schedule](torch.optim.lr_scheduler, ref, steps)
    for _ in range(steps):
        grads = [torch.randn(p.shape, dtype=torch.float64) for p in base]
        set_grads(ours, grads)
        set_grads(theirs, grads)
        opt.step()
        ref.step()
        sched.step()
        ref_sched.step()
    compare(opt, ref, ours, theirs)
    assert sched.get_last_lr() == ref_sched.get_last_lr()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=_shapes,
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    name=st.sampled_from(["AdamW", "SGD"]),
    lr=st.floats(1e-4, 0.1),
    weight_decay=st.sampled_from([0.0, 0.01, 0.3]),
    master=st.booleans(),
    steps=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_property_low_precision_parity(shapes, dtype, name, lr, weight_decay, master, steps, seed):
    """bfloat16 / float16 parameters against torch.optim run in float32 on the same values: with master weights
    the master copy follows torch's float32 parameters; without, torch's float32 parameter rounded to the
    parameter dtype after every step (fused_sched's float32 states, float32 arithmetic and one rounding of the
    parameter per step). The float32 computations agree to a few ulps, so a rounding to the low-precision dtype can
    fall on the other side of a tie: at most one ulp of the dtype apart."""
    torch.manual_seed(seed)
    kwargs = {"lr": lr, "weight_decay": weight_decay}
    if name == "SGD":
        kwargs["momentum"] = 0.9
    base = [torch.randn(s, dtype=torch.float64).to(dtype) for s in shapes]
    ours = clone_leaves(base)
    theirs = [p.detach().float().requires_grad_(True) for p in base]
    opt = FUSED[name](ours, **kwargs, master_weights=master, backend="cpu")
    ref = TORCH[name](theirs, **kwargs, foreach=False)
    for _ in range(steps):
        grads = [torch.randn(p.shape, dtype=torch.float64).to(dtype) for p in base]
        set_grads(ours, grads)
        set_grads(theirs, [g.float() for g in grads])
        opt.step()
        ref.step()
        if not master:
            with torch.no_grad():
                for p in theirs:
                    p.copy_(p.to(dtype).float())
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10  # relative spacing of the dtype's values
    for p, r in zip(ours, theirs, strict=True):
        if master:
            torch.testing.assert_close(opt.state[p]["master_param"], r.detach(), rtol=1e-5, atol=1e-6)
            assert torch.equal(p.detach(), opt.state[p]["master_param"].to(dtype))
        else:
            torch.testing.assert_close(p.detach().float(), r.detach(), rtol=ulp, atol=1e-6)


def test_bucket_check_over_threads_reports_the_first_bad_param():
    """OptimBucket.refresh_grads splits a large bucket over threads (1024+ tensors): a problem is still reported for
    the first param that has one, whichever thread met it, and a clean bucket passes."""
    from fused_sched._extension import load_extension

    native = load_extension()
    params = [torch.randn(3) for _ in range(3000)]
    for p in params:
        p.grad = torch.randn(3)
    bucket = native.OptimBucket(params, [], [], [0] * len(params), [], list(range(len(params))))
    assert bucket.refresh_grads() == ""
    params[2999].grad = None
    params[1700].grad = torch.randn(6)[::2]  # the right shape, another stride
    assert bucket.refresh_grads() == "param 1700: grad layout differs from param"
    params[1700].grad = torch.randn(3)
    assert bucket.refresh_grads() == "param 2999: no grad"


def test_large_bucket_clip_then_new_gradients_then_step():
    """clip_grad_norm_() checks the bucket (holding its CPU gradients), the gradients are then replaced, and the
    step checks again over threads (1024+ tensors): the replaced gradients are freed on the calling thread, not in
    a worker waiting for the GIL (this deadlocked once). Results equal torch's."""
    base = [torch.randn(5) for _ in range(1100)]
    ours, theirs = clone_leaves(base), clone_leaves(base)
    opt, ref = fused_sched.AdamW(ours, lr=0.1), torch.optim.AdamW(theirs, lr=0.1, foreach=False)
    for p, q in zip(ours, theirs, strict=True):
        p.grad, q.grad = torch.ones(5), torch.ones(5)
    opt.clip_grad_norm_(1e9)  # a clip that changes nothing, kept pending with the old gradients
    opt.zero_grad()
    ref.zero_grad()
    grads = [torch.randn(5, dtype=torch.float64) for _ in base]
    set_grads(ours, grads)
    set_grads(theirs, grads)
    opt.step()
    ref.step()
    compare(opt, ref, ours, theirs)
