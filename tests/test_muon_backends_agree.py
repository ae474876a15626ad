"""Muon and MuonWithAdamW through the whole optimizer on every backend: cpu, triton and cuda give the same bits
(the elementwise passes are the same operations on every backend, and the batched Newton-Schulz runs the same torch
ops in between). With a GPU the device backends run on CUDA tensors against the CPU backend on the GPU's inputs
(then within the Newton-Schulz bound, cuBLAS and the CPU rounding differently); without one on CPU tensors, under the
Triton interpreter and the host build of the CUDA kernels (conftest.py)."""

import pytest
import torch

import fused_sched
from fused_sched import backends
from fused_sched.optim.muon import adjusted_lr_ratio
from test_muon_parity import NS_ULPS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [
    pytest.param("triton", id="triton", marks=pytest.mark.skipif(
        DEVICE == "cpu" and not backends.triton_interpreted(),
        reason="Triton on CPU tensors needs TRITON_INTERPRET=1")),
    "cuda",
]
# Shapes sharing a batch, a tall and a wide one, one over two chunks of the CUDA backend (65536 elements).
SHAPES = [(40, 24), (24, 72), (40, 24), (300, 250), (5, 7)]


def _params(dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dtype).to(device)) for s in SHAPES]


def _run(backend, device, dtype, steps=4, **kwargs):
    params = _params(dtype, device)
    opt = fused_sched.Muon([{"params": params[:3]}, {"params": params[3:], "lr": 0.03, "nesterov": False}],
                           lr=0.02, backend=backend, **kwargs)
    sched = fused_sched.get_cosine_schedule_with_warmup(opt, 2, 10)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype).to(device)
        opt.step()
        sched.step()
    return params, opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kwargs", [{}, {"max_grad_norm": 1.0, "adjust_lr_fn": "match_rms_adamw"}], ids=str)
def test_device_backend_equals_cpu_backend(backend, dtype, kwargs):
    ours, opt = _run(backend, DEVICE, dtype, **kwargs)
    ref, ref_opt = _run("cpu", "cpu", dtype, **kwargs)
    assert {b.backend for b in opt._plan.buckets} == {backend}
    for a, b in zip(ours, ref, strict=True):
        a = a.detach().cpu()
        if DEVICE == "cpu":
            assert torch.equal(a, b.detach()), (a - b).abs().max()
        else:
            # cuBLAS and the CPU round the batched matmuls differently: the Newton-Schulz bound measured on the CPU
            # (test_muon_parity.py), plus one rounding of a 16-bit param. Not yet run on a GPU: a failure there asks
            # for a measurement, not a wider bound.
            bound = NS_ULPS * 2.0**-8 * 0.03 * 4 * adjusted_lr_ratio(kwargs.get("adjust_lr_fn"), *a.shape)
            one_rounding = 0.0 if dtype == torch.float32 else 2.0**-8 * b.detach().float().abs().max().item()
            assert (a.float() - b.detach().float()).abs().max().item() <= bound + one_rounding
    if DEVICE == "cpu":
        for p, q in zip(ours, ref, strict=True):
            assert torch.equal(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_muon_with_adamw_backends_agree(backend):
    def run(backend, device):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(30, 16), torch.nn.Linear(16, 48), torch.nn.Linear(48, 16),
                                    torch.nn.LayerNorm(16)).to(device)
        groups = fused_sched.muon_param_groups(model)
        opt = fused_sched.MuonWithAdamW(groups, lr=0.02, backend=backend)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen).to(device)
            opt.step()
        muon = {id(p) for p in groups[0]["params"]}
        return [(p.detach().cpu(), id(p) in muon) for p in model.parameters()], opt

    ours, opt = run(backend, DEVICE)
    ref, _ = run("cpu", "cpu")
    assert sorted(b.family for b in opt._plan.buckets) == ["adam", "muon"]
    for (a, is_muon), (b, _) in zip(ours, ref, strict=True):
        if is_muon and DEVICE == "cpu":
            assert torch.equal(a, b)
        elif is_muon:
            bound = NS_ULPS * 2.0**-8 * 0.02 * 3 * adjusted_lr_ratio(None, *a.shape)
            assert (a - b).abs().max().item() <= bound
        else:
            # AdamW's device kernels agree with its CPU kernel to a couple of ulps (test_device_backends.py).
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
