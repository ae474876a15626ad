"""GPU-only checks of Muon and MuonWithAdamW on both device backends (Triton, CUDA): parity with torch.optim.Muon
within the batched Newton-Schulz's bfloat16 rounding, the two backends bit for bit, no host-device sync with a
device schedule, CUDA-graph capture and replay of opt.step(); sched.step(), and launches that grow with the number
of shapes. Skipped without a GPU (the CPU-tensor versions run the Triton interpreter and the host build of the CUDA
kernels: tests/test_muon_triton.py, test_muon_cuda.py); run by bench/gpu_check.sh."""

import pytest
import torch

import fused_sched
from fused_sched.optim.muon import adjusted_lr_ratio
from gpu_cases import BACKENDS
from test_muon_parity import NS_ULPS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(256, 128), (128, 512), (256, 128), (384, 384), (1024, 64), (3, 70)]


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).cuda()) for s in SHAPES]


def _grads(steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen).cuda() for s in SHAPES] for _ in range(steps)]


def _train(opt, params, grads, sched=None):
    for step in grads:
        for p, g in zip(params, step, strict=True):
            p.grad = g.clone()
        opt.step()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
def test_matches_torch_muon_on_gpu(backend, adjust_lr_fn):
    kwargs = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust_lr_fn)
    grads = _grads(20)
    ours, ref = _params(), _params()
    _train(fused_sched.Muon(ours, **kwargs, backend=backend), ours, grads)
    _train(torch.optim.Muon(ref, **kwargs), ref, grads)
    for a, b in zip(ours, ref, strict=True):
        bound = NS_ULPS * 2.0**-8 * 0.02 * 20 * adjusted_lr_ratio(adjust_lr_fn, *a.shape)
        assert (a - b).abs().max().item() <= bound


def test_cuda_backend_equals_triton_backend_on_gpu():
    if "cuda" not in BACKENDS:
        pytest.skip("built without the CUDA kernels")
    grads = _grads(10)
    runs = {}
    for backend in ("triton", "cuda"):
        params = _params()
        _train(fused_sched.Muon(params, lr=0.02, backend=backend), params, grads)
        runs[backend] = params
    for a, b in zip(runs["triton"], runs["cuda"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_device_sync_with_a_device_schedule(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(100, 64), torch.nn.Linear(64, 256), torch.nn.GELU(),
                                torch.nn.Linear(256, 64), torch.nn.LayerNorm(64)).cuda()
    opt = fused_sched.MuonWithAdamW(fused_sched.muon_param_groups(model), lr=0.02, backend=backend,
                                    max_grad_norm=1.0)
    sched = fused_sched.get_cosine_schedule_with_warmup(opt, 10, 100)
    x = torch.randint(0, 100, (32,), device="cuda")
    model(x).square().mean().backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            model(x).square().mean().backward()
            opt.step()
            sched.step()
            opt.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_replays_muon_with_its_schedule(backend):
    graphed, eager = _params(), _params()
    for a, b, g in zip(graphed, eager, _grads(1)[0], strict=True):
        a.grad, b.grad = g.clone(), g.clone()  # static gradients, as graph capture needs
    opt = fused_sched.Muon(graphed, lr=0.02, backend=backend)
    ref = fused_sched.Muon(eager, lr=0.02, backend=backend)
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
    for _ in range(30):
        graph.replay()
    for _ in range(3 + 1 + 30):
        ref.step()
        ref_sched.step()
    torch.cuda.synchronize()
    for a, b in zip(graphed, eager, strict=True):
        assert torch.equal(a.detach(), b.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_launches_grow_with_shapes_not_tensors(backend):
    def launches(copies):
        params = [torch.nn.Parameter(torch.randn(128, 64, device="cuda")) for _ in range(copies)]
        params += [torch.nn.Parameter(torch.randn(64, 256, device="cuda")) for _ in range(copies)]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = fused_sched.Muon(params, lr=0.02, backend=backend)
        opt.step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            opt.step()
            torch.cuda.synchronize()
        return sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)

    assert launches(2) == launches(16)
