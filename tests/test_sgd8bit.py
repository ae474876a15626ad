"""fused_sched.SGD8bit: the momentum buffer in blockwise 8 bits, against a float64 reference."""

from __future__ import annotations

import copy

import pytest
import torch

import fused_sched
from fused_sched.optim import state_format as sf
from large_model_cases import BACKENDS
from state_format_reference import code_step, dequantize64, near_tie, quantize64, sgd_step64


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("nesterov", [False, True])
def test_step_matches_float64_reference(backend, device, nesterov):
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(5000, generator=gen).to(device).requires_grad_(True)
    kwargs = {"lr": 1e-2, "momentum": 0.9, "weight_decay": 1e-3, "nesterov": nesterov,
              "dampening": 0.0 if nesterov else 0.1}
    opt = fused_sched.SGD8bit([p], **kwargs, block_size=64, backend=backend)
    signed_map = sf.dynamic_map(True).double()
    for step in range(4):
        p.grad = torch.randn(5000, generator=gen).to(device)
        state = copy.deepcopy({k: v.cpu() for k, v in opt.state[p].items()})
        p0 = p.detach().cpu().clone()
        opt.step()
        buf0 = (dequantize64(state["momentum_buffer"], state["momentum_buffer_absmax"], signed_map, 64)
                if state else None)
        p_ref, buf_ref = sgd_step64(p0, p.grad.cpu(), buf0, kwargs["lr"], 0.9, kwargs["dampening"], 1e-3,
                                    nesterov, fresh=step == 0)
        torch.testing.assert_close(p.detach().cpu().double(), p_ref, rtol=1e-5, atol=1e-6)
        codes = opt.state[p]["momentum_buffer"].cpu().long()
        absmax = opt.state[p]["momentum_buffer_absmax"].cpu().double()
        q_ref, absmax_ref, y = quantize64(buf_ref, signed_map, 64)
        torch.testing.assert_close(absmax, absmax_ref, rtol=1e-5, atol=0)
        assert not bool(((codes != q_ref) & ~near_tie(y, signed_map, 1e-4)).any())
        value = dequantize64(codes, absmax, signed_map, 64)
        assert bool(((value - buf_ref).abs() <= code_step(q_ref, signed_map) * absmax_ref.repeat_interleave(64)
                     [:5000] + 1e-12).all())


def test_torch_sgd_state_dict_round_trip():
    p = torch.randn(5000, requires_grad=True)
    ref = torch.optim.SGD([p], lr=1e-2, momentum=0.9)
    p.grad = torch.randn(5000)
    ref.step()
    q = p.detach().clone().requires_grad_(True)
    opt = fused_sched.SGD8bit([q], lr=1e-2, momentum=0.9)
    opt.load_state_dict(ref.state_dict())
    q.grad = torch.randn(5000)
    opt.step()
    assert opt.state[q]["momentum_buffer"].dtype == torch.uint8
    back = torch.optim.SGD([p], lr=1e-2, momentum=0.9)
    back.load_state_dict(fused_sched.to_torch_state_dict(opt.state_dict()))
    expect = sf.dequantize_blockwise(opt.state[q]["momentum_buffer"], opt.state[q]["momentum_buffer_absmax"],
                                     True, 256)
    assert torch.equal(back.state[p]["momentum_buffer"], expect)


def test_small_tensors_take_the_groups_state_dtype():
    # As AdamW8bit: tensors under min_8bit_size keep the group's state_dtype, here bfloat16 (with its step).
    big, small = torch.zeros(5000, requires_grad=True), torch.zeros(10, requires_grad=True)
    opt = fused_sched.SGD8bit([{"params": [big, small], "state_dtype": torch.bfloat16}], momentum=0.9)
    big.grad, small.grad = torch.ones(5000), torch.ones(10)
    opt.step()
    assert opt.state[big]["momentum_buffer"].dtype == torch.uint8
    assert "step" not in opt.state[big]  # only a bfloat16 buffer keys its rounding on a step
    assert opt.state[small]["momentum_buffer"].dtype == torch.bfloat16
    assert opt.state[small]["step"].item() == 1.0
