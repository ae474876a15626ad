"""Device schedule programs in Triton (fused_sched/backends/triton/schedule.py): the evaluation against the C++ op
(schedule_math.h) and the Python mirror (_schedule_program.evaluate_reference), and the scheduled Triton update
kernels against the CPU op. Without a GPU these run on CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1, set by conftest.py); with one, the Triton side runs on CUDA tensors.

The C++ and Python evaluations call libm's cos and pow, the Triton one computes them correctly rounded (see
triton/libm.py); glibc misrounds about 2 in 1000, so the three may differ by one float64 ulp, practically never
in the float32 value a kernel uses.
"""

import math

import pytest
import torch

import fused_sched._C  # noqa: F401  (registers torch.ops.fused_sched)
from fused_sched import _schedule_program as sp
from fused_sched import backends

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402  (after the skip)

from fused_sched.backends import device_tables  # noqa: E402
from fused_sched.backends.triton import adam as triton_adam  # noqa: E402
from fused_sched.backends.triton import libm as triton_libm  # noqa: E402
from fused_sched.backends.triton import schedule as triton_schedule  # noqa: E402
from fused_sched.backends.triton import sgd as triton_sgd  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = [
    pytest.mark.skipif(DEVICE == "cpu" and not backends.triton_interpreted(),
                       reason="Triton on CPU tensors needs TRITON_INTERPRET=1"),
    # The interpreter's numpy warns about the infinities and NaNs some cases produce on purpose.
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

Seg = sp.Segment

# Steps at which every program is evaluated: t = 0, fractional steps, the bounds 10 and 60 of the shifted
# segments below, the ends of the schedules (30, 90, 100) and far past them.
STEPS = [0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 7.25, 9.0, 10.0, 11.0, 17.0, 29.0, 30.0, 31.0, 45.0, 59.0, 60.0, 61.0, 89.0,
         99.0, 100.0, 101.0, 150.0, 1000.0, 123456.0]

# Parameter sets per kind (see schedule_math.h for their meaning).
PARAMS = {
    sp.CONST: [(0.1,), (3e-4,)],
    sp.STEP: [(0.1, 0.5, 7.0), (1.0, 0.1, 30.0), (0.05, 0.9, 1.0)],
    sp.EXPONENTIAL: [(0.1, 0.95), (1e-3, 1.02), (1.0, 0.5)],
    sp.LINEAR: [(0.1, 1.0 / 3.0, 1.0, 5.0), (0.01, 1.0, 0.1, 20.0)],
    sp.POLYNOMIAL: [(0.1, 50.0, 1.0), (0.1, 50.0, 2.5), (1.0, 13.0, 0.5)],
    sp.COSINE: [(0.1, 0.0, 100.0), (0.1, 1e-3, 7.0), (3e-4, 1e-5, 30.0)],
    sp.WARM_RESTARTS: [(0.1, 0.0, 10.0, 1.0), (0.1, 1e-4, 5.0, 2.0), (1.0, 0.01, 3.0, 3.0)],
    sp.CYCLIC: [(1e-3, 6e-3, 20.0, 0.5, 0.0, 1.0), (1e-3, 6e-3, 10.0, 0.3, 1.0, 1.0),
                (1e-3, 6e-3, 16.0, 0.75, 2.0, 0.99)],
    sp.ANNEAL_COS: [(0.1, 0.004, 0.0, 30.0), (0.004, 1e-6, 30.0, 100.0)],
    sp.ANNEAL_LINEAR: [(0.1, 0.004, 0.0, 30.0), (0.004, 1e-6, 30.0, 100.0)],
    sp.HF_WARMUP: [(0.1, 10.0), (5e-5, 1.0)],
    sp.HF_LINEAR_DECAY: [(0.1, 100.0, 90.0), (1.0, 50.0, 1.0)],
    sp.HF_COSINE: [(0.1, 10.0, 90.0, 0.5, 0.0, 0.0), (0.1, 10.0, 90.0, 0.5, 0.1, 0.0),
                   (0.1, 10.0, 90.0, 2.0, 0.0, 1.0)],
    sp.HF_COSINE_RESTARTS: [(0.1, 10.0, 90.0, 3.0), (0.1, 0.0, 50.0, 1.0)],
    sp.HF_POLYNOMIAL: [(0.1, 0.1, 1e-7, 1.0, 10.0, 100.0), (0.1, 0.1, 1e-4, 2.5, 0.0, 60.0),
                       (3e-4, 3e-4, 0.0, 0.5, 5.0, 40.0)],
    sp.HF_INVERSE_SQRT: [(0.1, 10.0, 10.0), (0.1, 0.0, 1.0)],
    sp.HF_WARMUP_RATE: [(0.1, 0.1, 10.0), (1.0, 0.0, 5.0)],
    sp.WSD: [(0.1, 0.0, 10.0, 0.0, 1.0, 0.0, 0.5), (0.1, 0.0, 10.0, 1.0, 1.0, 0.0, 0.5),
             (0.1, 0.0, 10.0, 2.0, 1.0, 0.0, 0.5), (0.1, 80.0, 20.0, 0.0, 0.0, 0.1, 0.5),
             (0.1, 80.0, 20.0, 1.0, 0.0, 0.1, 0.5), (0.1, 80.0, 20.0, 2.0, 0.0, 0.0, 0.5)],
}


def _ulps(a: float, b: float) -> float:
    """Distance of two float64 values in ulps of the larger (0 for two NaNs, inf for NaN or infinity vs other)."""
    if math.isnan(a) or math.isnan(b):
        return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
    if a == b:
        return 0.0
    if math.isinf(a) or math.isinf(b):
        return math.inf
    return abs(a - b) / math.ulp(max(abs(a), abs(b)))


def _same_float32(a: float, b: float) -> bool:
    x, y = torch.tensor([a, b], dtype=torch.float64).float().tolist()
    return x == y or (math.isnan(x) and math.isnan(y))


def _reference(program: sp.Program, t: float) -> tuple[float, float] | None:
    """evaluate_reference, or None where Python raises instead of returning inf or NaN (1 / 0.0, sqrt(-1),
    overflowing pow)."""
    try:
        return sp.evaluate_reference(program, t)
    except (ZeroDivisionError, ValueError, OverflowError):
        return None


def _compare(table: torch.Tensor, programs: list[sp.Program] | None, steps=STEPS) -> dict:
    """Evaluates `table` at every step with the C++ op, the Triton code and (given the programs) the Python
    mirror; asserts they agree to 1 float64 ulp and to the float32 bit. Returns counts for the caller's checks."""
    stats = {"values": 0, "exact": 0, "max_ulps": 0.0}
    device_table = table.to(DEVICE)
    for t in steps:
        cpp = torch.ops.fused_sched.evaluate_schedule(table, torch.tensor([t], dtype=torch.float64)).tolist()
        tri = triton_schedule.evaluate_schedule_triton(device_table, t).cpu().tolist()
        for g, (cpp_row, tri_row) in enumerate(zip(cpp, tri, strict=True)):
            rows = [("triton", tri_row)]
            ref = None if programs is None else _reference(programs[g], t)
            if ref is not None:
                rows.append(("python", ref))
            for name, row in rows:
                for target in range(2):
                    a, b = cpp_row[target], row[target]
                    d = _ulps(a, b)
                    assert d <= 1.0 and _same_float32(a, b), (
                        f"group {g} target {target} at t={t}: C++ {a!r}, {name} {b!r} ({d} ulps)")
                    if name == "triton":
                        stats["values"] += 1
                        stats["exact"] += d == 0.0
                        stats["max_ulps"] = max(stats["max_ulps"], d)
    return stats


@pytest.mark.parametrize("kind", sorted(PARAMS), ids=lambda k: f"kind{k}")
def test_segment_kinds_agree(kind):
    segments = [Seg(kind, params) for params in PARAMS[kind]]
    # The first parameter set again as the second phase of a SequentialLR (active on [10, 60), local time t - 10)
    # and as a momentum program.
    segments.append(Seg(kind, PARAMS[kind][0]).shifted(10.0, hi=60.0))
    segments.append(Seg(kind, PARAMS[kind][0], target=sp.MOMENTUM))
    programs = [sp.Program([s]) for s in segments]
    stats = _compare(sp.pack(programs), programs)
    # Correctly rounded vs glibc: all but a rare value agree to the bit.
    assert stats["exact"] >= 0.98 * stats["values"]


def test_programs_combine_segments():
    warmup_cosine = [Seg(sp.HF_WARMUP, (0.1, 10.0), hi=10.0), Seg(sp.COSINE, (0.1, 1e-4, 90.0)).shifted(10.0)]
    one_cycle = [  # lr up then down, momentum down then up, in two phases each
        Seg(sp.ANNEAL_COS, (0.004, 0.1, 0.0, 29.0), hi=29.0),
        Seg(sp.ANNEAL_COS, (0.1, 4e-7, 29.0, 99.0), lo=29.0),
        Seg(sp.ANNEAL_COS, (0.95, 0.85, 0.0, 29.0), hi=29.0, target=sp.MOMENTUM),
        Seg(sp.ANNEAL_COS, (0.85, 0.95, 29.0, 99.0), lo=29.0, target=sp.MOMENTUM),
    ]
    programs = [
        sp.Program(warmup_cosine),
        sp.Program(one_cycle),
        # ChainedScheduler: a SET then factors; a factor before the SET is overwritten by it
        sp.Program([Seg(sp.EXPONENTIAL, (0.9,), combine=sp.MUL), Seg(sp.COSINE, (0.1, 0.0, 50.0)),
                    Seg(sp.STEP, (1.0, 0.5, 10.0), combine=sp.MUL), Seg(sp.EXPONENTIAL, (1.0, 0.99), combine=sp.MUL)]),
        # factors only: no value is set (NaN)
        sp.Program([Seg(sp.EXPONENTIAL, (1.0, 0.99), combine=sp.MUL)]),
        # cyclic momentum with a multiplied lr
        sp.Program([Seg(sp.CONST, (0.01,)), Seg(sp.LINEAR, (1.0, 0.1, 1.0, 20.0), combine=sp.MUL),
                    Seg(sp.CYCLIC, (0.8, 0.9, 20.0, 0.5, 0.0, 1.0), target=sp.MOMENTUM),
                    Seg(sp.CYCLIC, (1.0, 1.1, 10.0, 0.5, 0.0, 1.0), target=sp.MOMENTUM, combine=sp.MUL)]),
        sp.Program([]),
    ]
    stats = _compare(sp.pack(programs), programs)
    assert stats["max_ulps"] <= 1.0


def test_end_rows_unknown_kinds_and_empty_tables():
    table = sp.pack([sp.Program([Seg(sp.CONST, (0.5,)), Seg(sp.CONST, (0.25,), target=sp.MOMENTUM)])])
    table[0, 1] = 0.0  # an END row between the two segments: the momentum segment is never reached
    for t in (0.0, 3.0):
        out = triton_schedule.evaluate_schedule_triton(table.to(DEVICE), t).cpu()
        assert out[0, 0].item() == 0.5 and math.isnan(out[0, 1].item())
    _compare(table, None, steps=[0.0, 3.0])
    # a kind the header does not know evaluates to NaN (its default case), and sets the value
    unknown = sp.pack([sp.Program([Seg(sp.CONST, (0.5,))])])
    unknown[0, 0, sp.KIND] = 99.0
    assert math.isnan(triton_schedule.evaluate_schedule_triton(unknown.to(DEVICE), 1.0)[0, 0].item())
    _compare(unknown, None, steps=[1.0])
    # one END row per group (segments == 1), and no group at all
    _compare(sp.pack([sp.Program([]), sp.Program([])]), None, steps=[0.0])
    no_group = torch.zeros(0, 1, sp.COLUMNS, dtype=torch.float64, device=DEVICE)
    assert triton_schedule.evaluate_schedule_triton(no_group, 0.0).shape == (0, 2)


@triton.jit
def _libm_kernel(x_ptr, y_ptr, out_ptr, POW: tl.constexpr):
    i = tl.program_id(0)
    x = tl.load(x_ptr + i)
    if POW:
        tl.store(out_ptr + i, triton_libm._pow(x, tl.load(y_ptr + i)))
    else:
        tl.store(out_ptr + i, triton_libm._cos(x))


@pytest.mark.parametrize("which", ["cos", "pow"])
def test_libm_functions_match_c(which):
    """The double-double cos and pow against C's (Python's math calls libm): 1 ulp at most, mostly equal."""
    g = torch.Generator().manual_seed(0)
    if which == "cos":
        xs = (torch.rand(120, generator=g, dtype=torch.float64) * 8 - 4).tolist()
        xs += [math.pi * k / n for k, n in ((1, 2), (1, 1), (3, 2), (7, 3), (1000, 7), (123457, 10))]
        xs += [0.0, -0.0, 1e-300, 3e5, -1e7]
        pairs = [(x, 0.0) for x in xs]
    else:
        bases = torch.rand(60, generator=g, dtype=torch.float64).tolist()
        powers = (torch.rand(60, generator=g, dtype=torch.float64) * 3).tolist()
        pairs = list(zip(bases, powers, strict=True))
        pairs += [(b, float(n)) for b, n in ((0.1, 3), (0.5, 7), (0.9, 1000), (0.95, -20), (1.02, 5000), (2.0, -1074),
                                             (10.0, 308), (10.0, 309), (0.5, 1075), (1e-310, 0.5), (3.0, 0.5))]
        # C's special cases (pow(0, -1) is inf in C, an error in Python; checked separately below)
        pairs += [(0.0, 2.0), (0.0, 0.5), (1.0, 7.3), (2.0, 0.0), (-2.0, 3.0), (-2.0, 2.0), (-2.0, 0.5),
                  (math.inf, 2.0), (math.inf, -1.0), (math.nan, 1.0), (1.0, math.nan), (math.nan, 0.0)]
    x = torch.tensor([p[0] for p in pairs], dtype=torch.float64, device=DEVICE)
    y = torch.tensor([p[1] for p in pairs], dtype=torch.float64, device=DEVICE)
    out = torch.empty_like(x)
    _libm_kernel[(len(pairs),)](x, y, out, POW=which == "pow", enable_fp_fusion=False)
    exact = 0
    for (a, b), got in zip(pairs, out.cpu().tolist(), strict=True):
        try:
            want = math.pow(a, b) if which == "pow" else math.cos(a)
        except OverflowError:
            want = math.inf
        except ValueError:
            want = math.nan
        assert _ulps(got, want) <= 1.0, f"{which}({a!r}, {b!r}) = {got!r}, C gives {want!r}"
        exact += _ulps(got, want) == 0.0
    assert exact >= len(pairs) - 2
    if which == "pow":
        zero = torch.tensor([0.0], dtype=torch.float64, device=DEVICE)
        _libm_kernel[(1,)](zero, zero - 1.0, out, POW=True, enable_fp_fusion=False)
        assert out[0].item() == math.inf


# --- the scheduled update kernels against the CPU op -------------------------------------------------------------

BLOCK, CHUNK = 256, 1024  # several chunks per tensor: every chunk evaluates its group's program
SIZES = [(), (7,), (300,), (3000,), (2, 700)]
GROUP_OF = [0, 1, 2, 1, 0]
T_STEPS = [0.0, 1.0, 5.0, 12.0, 40.0]

ADAM_PROGRAMS = [
    sp.Program([Seg(sp.HF_WARMUP, (1e-2, 3.0), hi=3.0), Seg(sp.COSINE, (1e-2, 1e-4, 30.0)).shifted(3.0)]),
    sp.Program([Seg(sp.ANNEAL_COS, (4e-4, 1e-2, 0.0, 9.0), hi=9.0), Seg(sp.ANNEAL_COS, (1e-2, 4e-8, 9.0, 50.0), lo=9.0),
                Seg(sp.ANNEAL_COS, (0.95, 0.85, 0.0, 9.0), hi=9.0, target=sp.MOMENTUM),
                Seg(sp.ANNEAL_COS, (0.85, 0.95, 9.0, 50.0), lo=9.0, target=sp.MOMENTUM)]),
    sp.Program([Seg(sp.EXPONENTIAL, (1.0, 0.9), combine=sp.MUL)]),  # sets nothing: the table's lr stays
]
SGD_PROGRAMS = [
    sp.Program([Seg(sp.STEP, (0.05, 0.5, 4.0)),
                Seg(sp.HF_POLYNOMIAL, (1.0, 1.0, 0.1, 2.0, 0.0, 60.0), combine=sp.MUL)]),
    sp.Program([Seg(sp.CYCLIC, (1e-3, 2e-2, 8.0, 0.5, 1.0, 1.0)),
                Seg(sp.CYCLIC, (0.9, 0.8, 8.0, 0.5, 1.0, 1.0), target=sp.MOMENTUM)]),
    sp.Program([Seg(sp.CONST, (0.0,), target=sp.MOMENTUM, lo=5.0)]),  # momentum switched off from step 5
]


def _addresses(params, grads, states, steps, fresh=None):
    def address(t):
        return 0 if t is None or t.numel() == 0 else t.data_ptr()

    # Columns 10-13 (state format, 8-bit scales, code table): float32 states; 14: SGD's fresh flags.
    rows = [[address(p), address(grads[i]), *(address(s[i]) for s in states), steps[i], p.numel(), GROUP_OF[i], 0, i,
             0, 0, 0, 0, fresh[i] if fresh else 0] for i, p in enumerate(params)]
    return torch.tensor(rows, dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_scheduled_adam_matches_cpu_op(dtype):
    # The table's lr (1.0) is far from the schedules' and beta1 (0.5) from the momentum program's: a kernel that
    # ignored a value the schedule sets would not match.
    hyper = torch.tensor([[1.0, 0.5, 0.999, 1e-8, 0.1, 0.0, 0.0, 8.0],  # AdamW
                          [1.0, 0.5, 0.99, 1e-6, 0.0, 0.0, 0.0, 1.0],  # Adam, amsgrad
                          [3e-3, 0.9, 0.999, 1e-8, 0.01, 0.0, 0.0, 0.0]], dtype=torch.float64)  # Adam, L2
    ref = [[torch.randn(s).to(dtype) for s in SIZES], [torch.randn(s) * 0.1 for s in SIZES],
           [torch.rand(s) * 0.01 for s in SIZES], [torch.rand(s) * 0.01 for s in SIZES],
           [torch.tensor(3.0) for _ in SIZES]]
    ours = [[t.clone().to(DEVICE) for t in ts] for ts in ref]
    table = _addresses(ours[0], ours[0], ours[1:4], [s.data_ptr() for s in ours[4]])
    chunks = device_tables.build_chunks([p.numel() for p in ours[0]], CHUNK).to(DEVICE)
    counter = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    schedule = sp.pack(ADAM_PROGRAMS)
    for t in T_STEPS:
        grads = [torch.randn(s).to(dtype) for s in SIZES]
        device_grads = [g.to(DEVICE) for g in grads]
        table[:, 1] = torch.tensor([g.data_ptr() for g in device_grads], dtype=torch.int64)
        step = torch.tensor([t], dtype=torch.float64)
        torch.ops.fused_sched.adam_step_(ref[0], grads, *ref[1:], hyper, GROUP_OF, schedule=schedule,
                                         schedule_step=step)
        triton_adam.launch_adam(table, chunks, hyper.to(DEVICE), counter, dtype, 3, schedule=schedule.to(DEVICE),
                                   schedule_step=step.to(DEVICE), BLOCK=BLOCK, CHUNK=CHUNK)
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"), ref, ours, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(y.cpu(), x), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_scheduled_sgd_matches_cpu_op(dtype):
    # The table's lr (1.0) and momentum (0 for group 1, whose program sets it) differ from the schedules'.
    hyper = torch.tensor([[1.0, 0.0, 0.0, 0.0, 1e-4, 0.9, 0.0, 0.0],
                          [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 2.0],  # maximize
                          [2e-2, 0.0, 0.0, 0.0, 0.0, 0.9, 0.0, 4.0]], dtype=torch.float64)  # Nesterov
    ref_params = [torch.randn(s).to(dtype) for s in SIZES]
    ref_bufs = [torch.randn(s) * 100 for s in SIZES]  # garbage: the first step must fill them with the gradient
    params = [t.clone().to(DEVICE) for t in ref_params]
    bufs = [t.clone().to(DEVICE) for t in ref_bufs]
    table = _addresses(params, params, [bufs, [None] * len(SIZES), [None] * len(SIZES)], [0] * len(SIZES),
                       fresh=[1] * len(SIZES))
    chunks = device_tables.build_chunks([p.numel() for p in params], CHUNK).to(DEVICE)
    counter = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    schedule = sp.pack(SGD_PROGRAMS)
    for k, t in enumerate(T_STEPS):
        grads = [torch.randn(s).to(dtype) for s in SIZES]
        device_grads = [g.to(DEVICE) for g in grads]
        table[:, 1] = torch.tensor([g.data_ptr() for g in device_grads], dtype=torch.int64)
        step = torch.tensor([t], dtype=torch.float64)
        fresh = [1 if k == 0 else 0] * len(SIZES)
        torch.ops.fused_sched.sgd_step_(ref_params, grads, ref_bufs, hyper, GROUP_OF, fresh, schedule=schedule,
                                        schedule_step=step)
        triton_sgd.launch_sgd(table, chunks, hyper.to(DEVICE), counter, dtype, 3, schedule=schedule.to(DEVICE),
                                  schedule_step=step.to(DEVICE), BLOCK=BLOCK, CHUNK=CHUNK)
    for x, y in zip(ref_params + ref_bufs, params + bufs, strict=True):
        assert torch.equal(y.cpu(), x)


def test_launch_checks_the_schedule():
    hyper = torch.zeros(2, 8, dtype=torch.float64, device=DEVICE)
    table = torch.zeros(1, 8, dtype=torch.int64, device=DEVICE)
    chunks = torch.zeros(0, 2, dtype=torch.int64, device=DEVICE)
    counter = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    step = torch.zeros(1, dtype=torch.float64, device=DEVICE)
    good = sp.pack([sp.Program([]), sp.Program([])]).to(DEVICE)
    strided = torch.zeros(2, 1, 2 * sp.COLUMNS, dtype=torch.float64, device=DEVICE)[:, :, ::2]
    for schedule, schedule_step in ((good, None), (good[:1], step), (good.float(), step), (good, step.float()),
                                    (strided, step)):
        with pytest.raises(ValueError):
            triton_sgd.launch_sgd(table, chunks, hyper, counter, torch.float32, 1, schedule=schedule,
                                      schedule_step=schedule_step)


def test_lr_from_table_flag_overrides_the_program_on_every_backend():
    """Hyper flag LR_FROM_TABLE (an lr written into the group by hand): the row's lr holds where the program sets
    one; C++ and Triton agree."""
    from fused_sched import _hyper

    hyper = torch.tensor([[0.25, 0.9, 0.999, 1e-8, 0.5, 0.0, 0.0, 8.0 + _hyper.LR_FROM_TABLE],
                          [0.25, 0.9, 0.999, 1e-8, 0.5, 0.0, 0.0, 8.0]], dtype=torch.float64)
    schedule = sp.pack([sp.Program([sp.Segment(sp.CONST, (1e-3,))])] * 2)
    step = torch.tensor([0.0], dtype=torch.float64)
    results = []
    for runner, device in (("cpu", "cpu"), ("triton", DEVICE)):
        params = [torch.ones(300, device=device), torch.ones(5, device=device)]
        grads = [torch.zeros_like(p) for p in params]
        moments = [[torch.zeros_like(p) for p in params] for _ in range(2)]
        steps = [torch.zeros((), device=device) for _ in params]
        if runner == "cpu":
            torch.ops.fused_sched.adam_step_(params, grads, *moments, [], steps, hyper, [0, 1], schedule=schedule,
                                             schedule_step=step)
        else:
            rows = [[p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), 0, s.data_ptr(), p.numel(), k, 0, k,
                     0, 0, 0, 0, 0]
                    for k, (p, g, m, v, s) in enumerate(zip(params, grads, *moments, steps, strict=True))]
            table = torch.tensor(rows, dtype=torch.int64, device=device)
            chunks = device_tables.build_chunks([300, 5], CHUNK).to(device)
            triton_adam.launch_adam(table, chunks, hyper.to(device), torch.zeros(1, dtype=torch.int32,
                                       device=device), torch.float32, 3, schedule=schedule.to(device),
                                       schedule_step=step.to(device), BLOCK=BLOCK, CHUNK=CHUNK)
        params = [p.cpu() for p in params]
        # Weight decay shows which lr ran: 1 - 0.25 * 0.5 from the table, 1 - 1e-3 * 0.5 from the program.
        assert torch.all(params[0] == torch.tensor(1 - 0.25 * 0.5, dtype=torch.float32)), runner
        assert torch.all(params[1] == torch.tensor(1 - 1e-3 * 0.5, dtype=torch.float32)), runner
        results.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
