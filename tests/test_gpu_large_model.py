"""GPU-only checks of the large-model features (GradScaler, fused clipping, master weights, stochastic rounding)
on the device backends, Triton and CUDA. Skipped without a GPU; run by bench/gpu_check.sh."""

import pytest
import torch

import fused_sched
from gpu_cases import BACKENDS, _model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# -- large-model features on the GPU (tests/test_large_model_*.py run them on the CPU and under the interpreter)
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_clip_and_schedule_without_a_sync(backend):
    """scaler.scale(loss).backward(); scaler.step(opt); scaler.update(); sched.step() with fused clipping, master
    weights and a device schedule: no host-device sync anywhere in the loop."""
    model = _model().to(torch.bfloat16)
    opt = fused_sched.AdamW(model.parameters(), lr=1e-3, master_weights=True, max_grad_norm=1.0, backend=backend)
    sched = fused_sched.get_cosine_schedule_with_warmup(opt, 10, 100)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)

    def train_step():
        scaler.scale(model(x).float().square().mean()).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        opt.zero_grad()

    train_step()  # builds the plan, compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sched.last_epoch == 21


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_and_update_are_two_launches(backend):
    params = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in (10, 1000, 100000)]
    opt = fused_sched.AdamW(params, max_grad_norm=1.0, backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            opt.step()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "Memcpy" not in e.name]
    # Triton: adam_kernel, grad_norm_kernel; CUDA: fused_sched::cuda::...::adam_tables_kernel<float>(...), ...
    updates = [k for k in kernels if "adam" in k]
    norms = [k for k in kernels if "grad_norm_kernel" in k]
    assert len(updates) == 5 and len(norms) == 5 and len(kernels) == 2 * 5, kernels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", [{"master_weights": True}, {"stochastic_rounding": True},
                                    {"max_grad_norm": 5.0}], ids=str)
def test_gpu_kernels_equal_the_cpu_kernels_bit_for_bit(kwargs, backend):
    """The Triton and CUDA kernels on the GPU and the C++ CPU kernels share their math to the bit: master copies,
    the stochastic rounding stream, the clip (2-norm: float64 sums of float32 squares, differently ordered, agree
    here because the coefficient is computed from a float64 total rounded once). CUDA's double pow is not
    correctly rounded (adam_math.h's pow, in csrc/cuda/adam.cu): a bias correction one float64 ulp off changes its
    float32 rounding about once in 2^29 values, never seen in these 5 steps."""
    results = []
    for device, name in (("cpu", "cpu"), ("cuda", backend)):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n, dtype=torch.bfloat16).to(device)) for n in (7, 5000, 70001)]
        opt = fused_sched.AdamW(params, lr=1e-2, backend=name, **kwargs)
        for step in range(5):
            gen = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(device=device, dtype=p.dtype)
            opt.step()
        results.append([p.detach().cpu() for p in params])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
