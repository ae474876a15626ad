"""The CPU kernels' low-memory state formats (docs/state_formats.md): each formatted step equals, bit for bit, the
mirror of tests/state_format_cases.py (states widened by fused_sched/optim/state_format.py, the CPU's float32 path,
the results narrowed by the mirror), over several consecutive steps, for rows of every format in one bucket."""

from __future__ import annotations

import pytest
import torch

import state_format_cases as C
from fused_sched._extension import load_extension
from fused_sched.optim import state_format as sf

F32, BF16, Q8 = sf.FLOAT32, sf.BFLOAT16, sf.BLOCKWISE_8BIT
NUMELS = (1, 255, 257, 1000, 5000, 16384 + 300)  # the last one spans two chunks
SMALL = (1, 255, 257, 1000)
STEPS = 3


def make_case(dtype, numels, moment_format, *, seed=0, block_size=256, remainder=False, algorithm="adam",
              amsgrad=False):
    """state_format_cases.make_case's case (whose builder keeps no params) plus, with amsgrad, max_exp_avg_sq."""
    gen = torch.Generator().manual_seed(seed)
    params, states, absmax, steps, masters, formats = [], [[], [], []], [[], []], [], [], []
    for n in numels:
        p = torch.randn(n, generator=gen).to(dtype)
        p.grad = torch.randn(n, generator=gen).to(dtype)
        moments = [torch.randn(n, generator=gen) * 0.1, torch.rand(n, generator=gen) * 0.01]
        moments.append(moments[1] + torch.rand(n, generator=gen) * 0.01)
        for k, m in enumerate(moments):
            if moment_format == Q8 and k < 2:
                codes, a = sf.quantize_blockwise(m, k == 0, block_size)
                states[k].append(codes)
                absmax[k].append(a)
            else:
                states[k].append(m.bfloat16() if moment_format == BF16 else m)
        steps.append(torch.tensor([3.0]))  # 1-d: assert_same views the bits of every tensor as bytes
        if remainder:
            param, rem = sf.split_remainder(p.float() + torch.randn(n, generator=gen) * 1e-3)
            p.data.copy_(param)
            masters.append(rem)
        params.append(p)
        formats.append(sf.format_column(moment_format, remainder, block_size))
    kept = (3 if amsgrad else 2) if algorithm == "adam" else 1
    return {"params": params, "states": states[:kept], "absmax": absmax if moment_format == Q8 else [],
            "steps": steps if algorithm == "adam" or moment_format == BF16 else [], "masters": masters,
            "formats": formats,
            "block_size": block_size, "moment_format": moment_format, "remainder": remainder}


def mirror(algorithm, case, h, *, sr_seed=0, nearest=False, fresh=None):
    """state_format_cases.mirror_step, which widens and narrows two moments at most, extended to amsgrad's
    max_exp_avg_sq (float32 or bfloat16 like the others; key 2)."""
    if len(case["states"]) < 3:
        return C.mirror_step("cpu", algorithm, case, h, sr_seed=sr_seed, state_round_nearest=nearest, fresh=fresh)
    out = C.clone_case(case)
    wide = [[s.float() for s in col] for col in case["states"]]
    masters = []
    if case["remainder"]:
        masters = [sf.join_remainder(p, r) for p, r in zip(out["params"], case["masters"], strict=True)]
    C.run_bucket("cpu", algorithm, out["params"], wide, out["steps"], h, masters=masters, sr_seed=sr_seed)
    for i, m in enumerate(masters):
        out["params"][i].data.copy_(sf.split_remainder(m)[0])
        out["masters"][i] = sf.split_remainder(m)[1]
    for k, col in enumerate(wide):
        for i, w in enumerate(col):
            if case["moment_format"] == F32:
                out["states"][k][i] = w
            elif nearest:
                out["states"][k][i] = w.bfloat16()
            else:
                key = sf.state_key(sf.rounding_key(sr_seed, int(out["steps"][i].item()), i), k)
                out["states"][k][i] = sf.bf16_stochastic(w, key)
    return out


def run_steps(algorithm, case, h, *, steps=STEPS, sr_seed=0, nearest=False, fresh_first=False):
    """`steps` consecutive formatted steps, each checked against the mirror of the same input."""
    for step in range(steps):
        fresh = None
        if algorithm == "sgd":
            fresh = [1 if fresh_first and step == 0 else 0] * len(case["params"])
        got = C.formatted_step("cpu", algorithm, case, h, sr_seed=sr_seed, fresh=fresh)
        C.assert_same(got, mirror(algorithm, case, h, sr_seed=sr_seed, nearest=nearest, fresh=fresh))
        case = got
    return case


def _states_changed(before, after):
    """The step did write the formatted states (not a vacuous pass)."""
    for col_a, col_b in zip(before["states"], after["states"], strict=True):
        for a, b in zip(col_a, col_b, strict=True):
            if a.numel() > 1 and torch.equal(a, b):
                return False
    return True


ADAM_VARIANTS = {
    "adamw": {},
    "adam_l2_maximize": {"decoupled_weight_decay": False, "maximize": True},
    "no_weight_decay": {"weight_decay": 0.0},
}


@pytest.mark.parametrize("variant", sorted(ADAM_VARIANTS))
@pytest.mark.parametrize("block_size", [64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_adam_8bit(dtype, block_size, variant):
    case = make_case(dtype, NUMELS if variant == "adamw" else SMALL, Q8, block_size=block_size)
    out = run_steps("adam", case, C.hyper("adam", **ADAM_VARIANTS[variant]))
    assert _states_changed(case, out)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("nearest", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_adam_bfloat16_moments(dtype, nearest, amsgrad):
    case = make_case(dtype, NUMELS if not amsgrad else SMALL, BF16, amsgrad=amsgrad)
    out = run_steps("adam", case, C.hyper("adam", state_round_nearest=nearest, amsgrad=amsgrad), sr_seed=1234,
                    nearest=nearest)
    assert _states_changed(case, out)


@pytest.mark.parametrize("moment_format,amsgrad", [(F32, False), (F32, True), (BF16, False), (BF16, True),
                                                    (Q8, False)])  # 8-bit + amsgrad is refused (another test)
def test_adam_remainder_master(moment_format, amsgrad):
    case = make_case(torch.bfloat16, SMALL + (5000,), moment_format, block_size=64, remainder=True, amsgrad=amsgrad)
    out = run_steps("adam", case, C.hyper("adam", amsgrad=amsgrad), sr_seed=7)
    for i, p in enumerate(case["params"]):
        assert not torch.equal(sf.join_remainder(p, case["masters"][i]),
                               sf.join_remainder(out["params"][i], out["masters"][i]))


def test_adam_stochastic_param_with_formatted_moments():
    # a bfloat16 param without a master rounded stochastically (its bits keyed on the element index) next to
    # bfloat16 and 8-bit moments, whose stages must keep the element indices global
    h = C.hyper("adam", stochastic_rounding=True)
    run_steps("adam", make_case(torch.bfloat16, NUMELS, BF16, seed=3), h, sr_seed=99)
    run_steps("adam", make_case(torch.bfloat16, NUMELS, Q8, seed=4, block_size=32), h, sr_seed=99)


SGD_VARIANTS = {
    "momentum": {},
    "nesterov": {"nesterov": True},
    "dampening_maximize": {"dampening": 0.1, "maximize": True, "weight_decay": 0.0},
}


@pytest.mark.parametrize("variant", sorted(SGD_VARIANTS))
@pytest.mark.parametrize("block_size", [64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_sgd_8bit(dtype, block_size, variant):
    case = make_case(dtype, NUMELS if variant == "momentum" else SMALL, Q8, block_size=block_size,
                     algorithm="sgd")
    # the first step creates the buffers (fresh): the stored codes are not read, here not even valid
    for a in case["absmax"][0]:
        a.fill_(float("nan"))
    out = run_steps("sgd", case, C.hyper("sgd", **SGD_VARIANTS[variant]), fresh_first=True)
    assert not any(a.isnan().any() for a in out["absmax"][0])


@pytest.mark.parametrize("nearest", [False, True])
@pytest.mark.parametrize("variant", sorted(SGD_VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_sgd_bfloat16_momentum(dtype, variant, nearest):
    case = make_case(dtype, NUMELS if variant == "momentum" else SMALL, BF16, algorithm="sgd")
    h = C.hyper("sgd", state_round_nearest=nearest, **SGD_VARIANTS[variant])
    out = run_steps("sgd", case, h, sr_seed=4321, nearest=nearest, fresh_first=True)
    assert _states_changed(case, out)
    assert [s.item() for s in out["steps"]] == [3.0 + STEPS] * len(NUMELS if variant == "momentum" else SMALL)


@pytest.mark.parametrize("moment_format", [F32, Q8, BF16])
def test_sgd_remainder_master(moment_format):
    case = make_case(torch.bfloat16, SMALL, moment_format, block_size=128, remainder=True, algorithm="sgd")
    run_steps("sgd", case, C.hyper("sgd", nesterov=True), fresh_first=True)


def _merge(cases):
    """One bucket of the tensors of several cases (formats per row); absmax lists hold empty tensors where a row
    is not 8-bit."""
    merged = {"params": [], "steps": [], "masters": [], "formats": [], "states": None, "absmax": [[], []]}
    columns = max(len(c["states"]) for c in cases)
    merged["states"] = [[] for _ in range(columns)]
    for c in cases:
        n = len(c["params"])
        merged["params"] += c["params"]
        merged["steps"] += c["steps"]
        merged["formats"] += c["formats"]
        merged["masters"] += c["masters"] if c["remainder"] else [torch.empty(0)] * n
        for k in range(columns):
            merged["states"][k] += c["states"][k]
        for k in range(2):
            merged["absmax"][k] += c["absmax"][k] if c["absmax"] else [torch.empty(0)] * n
    return merged


@pytest.mark.parametrize("algorithm", ["adam", "sgd"])
def test_mixed_formats_in_one_bucket(algorithm):
    # rows of every format (and two block sizes) in one launch give each case's own mirrored result; the case with
    # bfloat16 moments comes first so that its param ids (the stochastic rounding keys) match its mirror's
    bf16 = torch.bfloat16
    if algorithm == "adam":
        specs = [(BF16, True, 256), (Q8, False, 64), (Q8, True, 256), (F32, True, 256), (F32, False, 256)]
    else:
        specs = [(Q8, False, 64), (Q8, True, 256), (F32, True, 256), (F32, False, 256)]
    cases = [make_case(bf16, NUMELS if i == 1 else SMALL, f, seed=i, block_size=bs, remainder=r,
                       algorithm=algorithm) for i, (f, r, bs) in enumerate(specs)]
    h = C.hyper(algorithm)
    fresh = None if algorithm == "adam" else [0] * sum(len(c["params"]) for c in cases)
    native = load_extension()
    merged = _merge(cases)
    params = [p.detach().clone().requires_grad_(False) for p in merged["params"]]
    for p, q in zip(params, merged["params"], strict=True):
        p.grad = q.grad.clone()
    states = [[s.clone() for s in col] for col in merged["states"]]
    absmax = [[a.clone() for a in col] for col in merged["absmax"]]
    steps = [s.clone() for s in merged["steps"]]
    masters = [m.clone() for m in merged["masters"]]
    bucket = native.OptimBucket(params, states, steps, [0] * len(params), masters, list(range(len(params))),
                                merged["formats"], absmax, sf.qmap("cpu"))
    assert bucket.refresh_grads() == ""
    if algorithm == "adam":
        bucket.adam_step(h, sr_seed=5)
    else:
        bucket.sgd_step(h, fresh)
    at = 0
    for c in cases:
        n = len(c["params"])
        expected = mirror(algorithm, c, h, sr_seed=5, fresh=None if fresh is None else fresh[:n])
        got = {"params": params[at:at + n], "steps": steps[at:at + n] if c["steps"] else [],
               "masters": masters[at:at + n] if c["remainder"] else [],
               "states": [col[at:at + n] for col in states[:len(c["states"])]],
               "absmax": [col[at:at + n] for col in absmax] if c["absmax"] else []}
        C.assert_same(got, expected)
        at += n


def test_float32_bucket_unchanged():
    # explicit float32 formats take the float32 path itself: the same bits as a bucket without formats
    for algorithm in ("adam", "sgd"):
        case = make_case(torch.float32, NUMELS, F32, algorithm=algorithm, amsgrad=algorithm == "adam")
        h = C.hyper(algorithm, amsgrad=True) if algorithm == "adam" else C.hyper("sgd")
        fresh = None if algorithm == "adam" else [0] * len(NUMELS)
        plain = C.clone_case(case)
        C.run_bucket("cpu", algorithm, plain["params"], plain["states"], plain["steps"], h, fresh=fresh)
        C.assert_same(C.formatted_step("cpu", algorithm, case, h, fresh=fresh), plain)


@pytest.mark.parametrize("algorithm", ["adam", "sgd"])
def test_nan_gradient_poisons_its_block(algorithm):
    case = make_case(torch.float32, (1000, 300), Q8, block_size=64, algorithm=algorithm)
    case["params"][0].grad[130] = float("nan")  # block 2 of tensor 0
    h = C.hyper(algorithm)
    fresh = None if algorithm == "adam" else [0, 0]
    got = C.formatted_step("cpu", algorithm, case, h, fresh=fresh)
    C.assert_same(got, mirror(algorithm, case, h, fresh=fresh))
    nan_blocks = got["absmax"][0][0].isnan().nonzero().flatten().tolist()
    assert nan_blocks == [2]
    assert not got["absmax"][0][1].isnan().any()
    # the next step reads the whole block back as NaN
    again = C.formatted_step("cpu", algorithm, got, h, fresh=fresh)
    assert again["params"][0][128:192].isnan().all() and not again["params"][0][:128].isnan().any()


def test_found_inf_skip_writes_nothing():
    native = load_extension()
    case = make_case(torch.bfloat16, SMALL, Q8, block_size=64, remainder=True)
    out = C.clone_case(case)
    bucket = native.OptimBucket(out["params"], out["states"], out["steps"], [0] * len(SMALL), out["masters"],
                                list(range(len(SMALL))), out["formats"], out["absmax"], sf.qmap("cpu"))
    assert bucket.refresh_grads() == ""
    bucket.adam_step(C.hyper("adam"), found_inf=torch.ones(1))
    C.assert_same(out, case)


def test_every_cpu_capability():
    native = load_extension()
    best = native.cpu_capability()
    results = []
    try:
        for name in ("default", "avx2", "avx512"):
            try:
                native.set_cpu_capability(name)
            except RuntimeError:
                continue
            case = make_case(torch.bfloat16, SMALL + (5000,), Q8, block_size=32, remainder=True)
            out = run_steps("adam", case, C.hyper("adam", stochastic_rounding=True), steps=2)
            case = make_case(torch.float16, SMALL, BF16)
            run_steps("adam", case, C.hyper("adam"), steps=2, sr_seed=3)
            results.append(out)
    finally:
        native.set_cpu_capability(best)
    for out in results[1:]:  # the 8-bit searches (gathered, in registers, scalar) give the same codes
        C.assert_same(out, results[0])


def test_rejected_formats_write_nothing():
    native = load_extension()
    # a bfloat16 momentum buffer rounded stochastically keys its bits on its step: none given
    case = make_case(torch.float32, SMALL, BF16, algorithm="sgd")
    out = C.clone_case(case)
    bucket = native.OptimBucket(out["params"], out["states"], [], [0] * len(SMALL), [], list(range(len(SMALL))),
                                out["formats"], [], None)
    assert bucket.refresh_grads() == ""
    with pytest.raises(RuntimeError, match="bfloat16"):
        bucket.sgd_step(C.hyper("sgd"), [0] * len(SMALL))
    C.assert_same(out, case)
    # 8-bit moments never come with amsgrad's max_exp_avg_sq
    case = make_case(torch.float32, SMALL, Q8, amsgrad=True)
    case["states"][2] = [torch.zeros(n, dtype=torch.uint8) for n in SMALL]
    out = C.clone_case(case)
    bucket = native.OptimBucket(out["params"], out["states"], out["steps"], [0] * len(SMALL), [],
                                list(range(len(SMALL))), out["formats"], out["absmax"], sf.qmap("cpu"))
    assert bucket.refresh_grads() == ""
    with pytest.raises(RuntimeError, match="amsgrad"):
        bucket.adam_step(C.hyper("adam", amsgrad=True))
    C.assert_same(out, case)

