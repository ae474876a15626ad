"""The Triton kernels' low-memory state formats (docs/state_formats.md), under the interpreter on CPU tensors: a
formatted step equals, bit for bit, the states widened by the torch mirror, the Triton float32 path run on them and
the results narrowed by the mirror (tests/state_format_cases.py), for every moment format, master remainders,
both optimizers, block sizes 64 and 256, odd sizes, buckets mixing every format, two consecutive steps."""

from __future__ import annotations

import pytest
import torch

import state_format_cases as cases
from fused_sched.backends.triton.launch import _INTERPRETER_CHUNK
from fused_sched.backends.triton.runner import TritonBucketRunner
from fused_sched.optim import state_format as sf

F32, BF16, Q8 = sf.FLOAT32, sf.BFLOAT16, sf.BLOCKWISE_8BIT
NUMELS = [1, 255, 257, 1000]
BIG = _INTERPRETER_CHUNK + 257  # one tensor over a chunk: two chunks, the second one partial


def make_case(dtype, numels, moment_format, **options):
    case = cases.make_case(dtype, numels, moment_format, **options)
    if not case["params"]:
        # state_format_cases.make_case builds the params but does not return them: the same draws again.
        gen = torch.Generator().manual_seed(options.get("seed", 0))
        for n in numels:
            p = torch.randn(n, generator=gen).to(dtype)
            p.grad = torch.randn(n, generator=gen).to(dtype)
            torch.randn(n, generator=gen), torch.rand(n, generator=gen)
            if options.get("remainder"):
                p.data.copy_(sf.split_remainder(p.float() + torch.randn(n, generator=gen) * 1e-3)[0])
            case["params"].append(p)
    return case


def assert_same(got, expected):
    # The steps are 0-dim tensors, which state_format_cases.assert_same cannot view as bytes.
    def flat(case):
        return dict(case, steps=[s.reshape(-1) for s in case["steps"]])

    cases.assert_same(flat(got), flat(expected))


def merge(parts):
    """One bucket of the tensors of several cases (each its own format): absmax and masters filled with empty
    tensors where a tensor has none."""
    out = {"params": [], "states": None, "absmax": [[], []], "steps": [], "masters": [], "formats": [],
           "block_size": parts[0]["block_size"]}
    for part in parts:
        n = len(part["params"])
        out["params"] += part["params"]
        out["steps"] += part["steps"] or [torch.zeros(0)] * n  # SGD: steps for bfloat16 buffers only
        out["formats"] += part["formats"]
        out["masters"] += part["masters"] or [torch.empty(0)] * n
        out["states"] = [a + b for a, b in zip(out["states"], part["states"], strict=True)] if out["states"] else \
            [list(col) for col in part["states"]]
        for k in range(2):
            out["absmax"][k] += part["absmax"][k] if part["absmax"] else [torch.empty(0)] * n
    if all(s.numel() == 0 for s in out["steps"]):
        out["steps"] = []
    return out


def mirror(algorithm, case, hyper, *, sr_seed=0, nearest=False, fresh=None):
    """mirror_step for a bucket of per-tensor formats (and amsgrad's third state): widen each tensor's states,
    the Triton float32 path, narrow each with its own format."""
    out = cases.clone_case(case)
    bs, formats = case["block_size"], case["formats"]
    eight = [(f & sf.MOMENT_FORMAT_MASK) == Q8 for f in formats]
    remainder = [bool(f & sf.MASTER_REMAINDER) for f in formats]
    wide = [[cases.widen(s, case["absmax"][k][i] if eight[i] else None, k == 0, bs) for i, s in enumerate(col)]
            for k, col in enumerate(out["states"])]  # widen() returns float32 states themselves: the copies
    masters = [sf.join_remainder(p, m) if r else m
               for p, m, r in zip(out["params"], out["masters"] or [torch.empty(0)] * len(formats), remainder,
                                  strict=True)]
    cases.run_bucket("triton", algorithm, out["params"], wide, out["steps"], hyper, masters=masters, fresh=fresh,
                     sr_seed=sr_seed)
    for i, r in enumerate(remainder):
        if r:
            param, out["masters"][i] = sf.split_remainder(masters[i])
            out["params"][i].data.copy_(param)
    for k, col in enumerate(wide):
        for i, w in enumerate(col):
            moments = formats[i] & sf.MOMENT_FORMAT_MASK
            if moments == Q8:
                out["states"][k][i], out["absmax"][k][i] = sf.quantize_blockwise(w, k == 0, bs)
            elif moments == BF16 and nearest:
                out["states"][k][i] = w.bfloat16()
            elif moments == BF16:
                key = sf.rounding_key(sr_seed, int(out["steps"][i].item()), i)
                out["states"][k][i] = sf.bf16_stochastic(w, sf.state_key(key, k))
            else:
                out["states"][k][i] = w
    return out


def with_amsgrad(case):
    """The case with max_exp_avg_sq (bfloat16 or float32 like the other moments), above exp_avg_sq or below."""
    gen = torch.Generator().manual_seed(7)
    case["states"].append([(s.float() * (0.5 + torch.rand(s.shape, generator=gen))).to(s.dtype)
                           for s in case["states"][1]])
    return case


def two_steps(algorithm, case, hyper, *, sr_seed=0, nearest=False, fresh=None, generic=False):
    """Two consecutive formatted steps, each against the mirror of the same starting point."""
    for step in range(2):
        if generic:
            expected = mirror(algorithm, case, hyper, sr_seed=sr_seed, nearest=nearest, fresh=fresh)
        else:
            # On a copy: mirror_step runs float32 states in place (widen() returns them themselves).
            expected = cases.mirror_step("triton", algorithm, cases.clone_case(case), hyper, sr_seed=sr_seed,
                                         state_round_nearest=nearest, fresh=fresh)
        got = cases.formatted_step("triton", algorithm, case, hyper, sr_seed=sr_seed, fresh=fresh)
        assert_same(got, expected)
        case, fresh = got, None
        for p in case["params"]:  # a new gradient for the second step
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step + 11)).to(p.dtype)
    return case


ADAM = [  # (param dtype, moment format, remainder, block size, state_round_nearest)
    (torch.float32, Q8, False, 64, False),
    (torch.float16, Q8, False, 256, False),
    (torch.bfloat16, Q8, False, 256, False),
    (torch.bfloat16, Q8, True, 64, False),
    (torch.float32, BF16, False, 256, False),
    (torch.float16, BF16, False, 256, True),
    (torch.bfloat16, BF16, False, 256, True),
    (torch.bfloat16, BF16, True, 256, False),
    (torch.bfloat16, F32, True, 256, False),
]


@pytest.mark.parametrize("dtype,moments,remainder,block_size,nearest", ADAM)
def test_adam(dtype, moments, remainder, block_size, nearest):
    case = make_case(dtype, NUMELS, moments, remainder=remainder, block_size=block_size)
    two_steps("adam", case, cases.hyper("adam", nearest), sr_seed=0x1234_5678_9ABC, nearest=nearest)


@pytest.mark.parametrize("dtype,moments,remainder", [(torch.float32, BF16, False), (torch.bfloat16, BF16, True),
                                                      (torch.bfloat16, F32, True)])
def test_adam_amsgrad(dtype, moments, remainder):
    case = with_amsgrad(make_case(dtype, NUMELS, moments, remainder=remainder))
    hyper = cases.hyper("adam", amsgrad=True, decoupled_weight_decay=False, maximize=True)
    two_steps("adam", case, hyper, sr_seed=3, generic=True)


SGD = [  # (param dtype, moment format, remainder, block size, nesterov, state_round_nearest)
    (torch.float32, Q8, False, 64, False, False),
    (torch.float16, Q8, False, 256, True, False),
    (torch.bfloat16, Q8, True, 256, False, False),
    (torch.bfloat16, Q8, False, 64, True, False),
    (torch.bfloat16, F32, True, 256, True, False),
    (torch.float32, BF16, False, 256, False, False),
    (torch.float16, BF16, False, 256, True, True),
    (torch.bfloat16, BF16, True, 256, False, False),
]


@pytest.mark.parametrize("dtype,moments,remainder,block_size,nesterov,nearest", SGD)
@pytest.mark.parametrize("fresh", [False, True])
def test_sgd(dtype, moments, remainder, block_size, nesterov, nearest, fresh):
    case = make_case(dtype, NUMELS, moments, remainder=remainder, block_size=block_size, algorithm="sgd")
    hyper = cases.hyper("sgd", nearest, nesterov=nesterov, dampening=0.0 if nesterov else 0.25)
    two_steps("sgd", case, hyper, sr_seed=0x5EED_0123_4567, nearest=nearest,
              fresh=[1] * len(NUMELS) if fresh else None)


@pytest.mark.parametrize("block_size", [64, 256])
def test_adam_mixed_bucket(block_size):
    """Every format in one launch, odd sizes and a tensor over a chunk; bfloat16 states of both roundings, and
    the params without a master rounded stochastically."""
    parts = [make_case(torch.bfloat16, numels, moments, remainder=remainder, block_size=block_size, seed=seed)
             for seed, (numels, moments, remainder) in enumerate([
                 ([257, BIG], Q8, False), ([1000], Q8, True), ([1, 255], BF16, False), ([BIG], BF16, True),
                 ([300], F32, True), ([257, 1], F32, False)])]
    case = merge(parts)
    for nearest in (False, True):
        hyper = cases.hyper("adam", nearest, stochastic_rounding=True)
        two_steps("adam", case, hyper, sr_seed=99, nearest=nearest, generic=True)


def test_sgd_mixed_bucket():
    parts = [make_case(torch.bfloat16, numels, moments, remainder=remainder, seed=seed, algorithm="sgd")
             for seed, (numels, moments, remainder) in enumerate([
                 ([BIG, 1], Q8, False), ([255], Q8, True), ([257], F32, True), ([1000], F32, False),
                 ([700, 1], BF16, False), ([129], BF16, True)])]
    case = merge(parts)
    two_steps("sgd", case, cases.hyper("sgd"), sr_seed=23, fresh=[1, 0, 1, 0, 0, 1, 0, 0], generic=True)


@pytest.mark.parametrize("algorithm,moments,remainder", [("adam", Q8, False), ("adam", BF16, True),
                                                         ("adam", Q8, True), ("sgd", Q8, True)])
def test_nan_gradient(algorithm, moments, remainder):
    """A NaN gradient: its 8-bit block reads back NaN (absmax NaN, codes 0), the master splits into a quiet NaN."""
    case = make_case(torch.bfloat16, [300, 1000], moments, remainder=remainder, block_size=64, algorithm=algorithm)
    case["params"][1].grad[70] = float("nan")
    got = cases.formatted_step("triton", algorithm, case, cases.hyper(algorithm), sr_seed=5)
    assert_same(got, cases.mirror_step("triton", algorithm, cases.clone_case(case), cases.hyper(algorithm), sr_seed=5))
    assert got["params"][1][70].isnan() and not got["params"][1][:64].isnan().any()
    if moments == Q8:
        assert got["absmax"][0][1][1].isnan() and not got["absmax"][0][1][0].isnan()
        assert (got["states"][0][1][64:128] == 0).all()
    if remainder:
        assert got["masters"][1][70] == 0


@pytest.mark.parametrize("algorithm", ["adam", "sgd"])
def test_remainder_ties(algorithm):
    """Elements whose master does not move (zero gradient and moment, no weight decay) keep their remainder, the
    ties -0x8000 (the param one above the master's high half) included."""
    case = make_case(torch.bfloat16, [257], BF16 if algorithm == "adam" else F32, remainder=True,
                     algorithm=algorithm)
    case["params"][0].grad[:100] = 0
    case["states"][0][0][:100] = 0
    case["masters"][0][:50] = -0x8000
    case["masters"][0][50:60] = 0x7FFF
    before = sf.join_remainder(case["params"][0], case["masters"][0])[:100]
    hyper = cases.hyper(algorithm, weight_decay=0.0)
    got = cases.formatted_step("triton", algorithm, case, hyper)
    assert_same(got, cases.mirror_step("triton", algorithm, cases.clone_case(case), hyper))
    assert torch.equal(got["masters"][0][:60], case["masters"][0][:60])
    assert torch.equal(sf.join_remainder(got["params"][0], got["masters"][0])[:100].view(torch.int32),
                       before.view(torch.int32))


def test_block_size_checks():
    with pytest.raises(ValueError, match="block_size"):
        TritonBucketRunner(torch.device("cpu"), torch.float32, "adam", block_size=512)
    case = make_case(torch.float32, [100], Q8, block_size=64)
    with pytest.raises(ValueError, match="block size"):
        cases.run_bucket("triton", "adam", case["params"], case["states"], case["steps"], cases.hyper("adam"),
                         formats=case["formats"], absmax=case["absmax"], block_size=256)
