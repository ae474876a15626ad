"""fused_sched.AdamW8bit / Adam8bit: blockwise 8-bit moments against a float64 reference, state creation and
opt-outs, memory, state_dict (resume, torch.optim both ways), validation."""

from __future__ import annotations

import copy

import pytest
import torch

import fused_sched
from fused_sched.optim import state_format as sf
from large_model_cases import BACKENDS
from state_format_reference import adam_step64, code_step, dequantize64, dynamic_map64, near_tie, quantize64

HP = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05}


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_the_papers(signed):
    """The float32 map (computed as bitsandbytes computes it) is the float64 definition rounded to float32."""
    ours = sf.dynamic_map(signed).double()
    ref = dynamic_map64(signed)
    assert ours.shape == (256,) and bool((ours[1:] > ours[:-1]).all())
    torch.testing.assert_close(ours, ref, rtol=5e-7, atol=0)
    table = sf.qmap(torch.device("cpu"))
    thresholds = table[1 if signed else 3, :255]
    assert bool((thresholds[1:] > thresholds[:-1]).all())


@pytest.mark.parametrize("block", [64, 256])
def test_quantize_is_nearest_code(block):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5000, generator=gen) * torch.logspace(-6, 0, 5000)  # magnitudes over every exponent
    for signed, values in ((True, x), (False, x.abs())):
        codes, absmax = sf.quantize_blockwise(values, signed, block)
        map64 = sf.dynamic_map(signed).double()
        q, absmax64, y = quantize64(values, map64, block)
        assert torch.equal(absmax.double(), absmax64)
        differ = codes.long() != q
        assert not bool((differ & ~near_tie(y, map64)).any()), "codes differ away from a tie"


def _model(dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    shapes = [(40, 130), (5000,), (300,)]  # two quantized (one with a partial last block), one small kept float32
    return [torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_(True) for s in shapes]


def _grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 0.1).to(device=p.device, dtype=p.dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name", ["AdamW8bit", "Adam8bit"])
def test_step_matches_float64_reference(backend, device, name):
    """Each step, from the optimizer's own 8-bit state: codes equal to the float64 reference's except at rounding
    ties, dequantized moments within one code step, parameters as the float64 update."""
    params = _model(device=device)
    opt = getattr(fused_sched, name)(params, **HP, min_8bit_size=1000, backend=backend)
    decoupled = name == "AdamW8bit"
    signed_map, unsigned_map = sf.dynamic_map(True).double(), sf.dynamic_map(False).double()
    for step in range(1, 5):
        _grads(params, step)
        before = [(p.detach().cpu().clone(), copy.deepcopy({k: v.cpu() for k, v in opt.state[p].items()}))
                  for p in params]
        opt.step()
        for p, (p0, st) in zip(params, before, strict=True):
            state = opt.state[p]
            if p.numel() < 1000:
                assert state["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in state
                continue
            assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg_sq"].dtype == torch.uint8
            if st:
                m0 = dequantize64(st["exp_avg"], st["exp_avg_absmax"], signed_map, 256)
                v0 = dequantize64(st["exp_avg_sq"], st["exp_avg_sq_absmax"], unsigned_map, 256)
            else:
                m0 = v0 = torch.zeros(p.numel(), dtype=torch.float64)
            p_ref, m_ref, v_ref = adam_step64(p0.reshape(-1), p.grad.cpu().reshape(-1), m0, v0, step, HP["lr"],
                                              *HP["betas"], HP["eps"], HP["weight_decay"], decoupled)
            # float32 arithmetic against float64: a dozen float32 roundings on the update (lr 1e-2) and the
            # parameter (O(1)) stay below 1e-6 absolute; a wrong moment or bias correction moves it by ~1e-3.
            torch.testing.assert_close(p.detach().cpu().reshape(-1).double(), p_ref, rtol=1e-5, atol=1e-6)
            for key, ref, map64 in (("exp_avg", m_ref, signed_map), ("exp_avg_sq", v_ref, unsigned_map)):
                q_ref, absmax_ref, y = quantize64(ref, map64, 256)
                codes = state[key].cpu().reshape(-1).long()
                absmax = state[key + "_absmax"].cpu().double()
                torch.testing.assert_close(absmax, absmax_ref, rtol=1e-5, atol=0)
                assert not bool(((codes != q_ref) & ~near_tie(y, map64, 1e-4)).any()), f"{key} codes differ"
                value = dequantize64(state[key].cpu(), absmax, map64, 256)
                bound = code_step(q_ref, map64) * absmax_ref.repeat_interleave(256)[: p.numel()]
                assert bool(((value - ref).abs() <= bound + 1e-12).all())


def test_small_tensors_and_opted_out_groups_keep_float32():
    big, small, other = torch.zeros(5000, requires_grad=True), torch.zeros(10, requires_grad=True), \
        torch.zeros(8000, requires_grad=True)
    opt = fused_sched.AdamW8bit([{"params": [big, small]}, {"params": [other], "optim_bits": 32}])
    for p in (big, small, other):
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[big]["exp_avg"].dtype == torch.uint8
    assert opt.state[big]["exp_avg_absmax"].shape == (20,)
    assert opt.state[small]["exp_avg"].dtype == torch.float32
    assert opt.state[other]["exp_avg"].dtype == torch.float32
    # Switching a group to 8 bits converts its states at the next step.
    opt.param_groups[1]["optim_bits"] = 8
    opt.step()
    assert opt.state[other]["exp_avg"].dtype == torch.uint8


def _state_bytes(opt, params) -> float:
    total = sum(v.numel() * v.element_size() for p in params for k, v in opt.state[p].items()
                if isinstance(v, torch.Tensor) and k != "step")
    return total / sum(p.numel() for p in params)


def test_state_bytes_per_parameter():
    """Measured from the state tensors: at most 2.1 bytes per parameter for 8-bit moments; with remainder masters
    on bfloat16 parameters at most 4.2 (12 for float32 moments and a float32 master)."""
    p = torch.zeros(1 << 20, requires_grad=True)
    opt = fused_sched.AdamW8bit([p])
    p.grad = torch.ones_like(p)
    opt.step()
    assert _state_bytes(opt, [p]) <= 2.1
    q = torch.zeros(1 << 20, dtype=torch.bfloat16, requires_grad=True)
    opt = fused_sched.AdamW8bit([q], master_weights="remainder")
    q.grad = torch.ones_like(q)
    opt.step()
    assert _state_bytes(opt, [q]) <= 4.2
    r = torch.zeros(1 << 20, dtype=torch.bfloat16, requires_grad=True)
    opt = fused_sched.AdamW([r], master_weights=True)
    r.grad = torch.ones_like(r)
    opt.step()
    assert _state_bytes(opt, [r]) == 12


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_resume_is_bit_exact(backend, device):
    params = _model(device=device)
    opt = fused_sched.AdamW8bit(params, **HP, min_8bit_size=1000, backend=backend)
    for step in range(2):
        _grads(params, step)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved_params = [p.detach().clone() for p in params]
    for step in range(2, 4):
        _grads(params, step)
        opt.step()
    twins = [p.clone().requires_grad_(True) for p in saved_params]
    twin_opt = fused_sched.AdamW8bit(twins, **HP, min_8bit_size=1000, backend=backend)
    twin_opt.load_state_dict(saved)
    for step in range(2, 4):
        _grads(twins, step)
        twin_opt.step()
    for p, q in zip(params, twins, strict=True):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(value, twin_opt.state[q][key]), key


def test_torch_state_dict_loads_quantized_and_converts_back():
    """A torch.optim.AdamW state_dict loads, and its moments are quantized at the next step: that step is the float64
    update from the quantized moments (the mirror's quantization of torch's float32 states)."""
    params = _model()
    ref_params = [p.detach().clone().requires_grad_(True) for p in params]
    ref = torch.optim.AdamW(ref_params, **HP)
    for step in range(3):
        _grads(ref_params, step)
        ref.step()
    for p, r in zip(params, ref_params, strict=True):
        p.data.copy_(r)
    opt = fused_sched.AdamW8bit(params, **HP, min_8bit_size=1000)
    opt.load_state_dict(ref.state_dict())
    _grads(params, 3)
    before = [p.detach().clone() for p in params]
    opt.step()
    maps = (sf.dynamic_map(True).double(), sf.dynamic_map(False).double())
    for p, r, p0 in zip(params, ref_params, before, strict=True):
        if p.numel() < 1000:
            continue
        assert opt.state[p]["exp_avg"].dtype == torch.uint8
        moments = []
        for key, signed, map64 in (("exp_avg", True, maps[0]), ("exp_avg_sq", False, maps[1])):
            codes, absmax = sf.quantize_blockwise(ref.state[r][key], signed, 256)
            moments.append(dequantize64(codes, absmax, map64, 256))
        p_ref, _, _ = adam_step64(p0.reshape(-1), p.grad.reshape(-1), *moments, 4, HP["lr"], *HP["betas"], HP["eps"],
                                  HP["weight_decay"])
        torch.testing.assert_close(p.detach().reshape(-1).double(), p_ref, rtol=1e-5, atol=1e-6)
    # And back: torch.optim.AdamW loads the converted state_dict and takes the dequantized moments.
    back = torch.optim.AdamW([p.detach().clone().requires_grad_(True) for p in params], **HP)
    back.load_state_dict(fused_sched.to_torch_state_dict(opt.state_dict()))
    for i, p in enumerate(params):
        state = back.state[back.param_groups[0]["params"][i]]
        assert state["exp_avg"].dtype == torch.float32 and set(state) == {"step", "exp_avg", "exp_avg_sq"}
        if p.numel() >= 1000:
            expect = sf.dequantize_blockwise(opt.state[p]["exp_avg"], opt.state[p]["exp_avg_absmax"], True, 256)
            assert torch.equal(state["exp_avg"], expect)


@pytest.mark.parametrize("kwargs,message", [
    ({"block_size": 100}, "block_size"),
    ({"min_8bit_size": -1}, "min_8bit_size"),
    ({"amsgrad": True}, "amsgrad"),
    ({"state_rounding": "up"}, "state_rounding"),
])
def test_validation(kwargs, message):
    p = torch.zeros(10, requires_grad=True)
    with pytest.raises(ValueError, match=message):
        fused_sched.AdamW8bit([p], **kwargs)


def test_rejected_group_changes_nothing():
    p = torch.zeros(5000, requires_grad=True)
    opt = fused_sched.AdamW8bit([p])
    p.grad = torch.ones_like(p)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    value = p.detach().clone()
    opt.param_groups[0]["optim_bits"] = 4
    with pytest.raises(ValueError, match="optim_bits"):
        opt.step()
    assert torch.equal(p, value)
    after = opt.state_dict()
    for key, tensor in before["state"][0].items():
        assert torch.equal(tensor, after["state"][0][key])
