"""The CUDA kernels' low-memory state formats (docs/state_formats.md), bit for bit against their mirror.

Each check runs one formatted step of a bucket through csrc/cuda/adam.cu or sgd.cu (on a GPU, or on CPU tensors under
the host emulation, tests/cuda_host_emulation.py) and compares it with the mirror of tests/state_format_cases.py:
the states widened by fused_sched/optim/state_format.py, the CUDA kernel's own float32 path run on them, the results
narrowed by the same rules. Two consecutive steps, odd sizes (lanes and 8-bit blocks cut short by the end of a
tensor), buckets mixing every format and block size, amsgrad, SGD's fresh buffers and Nesterov, misaligned tensors
(the element-by-element loads), NaN gradients, GradScaler's scale and a clip coefficient, found_inf, and a tensor
over two chunks.
"""

from __future__ import annotations

import pytest
import torch

import state_format_cases as cases
from fused_sched._extension import load_extension
from fused_sched.backends.cuda_backend import CudaBucketRunner
from fused_sched.optim import state_format as sf

F32, BF16, Q8 = sf.FLOAT32, sf.BFLOAT16, sf.BLOCKWISE_8BIT
NUMELS = [1, 255, 257, 1000]
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def make_case(dtype, numels, moment_format, *, seed=0, block_size=256, remainder=False, algorithm="adam"):
    """state_format_cases.make_case, with each param in the case (its loop leaves `params` empty)."""
    gen = torch.Generator().manual_seed(seed)
    case = cases.make_case(dtype, numels, moment_format, seed=seed, block_size=block_size, remainder=remainder,
                           algorithm=algorithm)
    if len(case["params"]) == len(numels):
        return case
    assert not case["params"], "make_case changed: drop this copy"
    for i, n in enumerate(numels):  # make_case's draws, in its order
        p = torch.randn(n, generator=gen).to(dtype)
        p.grad = torch.randn(n, generator=gen).to(dtype)
        torch.randn(n, generator=gen), torch.rand(n, generator=gen)  # its m and v
        if remainder:
            master = p.float() + torch.randn(n, generator=gen) * 1e-3
            p.data.copy_(sf.split_remainder(master)[0])
            assert torch.equal(case["masters"][i], sf.split_remainder(master)[1])
        case["params"].append(p)
    return case


def _device(case):
    """The case's tensors on the GPU when there is one (the emulation runs CPU tensors)."""
    if not torch.cuda.is_available():
        return case

    move = torch.Tensor.cuda
    out = cases.clone_case(case)
    params = []
    for p in case["params"]:
        q = p.detach().cuda()
        q.grad = p.grad.cuda()
        params.append(q)
    out["params"] = params
    out["states"] = [[move(s) for s in col] for col in case["states"]]
    out["absmax"] = [[move(a) for a in col] for col in case["absmax"]]
    out["steps"] = [move(s) for s in case["steps"]]
    out["masters"] = [move(m) for m in case["masters"]]
    return out


def assert_same(got, expected):
    """state_format_cases.assert_same, with the 0-dim steps as 1-d tensors (it views every tensor as bytes)."""
    cases.assert_same(*({**c, "steps": [s.reshape(-1) for s in c["steps"]]} for c in (got, expected)))


def _two_steps(algorithm, case, hyper_table, *, mirror, fresh=None, sr_seed=0):
    """Two formatted steps, each against the mirror of the same input."""
    got = cases.formatted_step("cuda", algorithm, case, hyper_table, sr_seed=sr_seed, fresh=fresh)
    assert_same(got, mirror(case, fresh))
    again = cases.formatted_step("cuda", algorithm, got, hyper_table, sr_seed=sr_seed)
    assert_same(again, mirror(got, None))
    return again


# -- one format per bucket: state_format_cases.mirror_step --

ADAM_UNIFORM = [
    # (param dtype, moment format, block size, remainder, state_round_nearest, stochastic param rounding)
    ("f32", BF16, 256, False, False, False),
    ("f32", BF16, 256, False, True, False),
    ("f32", Q8, 64, False, False, False),
    ("f32", Q8, 256, False, False, False),
    ("bf16", BF16, 256, False, False, True),
    ("bf16", Q8, 256, False, False, True),
    ("bf16", Q8, 64, False, False, False),
    ("f16", BF16, 256, False, True, False),
    ("f16", Q8, 64, False, False, False),
    ("bf16", F32, 256, True, False, False),
    ("bf16", BF16, 256, True, False, True),
    ("bf16", Q8, 64, True, False, False),
    ("bf16", Q8, 256, True, False, True),
]


def _case_id(values):
    names = {F32: "f32moments", BF16: "bf16moments", Q8: "8bit"}
    dtype, fmt, block, remainder, *flags = values
    out = [dtype, names[fmt] + (f"-{block}" if fmt == Q8 else "")]
    out += [name for name, on in zip(["remainder", "nearest", "sr-param"], [remainder, *flags], strict=False) if on]
    return "-".join(out)


@pytest.mark.parametrize("dtype,fmt,block,remainder,nearest,stochastic", ADAM_UNIFORM,
                         ids=[_case_id(v) for v in ADAM_UNIFORM])
def test_adam_formats_match_the_mirror(cuda_backend, dtype, fmt, block, remainder, nearest, stochastic):
    case = _device(make_case(DTYPES[dtype], NUMELS, fmt, seed=1, block_size=block, remainder=remainder))
    hyper_table = cases.hyper("adam", state_round_nearest=nearest, stochastic_rounding=stochastic)
    hyper_table = hyper_table.to(case["params"][0].device)

    def mirror(c, fresh):
        return cases.mirror_step("cuda", "adam", c, hyper_table, sr_seed=7, state_round_nearest=nearest)

    _two_steps("adam", case, hyper_table, mirror=mirror, sr_seed=7)


SGD_UNIFORM = [
    # (param dtype, moment format, block size, remainder)
    ("f32", Q8, 64, False),
    ("f32", Q8, 256, False),
    ("f16", Q8, 256, False),
    ("bf16", Q8, 64, True),
    ("bf16", F32, 256, True),
    ("f32", BF16, 256, False),
    ("bf16", BF16, 256, True),
]


# Every case kept and fresh, plain and Nesterov, except the fresh Nesterov step of low-precision params.
SGD_RUNS = [(*c, fresh, nesterov) for c in SGD_UNIFORM for fresh in (False, True) for nesterov in (False, True)
            if not (fresh and nesterov and c[0] != "f32")]


@pytest.mark.parametrize("dtype,fmt,block,remainder,fresh,nesterov", SGD_RUNS,
                         ids=[_case_id(r[:4]) + ("-fresh" if r[4] else "") + ("-nesterov" if r[5] else "")
                              for r in SGD_RUNS])
def test_sgd_formats_match_the_mirror(cuda_backend, dtype, fmt, block, remainder, fresh, nesterov):
    case = _device(make_case(DTYPES[dtype], NUMELS, fmt, seed=2, block_size=block, remainder=remainder,
                                   algorithm="sgd"))
    hyper_table = cases.hyper("sgd", nesterov=nesterov, dampening=0.0 if nesterov else 0.25)
    hyper_table = hyper_table.to(case["params"][0].device)
    fresh_flags = [1] * len(NUMELS) if fresh else None

    def mirror(c, flags):
        return cases.mirror_step("cuda", "sgd", c, hyper_table, fresh=flags, sr_seed=0x5EED)

    _two_steps("sgd", case, hyper_table, mirror=mirror, fresh=fresh_flags, sr_seed=0x5EED)


# -- buckets mixing formats (and amsgrad's third moment): a per-tensor mirror --

REM, MASTER = "remainder", "float32 master"


def _mixed_case(dtype, specs, algorithm="adam", amsgrad=False, seed=3):
    """One bucket of tensors of different formats: specs holds (numel, moment format, block size, master) where
    master is REM (int16 remainders), MASTER (a float32 master copy) or None."""
    parts = [make_case(dtype, [n], fmt, seed=seed + i, block_size=block, remainder=rem == REM, algorithm=algorithm)
             for i, (n, fmt, block, rem) in enumerate(specs)]
    columns = 2 if algorithm == "adam" else 1
    out = {"params": [], "states": [[] for _ in range(columns)], "absmax": [[], []], "steps": [], "masters": [],
           "formats": [], "block_size": 256, "moment_format": None, "remainder": None, "meta": []}
    any_master = any(rem for *_, rem in specs)
    for part, (n, fmt, block, rem) in zip(parts, specs, strict=True):
        out["params"] += part["params"]
        for k in range(columns):
            out["states"][k] += part["states"][k]
        for k in range(2):
            out["absmax"][k].append(part["absmax"][k][0] if part["absmax"] else torch.zeros(0))
        out["steps"] += part["steps"] or [torch.zeros(0)]  # SGD: a step for bfloat16 buffers only
        if any_master:
            if rem == MASTER:
                p = part["params"][0]
                noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(n)) * 1e-3
                out["masters"].append(p.float() + noise)
            else:
                out["masters"].append(part["masters"][0] if rem == REM else torch.zeros(0))
        out["formats"] += part["formats"]
        out["meta"].append((fmt, rem, block))
    if all(s.numel() == 0 for s in out["steps"]):
        out["steps"] = []
    if amsgrad:
        gen = torch.Generator().manual_seed(seed)
        col = []
        for v, (fmt, _, _) in zip(out["states"][1], out["meta"], strict=True):
            assert fmt != Q8, "8-bit states never have amsgrad"
            vmax = v.float() * (torch.rand(v.shape, generator=gen) + 0.5)  # above v for some, below for others
            col.append(vmax.to(v.dtype))
        out["states"].append(col)
    return out


def _run(algorithm, params, states, steps, hyper_table, *, masters=(), formats=(), absmax=(), fresh=None, sr_seed=0,
         **options):
    """state_format_cases.run_bucket("cuda", ...), with the launch's options (grad_scale, found_inf, clip_coef)."""
    eight_bit = any((f & sf.MOMENT_FORMAT_MASK) == Q8 for f in formats)
    bucket = load_extension().OptimBucket(
        list(params), [list(col) for col in states], list(steps), [0] * len(params), list(masters),
        list(range(len(params))), list(formats), [list(col) for col in absmax],
        sf.qmap(params[0].device) if eight_bit else None)
    assert bucket.refresh_grads() == ""
    runner = CudaBucketRunner(params[0].device, params[0].dtype, algorithm)
    runner.run(bucket, hyper_table, fresh, sr_seed=sr_seed, **options)


def _formatted(algorithm, case, hyper_table, *, sr_seed=0, fresh=None, **options):
    """state_format_cases.formatted_step("cuda", ...) with the launch's options."""
    out = cases.clone_case(case)
    _run(algorithm, out["params"], out["states"], out["steps"], hyper_table, masters=out["masters"],
         formats=out["formats"], absmax=out["absmax"], fresh=fresh, sr_seed=sr_seed, **options)
    return out


def _mixed_mirror(algorithm, case, hyper_table, *, sr_seed=0, nearest=False, fresh=None, options=None):
    """mirror_step with a format per tensor (and any number of moments), and the launch's options."""
    out = cases.clone_case(case)
    meta = case["meta"]

    def absmax(k, i):
        return case["absmax"][k][i] if meta[i][0] == Q8 else None

    wide = [[cases.widen(s, absmax(k, i), k == 0, meta[i][2]) for i, s in enumerate(col)]
            for k, col in enumerate(case["states"])]
    masters = []
    if case["masters"]:
        # remainders joined; float32 masters (or empty tensors) as they are, updated in place
        masters = [sf.join_remainder(p, m) if meta[i][1] == REM else m
                   for i, (p, m) in enumerate(zip(out["params"], out["masters"], strict=True))]
    _run(algorithm, out["params"], wide, out["steps"], hyper_table, masters=masters, fresh=fresh, sr_seed=sr_seed,
         **(options or {}))
    for i, m in enumerate(masters):
        if meta[i][1] == REM:
            out["params"][i].data.copy_(sf.split_remainder(m)[0])
            out["masters"][i] = sf.split_remainder(m)[1]
    for k, col in enumerate(wide):
        for i, w in enumerate(col):
            fmt, _, block = meta[i]
            if fmt == Q8:
                out["states"][k][i], out["absmax"][k][i] = sf.quantize_blockwise(w, k == 0, block)
            elif fmt == BF16:
                if nearest:
                    out["states"][k][i] = w.bfloat16()
                else:
                    key = sf.state_key(sf.rounding_key(sr_seed, int(out["steps"][i].item()), i), k)
                    out["states"][k][i] = sf.bf16_stochastic(w, key)
            else:
                out["states"][k][i] = w
    return out


MIXED_BF16 = [(1000, F32, 256, None), (257, BF16, 256, None), (255, Q8, 64, None), (1000, Q8, 256, REM),
              (1, Q8, 32, None), (300, F32, 256, REM), (513, BF16, 256, REM), (129, Q8, 128, REM),
              (600, Q8, 64, MASTER), (200, BF16, 256, MASTER)]
MIXED_F32 = [(255, Q8, 256, None), (1, BF16, 256, None), (1000, Q8, 32, None), (257, F32, 256, None),
             (700, Q8, 128, None)]
MIXED_F16 = [(257, Q8, 64, MASTER), (1000, BF16, 256, MASTER), (255, F32, 256, None), (1, Q8, 256, None),
             (300, BF16, 256, None)]


@pytest.mark.parametrize("dtype,specs", [("bf16", MIXED_BF16), ("f32", MIXED_F32), ("f16", MIXED_F16)],
                         ids=["bf16", "f32", "f16"])
def test_adam_bucket_mixing_formats(cuda_backend, dtype, specs):
    case = _device(_mixed_case(DTYPES[dtype], specs))
    hyper_table = cases.hyper("adam", stochastic_rounding=True).to(case["params"][0].device)

    def mirror(c, fresh):
        return _mixed_mirror("adam", c, hyper_table, sr_seed=11)

    _two_steps("adam", case, hyper_table, mirror=mirror, sr_seed=11)


def test_sgd_bucket_mixing_formats(cuda_backend):
    specs = [(1000, Q8, 64, REM), (257, F32, 256, None), (255, Q8, 256, None), (1, F32, 256, REM),
             (513, Q8, 32, None), (300, Q8, 128, MASTER), (700, BF16, 256, None), (129, BF16, 256, REM)]
    case = _device(_mixed_case(torch.bfloat16, specs, algorithm="sgd"))
    hyper_table = cases.hyper("sgd", nesterov=True).to(case["params"][0].device)
    fresh = [1, 0, 1, 0, 0, 1, 1, 0]

    def mirror(c, flags):
        return _mixed_mirror("sgd", c, hyper_table, fresh=flags, sr_seed=23)

    _two_steps("sgd", case, hyper_table, mirror=mirror, fresh=fresh, sr_seed=23)


@pytest.mark.parametrize("dtype,specs,nearest", [
    ("f32", [(257, BF16, 256, None), (1000, BF16, 256, None), (1, F32, 256, None)], False),
    ("bf16", [(255, F32, 256, REM), (1000, BF16, 256, REM), (257, BF16, 256, None)], True),
], ids=["f32-stochastic", "bf16-nearest"])
def test_adam_amsgrad(cuda_backend, dtype, specs, nearest):
    case = _device(_mixed_case(DTYPES[dtype], specs, amsgrad=True))
    hyper_table = cases.hyper("adam", amsgrad=True, state_round_nearest=nearest).to(case["params"][0].device)

    def mirror(c, fresh):
        return _mixed_mirror("adam", c, hyper_table, sr_seed=5, nearest=nearest)

    _two_steps("adam", case, hyper_table, mirror=mirror, sr_seed=5)


# -- misaligned tensors and NaN gradients --

def _misaligned(case):
    """The case's tensors as views one element into larger buffers: every lane loads element by element."""
    def shifted(t):
        if t.numel() == 0:
            return t
        buf = torch.zeros(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        return view

    out = cases.clone_case(case)
    params = []
    for p in case["params"]:
        q = shifted(p.detach())
        q.grad = shifted(p.grad)
        params.append(q)
    out["params"] = params
    out["states"] = [[shifted(s) for s in col] for col in case["states"]]
    out["masters"] = [shifted(m) for m in case["masters"]]
    return out


@pytest.mark.parametrize("algorithm", ["adam", "sgd"])
def test_misaligned_tensors(cuda_backend, algorithm):
    specs = [(1000, Q8, 64, REM), (257, F32, 256, REM), (255, Q8, 256, None)]
    if algorithm == "adam":
        specs.append((300, BF16, 256, REM))
    case = _device(_mixed_case(torch.bfloat16, specs, algorithm=algorithm))
    hyper_table = cases.hyper(algorithm).to(case["params"][0].device)
    got = _misaligned(case)  # run in place: formatted_step's copies would be aligned again
    assert all(p.data_ptr() % 16 for p in got["params"])
    cases.run_bucket("cuda", algorithm, got["params"], got["states"], got["steps"], hyper_table,
                     masters=got["masters"], formats=got["formats"], absmax=got["absmax"], sr_seed=3)
    assert_same(got, _mixed_mirror(algorithm, case, hyper_table, sr_seed=3))


@pytest.mark.parametrize("algorithm", ["adam", "sgd"])
def test_nan_gradient_poisons_its_block_only(cuda_backend, algorithm):
    specs = [(1000, Q8, 64, None), (257, Q8, 256, None)]
    if algorithm == "adam":
        specs.append((300, BF16, 256, None))
    case = _device(_mixed_case(torch.float32, specs, algorithm=algorithm))
    case["params"][0].grad[70] = float("nan")
    case["params"][1].grad[256] = float("nan")  # the last block, of one element
    if algorithm == "adam":
        case["params"][2].grad[5] = float("nan")
    hyper_table = cases.hyper(algorithm).to(case["params"][0].device)

    def mirror(c, fresh):
        return _mixed_mirror(algorithm, c, hyper_table)

    got = _two_steps(algorithm, case, hyper_table, mirror=mirror)
    absmax0 = got["absmax"][0]
    assert absmax0[0].isnan().tolist() == [i == 1 for i in range(16)]  # block 1 of 64 holds element 70
    assert absmax0[1].isnan().tolist() == [False, True]
    assert not got["params"][0][128:].isnan().any()


@pytest.mark.parametrize("algorithm", ["adam", "sgd"])
def test_grad_scale_and_clip_coefficient(cuda_backend, algorithm):
    specs = [(1000, Q8, 64, REM), (257, F32, 256, REM), (255, Q8, 256, None)]
    if algorithm == "adam":
        specs.append((300, BF16, 256, None))
    case = _device(_mixed_case(torch.bfloat16, specs, algorithm=algorithm))
    device = case["params"][0].device
    hyper_table = cases.hyper(algorithm).to(device)
    options = {"grad_scale": torch.tensor([8.0], device=device), "clip_coef": torch.tensor([0.3], device=device)}
    got = _formatted(algorithm, case, hyper_table, sr_seed=9, **options)
    expected = _mixed_mirror(algorithm, case, hyper_table, sr_seed=9, options=options)
    assert_same(got, expected)
    for a, b, before in zip(got["params"], expected["params"], case["params"], strict=True):
        assert torch.equal(a.grad.view(torch.int16), b.grad.view(torch.int16))  # prescaled grads written back
        assert not torch.equal(a.grad, before.grad)


def test_found_inf_skips_formatted_rows(cuda_backend):
    specs = [(1000, Q8, 64, REM), (257, BF16, 256, REM), (255, F32, 256, REM)]
    case = _device(_mixed_case(torch.bfloat16, specs))
    device = case["params"][0].device
    got = _formatted("adam", case, cases.hyper("adam").to(device), found_inf=torch.tensor([1.0], device=device))
    assert_same(got, case)


def test_two_chunks(cuda_backend):
    """A tensor over two chunks (CHUNK_ELEMENTS = 65536): the second chunk's blocks, lanes and absmax entries."""
    specs = [(65536 + 257, Q8, 32, REM), (65536 + 1, BF16, 256, None), (1000, Q8, 256, None)]
    case = _device(_mixed_case(torch.bfloat16, specs))
    hyper_table = cases.hyper("adam").to(case["params"][0].device)
    got = cases.formatted_step("cuda", "adam", case, hyper_table, sr_seed=2)
    assert_same(got, _mixed_mirror("adam", case, hyper_table, sr_seed=2))
