"""Kernel-level cases of the low-memory state formats (docs/state_formats.md), shared by the backends' tests.

A formatted step is checked against its mirror: the states widened with fused_sched/optim/state_format.py, the
same backend's float32 path run on them, the results narrowed with the same rules. Kernels and mirror must agree
bit for bit (the float32 element math is the same code; quantization and rounding are integer rules).
"""

from __future__ import annotations

import torch

from fused_sched import _hyper
from fused_sched._extension import load_extension
from fused_sched.optim import state_format as sf
from fused_sched.optim.adam import adam_row
from fused_sched.optim.sgd import sgd_row

ADAM_GROUP = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2, "amsgrad": False,
              "maximize": False, "decoupled_weight_decay": True}
SGD_GROUP = {"lr": 1e-2, "momentum": 0.9, "dampening": 0.0, "weight_decay": 1e-2, "nesterov": False,
             "maximize": False}


def hyper(algorithm: str, state_round_nearest: bool = False, **changes) -> torch.Tensor:
    group = dict(ADAM_GROUP if algorithm == "adam" else SGD_GROUP, **changes)
    row = list(adam_row(group) if algorithm == "adam" else sgd_row(group))
    if state_round_nearest:
        row[_hyper.FLAGS] = float(int(row[_hyper.FLAGS]) | _hyper.STATE_ROUND_NEAREST)
    return torch.tensor([row], dtype=torch.float64)


def run_bucket(backend: str, algorithm: str, params, states, steps, hyper_table, *, masters=(), formats=(),
               absmax=(), block_size=256, fresh=None, sr_seed=0) -> None:
    """One step of an OptimBucket of CPU tensors on `backend` ("cpu", "triton" under the interpreter, or "cuda"
    under the host emulation). params carry their .grad."""
    native = load_extension()
    device = params[0].device
    eight_bit = any((f & sf.MOMENT_FORMAT_MASK) == sf.BLOCKWISE_8BIT for f in formats)
    bucket = native.OptimBucket(list(params), [list(s) for s in states], list(steps), [0] * len(params),
                                list(masters), list(range(len(params))), list(formats),
                                [list(a) for a in absmax], sf.qmap(device) if eight_bit else None)
    assert bucket.refresh_grads() == ""
    if backend == "cpu":
        if algorithm == "adam":
            bucket.adam_step(hyper_table, sr_seed=sr_seed)
        else:
            bucket.sgd_step(hyper_table, list(fresh or [0] * len(params)), sr_seed=sr_seed)
        return
    if backend == "triton":
        from fused_sched.backends.triton.runner import TritonBucketRunner

        runner = TritonBucketRunner(device, params[0].dtype, algorithm, block_size=block_size)
    else:
        from fused_sched.backends.cuda_backend import CudaBucketRunner

        runner = CudaBucketRunner(device, params[0].dtype, algorithm)
    runner.run(bucket, hyper_table, fresh, sr_seed=sr_seed)


def widen(state: torch.Tensor, absmax: torch.Tensor | None, signed: bool, block_size: int) -> torch.Tensor:
    """A moment in any format as float32 (the mirror's load)."""
    if state.dtype == torch.uint8:
        return sf.dequantize_blockwise(state, absmax, signed, block_size)
    return state.to(torch.float32, copy=True)  # a copy: the mirror's float32 run must not write the case's states


def make_case(dtype, numels, moment_format, *, seed=0, block_size=256, remainder=False, algorithm="adam",
              steps_done=3.0):
    """Params (with grads), formatted states, absmax, steps and masters of a bucket of tensors of `numels`."""
    gen = torch.Generator().manual_seed(seed)
    params, states0, states1, absmax0, absmax1, steps, masters, formats = [], [], [], [], [], [], [], []
    for n in numels:
        p = torch.randn(n, generator=gen).to(dtype)
        p.grad = torch.randn(n, generator=gen).to(dtype)
        params.append(p)
        m = torch.randn(n, generator=gen) * 0.1
        v = torch.rand(n, generator=gen) * 0.01
        if moment_format == sf.BLOCKWISE_8BIT:
            c0, a0 = sf.quantize_blockwise(m, True, block_size)
            c1, a1 = sf.quantize_blockwise(v, False, block_size)
            states0.append(c0)
            states1.append(c1)
            absmax0.append(a0)
            absmax1.append(a1)
        elif moment_format == sf.BFLOAT16:
            states0.append(m.bfloat16())
            states1.append(v.bfloat16())
        else:
            states0.append(m)
            states1.append(v)
        steps.append(torch.tensor(steps_done))
        if remainder:
            master = p.float() + torch.randn(n, generator=gen) * 1e-3
            param, rem = sf.split_remainder(master)
            p.data.copy_(param)
            masters.append(rem)
        formats.append(sf.format_column(moment_format, remainder, block_size))
    states = [states0, states1] if algorithm == "adam" else [states0]
    absmax = [absmax0, absmax1] if moment_format == sf.BLOCKWISE_8BIT else []
    # SGD keeps a step only to key the stochastic rounding of a bfloat16 momentum buffer.
    keeps_steps = algorithm == "adam" or moment_format == sf.BFLOAT16
    return {"params": params, "states": states, "absmax": absmax, "steps": steps if keeps_steps else [],
            "masters": masters, "formats": formats, "block_size": block_size, "moment_format": moment_format,
            "remainder": remainder}


def clone_case(case):
    out = dict(case)
    out["params"] = []
    for p in case["params"]:
        q = p.detach().clone()
        q.grad = p.grad.clone()
        out["params"].append(q)
    out["states"] = [[s.clone() for s in col] for col in case["states"]]
    out["absmax"] = [[a.clone() for a in col] for col in case["absmax"]]
    out["steps"] = [s.clone() for s in case["steps"]]
    out["masters"] = [m.clone() for m in case["masters"]]
    return out


def mirror_step(backend, algorithm, case, hyper_table, *, sr_seed=0, state_round_nearest=False, fresh=None):
    """The expected result of one formatted step: widened states through the backend's float32 path, narrowed by
    the mirror. Returns a case holding the expected params, states, absmax, steps and masters."""
    out = clone_case(case)
    bs = case["block_size"]
    fmt = case["moment_format"]
    signed = (True, False, False)  # exp_avg / momentum, exp_avg_sq, max_exp_avg_sq
    wide = [[widen(s, case["absmax"][k][i] if case["absmax"] else None, signed[k], bs)
             for i, s in enumerate(col)] for k, col in enumerate(case["states"])]
    masters = []
    if case["remainder"]:
        masters = [sf.join_remainder(p, r) for p, r in zip(out["params"], case["masters"], strict=True)]
    run_bucket(backend, algorithm, out["params"], wide, out["steps"], hyper_table, masters=masters, fresh=fresh,
               sr_seed=sr_seed)
    if case["remainder"]:
        for i, m in enumerate(masters):
            param, rem = sf.split_remainder(m)
            out["params"][i].data.copy_(param)
            out["masters"][i] = rem
    for k, col in enumerate(wide):
        for i, w in enumerate(col):
            if fmt == sf.BLOCKWISE_8BIT:
                codes, a = sf.quantize_blockwise(w, signed[k], bs)
                out["states"][k][i] = codes
                out["absmax"][k][i] = a
            elif fmt == sf.BFLOAT16:
                if state_round_nearest:
                    out["states"][k][i] = w.bfloat16()
                else:
                    step = int(out["steps"][i].item())
                    key = sf.state_key(sf.rounding_key(sr_seed, step, i), k)
                    out["states"][k][i] = sf.bf16_stochastic(w, key)
            else:
                out["states"][k][i] = w
    return out


def formatted_step(backend, algorithm, case, hyper_table, *, sr_seed=0, fresh=None):
    """The formatted step itself, on a copy of the case."""
    out = clone_case(case)
    run_bucket(backend, algorithm, out["params"], out["states"], out["steps"], hyper_table, masters=out["masters"],
               formats=out["formats"], absmax=out["absmax"], block_size=out["block_size"], fresh=fresh,
               sr_seed=sr_seed)
    return out


def assert_same(got, expected):
    """Bit-equality of params, states, absmax, steps and masters."""
    def bits(t):
        return t.detach().reshape(-1).contiguous().view(torch.uint8)

    for name in ("params", "steps", "masters"):
        for i, (a, b) in enumerate(zip(got[name], expected[name], strict=True)):
            assert torch.equal(bits(a), bits(b)), f"{name}[{i}] differs"
    for key in ("states", "absmax"):
        for k, (col_a, col_b) in enumerate(zip(got[key], expected[key], strict=True)):
            for i, (a, b) in enumerate(zip(col_a, col_b, strict=True)):
                assert a.dtype == b.dtype, f"{key}[{k}][{i}]: {a.dtype} != {b.dtype}"
                same = bits(a) == bits(b)
                assert bool(same.all()), (f"{key}[{k}][{i}] differs at {int((~same).sum())} bytes; first "
                                          f"{(~same).nonzero()[:5].flatten().tolist()}")
