"""GPU-only checks of the device backends, Triton and CUDA (each test runs both): parity with torch's CUDA
optimizers, no host-device syncs, CUDA-graph capture and replay, one launch per (device, dtype) bucket, int64
indexing. Skipped without a GPU (the CPU-tensor versions of most of these run the Triton interpreter and the host
build of the CUDA kernels: test_device_backends.py); run by bench/gpu_check.sh. The cuda cases are skipped when
fused_sched was built without its CUDA kernels (conftest.py). The large-model features on the GPU:
tests/test_gpu_large_model.py."""

import pytest
import torch

import fused_sched
from gpu_cases import BACKENDS, _model
from optim_reference import clone_leaves, draw_grads, make_params, set_grads, twin_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


SHAPES = [(1,), (7,), (278011,), (), (13, 17), (1024, 1024)]


@pytest.mark.parametrize("name,defaults", [
    ("AdamW", {"lr": 1e-2, "weight_decay": 0.1}),
    ("AdamW", {"lr": 1e-2, "amsgrad": True, "maximize": True}),
    ("Adam", {"lr": 1e-2, "weight_decay": 0.1}),
    ("SGD", {"lr": 1e-2, "momentum": 0.9, "nesterov": True}),
], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch_for_loop_on_gpu(name, defaults, backend):
    twin_run(name, defaults, [{}, {"lr": 3e-3}], steps=20, shapes=SHAPES, backend=backend, device="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["AdamW", "Adam", "SGD"])
def test_matches_torch_fused_on_gpu(name, backend):
    kwargs = {"lr": 1e-2, "momentum": 0.9} if name == "SGD" else {"lr": 1e-2, "weight_decay": 0.1}
    base = make_params(SHAPES, device="cuda")
    ours, theirs = clone_leaves(base), clone_leaves(base)
    opt = getattr(fused_sched, name)(ours, **kwargs, backend=backend)
    ref = getattr(torch.optim, name)(theirs, **kwargs, fused=True)
    for step in range(20):
        grads = draw_grads(base, step)
        set_grads(ours, grads)
        set_grads(theirs, grads)
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs, strict=True):
        # torch's fused CUDA kernel contracts multiply-adds into FMAs and orders Adam's terms differently: a few
        # ulps apart after 20 steps
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lr_kind", ["float", "cuda_tensor", "scheduler"])
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_no_host_device_sync_in_the_training_loop(name, lr_kind, backend):
    model = _model()
    kwargs = {"momentum": 0.9} if name == "SGD" else {}
    lr = torch.tensor(1e-3, device="cuda") if lr_kind == "cuda_tensor" else 1e-3
    opt = getattr(fused_sched, name)(model.parameters(), lr=lr, **kwargs, backend=backend)
    sched = fused_sched.get_cosine_schedule_with_warmup(opt, 10, 100) if lr_kind == "scheduler" else None
    x = torch.randn(32, 64, device="cuda")
    model(x).square().mean().backward()
    opt.step()  # the first step builds the plan and compiles the kernel
    if sched is not None:
        sched.step()
    opt.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(50):
            model(x).square().mean().backward()
            opt.step()
            if sched is not None:
                sched.step()
            opt.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_cuda_graph_capture_and_replay_equal_eager(name, backend):
    kwargs = {"lr": 1e-3, "momentum": 0.9} if name == "SGD" else {"lr": 1e-3, "weight_decay": 0.1}
    base = make_params([(1000,), (7,), (300, 70)], device="cuda")
    graphed, eager = clone_leaves(base), clone_leaves(base)
    for a, b in zip(graphed, eager, strict=True):
        g = torch.randn_like(a)
        a.grad, b.grad = g.clone(), g.clone()  # static gradients, as graph capture needs
    opt = getattr(fused_sched, name)(graphed, **kwargs, backend=backend)
    ref = getattr(fused_sched, name)(eager, **kwargs, backend=backend)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(100):
        graph.replay()
    for _ in range(3 + 1 + 100):
        ref.step()
    torch.cuda.synchronize()
    for a, b in zip(graphed, eager, strict=True):
        assert torch.equal(a.detach(), b.detach())
        for key, value in ref.state[b].items():
            assert torch.equal(opt.state[a][key], value), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_launch_per_dtype_bucket_per_step(backend):
    params = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in (10, 1000, 100000)]
    params += [torch.nn.Parameter(torch.randn(n, device="cuda", dtype=torch.bfloat16)) for n in (10, 5000)]
    opt = fused_sched.AdamW(params, backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    torch.cuda.synchronize()
    steps = 5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            opt.step()
        torch.cuda.synchronize()
    launches = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "adam" in e.name]
    assert len(launches) == 2 * steps, [e.name for e in launches]
    other = [e.name for e in prof.events()
             if e.device_type == torch.autograd.DeviceType.CUDA and "adam" not in e.name and "Memcpy" not in e.name]
    assert not other, other


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_of_more_than_2_31_elements(backend):
    n = 2**31 + 4099
    need = n * (2 + 2 + 4 + 4)  # bf16 param and grad, float32 exp_avg and exp_avg_sq
    free, _ = torch.cuda.mem_get_info()
    if free < need * 1.2:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory")
    p = torch.nn.Parameter(torch.full((n,), 1.0, device="cuda", dtype=torch.bfloat16))
    p.grad = torch.full((n,), 0.5, device="cuda", dtype=torch.bfloat16)
    p.grad[-7:] = -2.0  # elements past 2**31 must see their own gradient
    opt = fused_sched.AdamW([p], lr=0.25, weight_decay=0.0, backend=backend)
    opt.step()
    # first Adam step with zero weight decay: p -= lr * sign(g) (|m / sqrt(v)| = 1 after bias correction)
    assert p[:16].float().eq(0.75).all() and p[2**31 - 4: 2**31 + 4].float().eq(0.75).all()
    assert p[-7:].float().eq(1.25).all()
    assert opt.state[p]["exp_avg"][-1].item() == pytest.approx(-0.2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_replays_the_schedule_on_the_device(backend):
    """opt.step(); sched.step() captured once and replayed: the lr follows the schedule at every replay, because
    the kernel reads the schedule's step counter on the device and sched.step() only adds 1 to it there."""
    base = make_params([(1000,), (7,)], device="cuda")
    graphed, eager = clone_leaves(base), clone_leaves(base)
    for a, b in zip(graphed, eager, strict=True):
        g = torch.randn_like(a)
        a.grad, b.grad = g.clone(), g.clone()
    opt = fused_sched.AdamW(graphed, lr=1e-2, backend=backend)
    ref = fused_sched.AdamW(eager, lr=1e-2, backend=backend)
    sched = fused_sched.get_cosine_schedule_with_warmup(opt, 5, 60)
    ref_sched = fused_sched.get_cosine_schedule_with_warmup(ref, 5, 60)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.step()
            sched.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
        sched.step()
    for _ in range(80):  # past the end of the schedule: transformers' cosine climbs again
        graph.replay()
    for _ in range(3 + 1 + 80):
        ref.step()
        ref_sched.step()
    torch.cuda.synchronize()
    for a, b in zip(graphed, eager, strict=True):
        assert torch.equal(a.detach(), b.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_moved_to_the_gpu_after_the_optimizer_was_built(backend):
    """model.cuda() after the optimizer was built (the parameters keep their identity, their data moves), and
    again between steps after a .half()-free round trip: each step gives torch's result."""
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    theirs = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    theirs.load_state_dict(ours.state_dict())
    opt = fused_sched.AdamW(ours.parameters(), lr=1e-2, weight_decay=0.1, backend=backend)
    ours.cuda()
    theirs.cuda()
    ref = torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        x = torch.randn(8, 16, generator=gen).cuda()
        for model, o in ((ours, opt), (theirs, ref)):
            model(x).square().mean().backward()
            o.step()
            o.zero_grad()
        if step == 2:  # moved away and back: new storage, same Parameter objects; the states stay on the GPU
            for model in (ours, theirs):
                model.cpu().cuda()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("schedule", ["cosine", "polynomial_sqrt", "warm_restarts"])
def test_schedule_lr_on_the_gpu_follows_torch(schedule, backend):
    """The lr the kernel applies at every step (read off an SGD probe: p = -lr after one step from 0 with gradient
    1) against fp32 of torch's scheduler lr. Triton evaluates cos and pow in correctly rounded double-double: equal
    bits. CUDA uses the device's double cos / pow, which are not correctly rounded: at most one float32 ulp."""
    make = {
        "cosine": lambda M, o: M.CosineAnnealingLR(o, T_max=70, eta_min=1e-3),
        "polynomial_sqrt": lambda M, o: M.PolynomialLR(o, total_iters=90, power=0.5),
        "warm_restarts": lambda M, o: M.CosineAnnealingWarmRestarts(o, T_0=10, T_mult=2, eta_min=1e-4),
    }[schedule]
    probe = torch.zeros(1, device="cuda", requires_grad=True)
    opt = fused_sched.SGD([probe], lr=0.05, backend=backend)
    ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    ours, ref = make(fused_sched.lr_scheduler, opt), make(torch.optim.lr_scheduler, ref_opt)
    applied, expected = [], []
    for _ in range(120):
        probe.grad = torch.ones(1, device="cuda")
        opt.step()
        applied.append(-probe.detach().clone())
        expected.append(ref.get_last_lr()[0])
        with torch.no_grad():
            probe.zero_()
        ours.step()
        ref.step()
    got = torch.cat(applied).cpu()
    want = torch.tensor(expected, dtype=torch.float32)
    ulps = (got.view(torch.int32).long() - want.view(torch.int32).long()).abs()
    assert ulps.max().item() <= (0 if backend == "triton" else 1), ulps.nonzero().flatten().tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_compiled_step_equals_the_eager_step(name, backend):
    """opt.step() inside a torch.compile'd function runs the list-taking operators (triton_*_step_ / the CUDA
    implementations of adam_step_, sgd_step_ and grad_norm_clip) instead of the eager runner: the same kernels on
    the same tables, so the same bits, fused clip and schedule included."""
    kwargs = {"lr": 1e-2, "momentum": 0.9} if name == "SGD" else {"lr": 1e-2, "weight_decay": 0.1}
    base = make_params([(1000,), (7,), (300, 70)], device="cuda")
    results = []
    for compiled in (False, True):
        params = clone_leaves(base)
        opt = getattr(fused_sched, name)(params, **kwargs, max_grad_norm=1.0, backend=backend)
        sched = fused_sched.get_cosine_schedule_with_warmup(opt, 2, 10)

        def step(opt=opt):
            opt.step()

        run = torch.compile(step) if compiled else step
        for k in range(5):
            gen = torch.Generator().manual_seed(k)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to("cuda")
            run()
            sched.step()
        torch.cuda.synchronize()
        results.append(([p.detach().clone() for p in params], opt.last_grad_norm.clone()))
    (eager, eager_norm), (traced, traced_norm) = results
    assert torch.equal(eager_norm, traced_norm)
    for a, b in zip(eager, traced, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_cuda_backend_equals_triton_backend_on_the_gpu(name, dtype, cuda_backend):
    """The two device backends on the same inputs (a schedule and a fused clip included): equal within float32
    rounding. They share their math (optim_math.h and its Triton mirror); only the device's double pow / cos in
    the CUDA kernels' scalars can move a value by an ulp."""
    kwargs = {"lr": 1e-2, "momentum": 0.9, "nesterov": True} if name == "SGD" else {"lr": 1e-2, "weight_decay": 0.1}
    base = make_params(SHAPES, dtype=dtype, device="cuda")
    results = []
    for backend in ("triton", "cuda"):
        params = clone_leaves(base)
        opt = getattr(fused_sched, name)(params, **kwargs, max_grad_norm=2.0, backend=backend)
        sched = fused_sched.get_cosine_schedule_with_warmup(opt, 3, 12)
        for step in range(10):
            set_grads(params, draw_grads(base, step))
            opt.step()
            sched.step()
        results.append(([p.detach().float() for p in params], opt.last_grad_norm))
    (a, norm_a), (b, norm_b) = results
    torch.testing.assert_close(norm_a, norm_b, rtol=2e-6, atol=0)
    for x, y in zip(a, b, strict=True):
        if dtype == torch.float32:
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
        else:  # float32 results on either side of a bfloat16 rounding boundary: one bfloat16 ulp at most
            ulp = torch.finfo(dtype).eps * x.abs().clamp_min(torch.finfo(dtype).tiny)
            assert ((x - y).abs() <= ulp).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_tensor_betas_and_weight_decay_match_torch(backend):
    """Hyper-parameters held in CUDA tensors are copied into the table on the device at every step (the row holds
    0.0 for them: reading them on the host would synchronize), so they are used, and changed in place, as torch's
    capturable AdamW uses them."""
    base = make_params(SHAPES, device="cuda")
    ours, theirs = clone_leaves(base), clone_leaves(base)

    def hyper():
        return {"lr": torch.tensor(1e-2, device="cuda"), "weight_decay": 0.1,
                "betas": (torch.tensor(0.8, device="cuda"), torch.tensor(0.95, device="cuda"))}

    ours_hyper, theirs_hyper = hyper(), hyper()
    opt = fused_sched.AdamW(ours, **ours_hyper, capturable=True, backend=backend)
    ref = torch.optim.AdamW(theirs, **theirs_hyper, capturable=True, foreach=False)
    for step in range(10):
        if step == 5:
            for h in (ours_hyper, theirs_hyper):
                h["betas"][0].fill_(0.5)
        grads = draw_grads(base, step)
        set_grads(ours, grads)
        set_grads(theirs, grads)
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
