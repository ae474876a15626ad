"""Muon's Triton kernel (fused_sched/backends/triton/muon.py), under the interpreter on CPU tensors: both passes of
a step equal, bit for bit, the torch mirror (tests/muon_reference.py) on float32 / bfloat16 / float16 params of
odd sizes, a tensor over three chunks and a misaligned one, Nesterov on and off, both torch.lerp branches of each
lerp (momentum 0.95 and 0.3; for the Nesterov lerp, inputs where the formula shows through the bfloat16
rounding), weight decay 0 and > 0 in two groups of one bucket, GradScaler's scale and a fused clip's coefficient
(the gradient written back), found_inf (nothing written by either pass), step_advance (the update pass's alone)
and a device schedule driving lr and momentum; and the custom op triton_muon_step_."""

from __future__ import annotations

import pytest
import torch

import muon_reference as ref
from fused_sched import _hyper, backends
from fused_sched import _schedule_program as sp
from fused_sched._extension import load_extension
from fused_sched.backends.device_tables import TABLE_COLUMNS

triton = pytest.importorskip("triton")

from fused_sched.backends.triton import launch  # noqa: E402  (after the skip)
from fused_sched.backends.triton.muon import launch_muon  # noqa: E402
from fused_sched.backends.triton.runner import TritonBucketRunner  # noqa: E402

# A GPU when there is one (the compiled kernel); CPU tensors under the interpreter otherwise (CI).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not backends.triton_interpreted(),
                                reason="Triton on CPU tensors needs TRITON_INTERPRET=1")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BLOCK, CHUNK = 256, 1024  # small: the interpreter is fast, and the sizes below cross blocks and chunks
# Odd sizes; 2 * CHUNK + 300: three chunks, the last one partial; each size takes full blocks (vector path) and a
# masked tail. MISALIGNED: the index of a tensor whose storage starts 4 bytes past a 16-byte boundary.
NUMELS = [1, 255, 257, 1000, 2 * CHUNK + 300, 300]
MISALIGNED = 5
GROUPS = [0, 1, 0, 1, 0, 1]


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    # The runner's configuration (launch._launch_config: the interpreter's, or a GPU's), shrunk so that few
    # elements cover every path.
    for name, value in (("_INTERPRETER_BLOCK", BLOCK), ("_INTERPRETER_CHUNK", CHUNK), ("DEFAULT_BLOCK", BLOCK),
                        ("DEFAULT_CHUNK", CHUNK)):
        monkeypatch.setattr(launch, name, value)


def row(lr, momentum, weight_decay, nesterov, flags=0):
    """A Muon hyper row: SGD's layout (muon_math.h)."""
    r = [0.0] * _hyper.COLUMNS
    r[_hyper.LR], r[_hyper.MOMENTUM], r[_hyper.WEIGHT_DECAY] = lr, momentum, weight_decay
    r[_hyper.FLAGS] = float(flags | (_hyper.NESTEROV if nesterov else 0))
    return r


def offset_view(n, dtype, fill, misaligned):
    """A dense tensor of n elements holding `fill`, starting one element past its storage when misaligned."""
    if not misaligned:
        return fill.to(DEVICE, dtype)
    base = torch.zeros(n + 1, dtype=dtype, device=DEVICE)
    base[1:] = fill.to(dtype)
    return base[1:]


class Case:
    """A bucket's tensors (params with grads, momentum buffers, bfloat16 workspaces, lr ratios), its OptimBucket and
    a Triton runner."""

    def __init__(self, dtype, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.dtype, self.groups = dtype, list(GROUPS)
        self.params, self.bufs, self.works = [], [], []
        for i, n in enumerate(NUMELS):
            odd = i == MISALIGNED
            p = offset_view(n, dtype, torch.randn(n, generator=gen), odd)
            p.grad = offset_view(n, dtype, torch.randn(n, generator=gen), odd)
            self.params.append(p)
            self.bufs.append(offset_view(n, torch.float32, torch.randn(n, generator=gen) * 0.5, odd))
            self.works.append(offset_view(n, torch.bfloat16, torch.full((n,), 7.0), odd))  # garbage: overwritten
        self.lr_ratios = (torch.rand(len(NUMELS), generator=gen, dtype=torch.float64) * 2 + 0.25).to(DEVICE)
        assert self.params[MISALIGNED].data_ptr() % 16 != 0
        # steps: one-element views of lr_ratios, so that column 5 holds each one's address (muon_math.h).
        steps = [self.lr_ratios[i:i + 1] for i in range(len(NUMELS))]
        self.bucket = load_extension().OptimBucket(self.params, [self.bufs, self.works], steps, self.groups, [],
                                                   list(range(len(NUMELS))))
        assert self.bucket.refresh_grads() == ""
        self.runner = TritonBucketRunner(torch.device(DEVICE), dtype, "muon")

    def snapshot(self):
        grads = [p.grad for p in self.params]
        return [t.clone().cpu() for ts in (self.params, grads, self.bufs, self.works) for t in ts]

    def run(self, hyper, phase, **options):
        self.runner.run(self.bucket, hyper, phase=phase, release_grads=False, **options)


def bits(t):
    return t.cpu().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_bits(got, expected, what):
    assert got.dtype == expected.dtype, what
    differ = (got.cpu().float() != expected.cpu().float()).sum()
    assert torch.equal(bits(got), bits(expected)), f"{what}: {differ} elements differ"


def orthogonalized(case, seed=1):
    """Stand-ins for Newton-Schulz's output, written into the workspaces between the passes."""
    gen = torch.Generator().manual_seed(seed)
    out = [(torch.randn(w.numel(), generator=gen) * 0.2).bfloat16() for w in case.works]
    for w, o in zip(case.works, out, strict=True):
        w.copy_(o.to(DEVICE))
    return out


def step_and_check(case, hyper_rows, *, grad_scale=None, clip_coef=None, schedule=None, schedule_step=None,
                   effective=None):
    """Both passes on the case and on the mirror; every tensor compared bit for bit. effective: the (lr, momentum)
    each group runs with (the rows' unless a schedule sets them)."""
    hyper = torch.tensor(hyper_rows, dtype=torch.float64, device=DEVICE)
    effective = effective or [(r[_hyper.LR], r[_hyper.MOMENTUM]) for r in hyper_rows]

    def on_device(x, dtype=torch.float32):
        return None if x is None else torch.as_tensor(x, dtype=dtype).reshape(-1).to(DEVICE)

    options = {"grad_scale": on_device(grad_scale), "clip_coef": on_device(clip_coef),
               "schedule": None if schedule is None else schedule.to(DEVICE),
               "schedule_step": on_device(schedule_step, torch.float64)}
    step_advance = torch.zeros(1, dtype=torch.float64, device=DEVICE)
    expected = []
    for p, buf, g in zip(case.params, case.bufs, case.groups, strict=True):
        nesterov = int(hyper_rows[g][_hyper.FLAGS]) & _hyper.NESTEROV != 0
        expected.append(ref.momentum_pass(p.grad.cpu(), buf.cpu(), effective[g][1], nesterov, grad_scale=grad_scale,
                                          clip_coef=clip_coef))
    case.run(hyper, 0, step_advance=step_advance, **options)
    assert step_advance.item() == 0.0  # the momentum pass never writes it
    for i, (p, buf, work) in enumerate(zip(case.params, case.bufs, case.works, strict=True)):
        grad, new_buf, update = expected[i]
        assert_bits(p.grad, grad, f"grad {i}")
        assert_bits(buf, new_buf, f"momentum_buffer {i}")
        assert_bits(work, update, f"workspace {i}")
    update = orthogonalized(case)
    # Clones: update_pass's param.float() is the param itself for float32, which its mul_ / add_ would update.
    wanted = [ref.update_pass(p.cpu().clone(), o, effective[g][0], hyper_rows[g][_hyper.WEIGHT_DECAY],
                              case.lr_ratios[i].item())
              for i, (p, o, g) in enumerate(zip(case.params, update, case.groups, strict=True))]
    case.run(hyper, 1, step_advance=step_advance, **options)
    assert step_advance.item() == 1.0
    for i, (p, w) in enumerate(zip(case.params, wanted, strict=True)):
        assert_bits(p, w, f"param {i}")
        assert_bits(case.works[i], update[i], f"workspace {i} (read only by the update pass)")


@pytest.mark.parametrize("momentum", [0.95, 0.3])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_passes_match_the_mirror(dtype, nesterov, momentum):
    # Group 0: this momentum, no weight decay; group 1: the other lerp branches, weight decay, Nesterov flipped.
    # 0.95 takes the buffer lerp's small-weight formula (0.05) and the Nesterov lerp's large one; 0.3 the reverse.
    other = 0.3 if momentum == 0.95 else 0.95
    rows = [row(0.02, momentum, 0.0, nesterov), row(0.05, other, 0.1, not nesterov)]
    case = Case(dtype)
    for _ in range(2):  # a second step reads the buffers the first wrote
        step_and_check(case, rows)
    assert all(p.grad is not None for p in case.params)  # release_grads=False kept them


@pytest.mark.parametrize("grad_scale, clip_coef", [(1024.0, None), (None, 0.3), (3.0, 0.7)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_scale_and_clip(dtype, grad_scale, clip_coef):
    # The prescaled gradient is written back in the param dtype (step_and_check compares the grads).
    case = Case(dtype)
    step_and_check(case, [row(0.02, 0.95, 0.01, True), row(0.01, 0.3, 0.0, False)], grad_scale=grad_scale,
                   clip_coef=clip_coef)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_found_inf_skips_both_passes(dtype):
    case = Case(dtype)
    hyper = torch.tensor([row(0.02, 0.95, 0.1, True), row(0.05, 0.3, 0.0, False)], dtype=torch.float64,
                         device=DEVICE)
    before = case.snapshot()
    step_advance = torch.full((1,), 5.0, dtype=torch.float64, device=DEVICE)
    options = {"found_inf": torch.ones(1, device=DEVICE), "grad_scale": torch.full((1,), 2.0, device=DEVICE),
               "clip_coef": torch.full((1,), 0.5, device=DEVICE), "step_advance": step_advance}
    for phase in (0, 1):
        case.run(hyper, phase, **options)
        for k, (got, old) in enumerate(zip(case.snapshot(), before, strict=True)):
            assert_bits(got, old, f"phase {phase}, tensor {k}")
        assert step_advance.item() == 5.0
    # found_inf == 0: the step runs.
    options["found_inf"] = torch.zeros(1, device=DEVICE)
    case.run(hyper, 0, **options)
    assert not torch.equal(case.bufs[0].cpu(), before[2 * len(case.params)])
    case.run(hyper, 1, **options)
    assert step_advance.item() == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_schedule_drives_lr_and_momentum(dtype):
    # Group 0: a linear lr program (arithmetic alone: evaluate_reference is exact); group 1: its momentum set by a
    # program, its lr from the row. The rows' own lr (1.0) and momentum (0.0) would show if a value were ignored.
    programs = [sp.Program([sp.Segment(sp.LINEAR, (0.1, 1.0 / 3.0, 1.0, 5.0))]),
                sp.Program([sp.Segment(sp.CONST, (0.3,), target=sp.MOMENTUM)])]
    rows = [row(1.0, 0.9, 0.1, True), row(0.04, 0.0, 0.01, False)]
    t = 3.0
    effective = []
    for program, r in zip(programs, rows, strict=True):
        effective.append(sp.evaluate_reference(program, t, (r[_hyper.LR], r[_hyper.MOMENTUM])))
    assert effective[0][0] != 1.0 and effective[0][1] == 0.9 and effective[1] == (0.04, 0.3)
    case = Case(dtype)
    step_and_check(case, rows, schedule=sp.pack(programs), schedule_step=torch.tensor([t], dtype=torch.float64),
                   effective=effective)


def lerp_sensitive(momentum, count=64):
    """(grad, momentum_buffer) float32 pairs whose Nesterov update rounds to another bfloat16 under the lerp formula
    torch does not pick for this momentum: the workspace, rounded to bfloat16, hides a float32 difference
    otherwise. Found among random draws, the other formula in float64 (an fma, up to a rare double rounding)."""
    gen = torch.Generator().manual_seed(5)
    g, b = torch.randn(1 << 21, generator=gen), torch.randn(1 << 21, generator=gen)
    buf = b.lerp(g, 1 - momentum)
    w = torch.tensor(momentum, dtype=torch.float32).double()
    diff = (buf - g).double()
    picked = g.lerp(buf, momentum)
    other = (w * diff + g.double()) if abs(momentum) >= 0.5 else ((w - 1.0) * diff + buf.double())
    hits = (picked.bfloat16() != other.float().bfloat16()).nonzero().flatten()[:count]
    assert hits.numel() >= 16
    return g[hits].clone(), b[hits].clone()


@pytest.mark.parametrize("momentum", [0.95, 0.3])
def test_nesterov_lerp_formula_reaches_the_workspace(momentum):
    grad, buf = lerp_sensitive(momentum)
    _, new_buf, update = ref.momentum_pass(grad, buf, momentum, True)
    grad, buf = grad.to(DEVICE), buf.to(DEVICE)
    param = torch.zeros_like(grad)
    work = torch.zeros(grad.shape, dtype=torch.bfloat16, device=DEVICE)
    hyper = torch.tensor([row(0.02, momentum, 0.0, True)], dtype=torch.float64, device=DEVICE)
    torch.ops.fused_sched.triton_muon_step_([param], [grad], [buf], [work],
                                            torch.ones(1, dtype=torch.float64, device=DEVICE), hyper, [0], 0)
    assert_bits(buf, new_buf, "momentum_buffer")
    assert_bits(work, update, "workspace")


def test_custom_op_on_tensor_lists():
    gen = torch.Generator().manual_seed(3)
    numels = [1, 257, 1000]
    params = [torch.randn(n, generator=gen).bfloat16().to(DEVICE) for n in numels]
    grads = [torch.randn(n, generator=gen).bfloat16().to(DEVICE) for n in numels]
    bufs = [torch.randn(n, generator=gen).to(DEVICE) for n in numels]
    works = [torch.zeros(n, dtype=torch.bfloat16, device=DEVICE) for n in numels]
    lr_ratios = torch.tensor([0.5, 1.0, 1.75], dtype=torch.float64, device=DEVICE)
    rows = [row(0.02, 0.95, 0.1, True), row(0.05, 0.3, 0.0, False)]
    hyper = torch.tensor(rows, dtype=torch.float64, device=DEVICE)
    groups = [0, 1, 1]
    scale = torch.full((1,), 4.0, device=DEVICE)
    step_advance = torch.zeros(1, dtype=torch.float64, device=DEVICE)
    expected = [ref.momentum_pass(g.cpu(), b.cpu(), rows[k][_hyper.MOMENTUM], k == 0, grad_scale=4.0)
                for g, b, k in zip(grads, bufs, groups, strict=True)]
    op = torch.ops.fused_sched.triton_muon_step_
    op(params, grads, bufs, works, lr_ratios, hyper, groups, 0, grad_scale=scale, step_advance=step_advance)
    assert step_advance.item() == 0.0
    for i, (grad, buf, update) in enumerate(expected):
        assert_bits(grads[i], grad, f"grad {i}")
        assert_bits(bufs[i], buf, f"momentum_buffer {i}")
        assert_bits(works[i], update, f"workspace {i}")
    for w in works:
        w.mul_(-0.5)  # "orthogonalized"
    wanted = [ref.update_pass(p.cpu().clone(), w.cpu(), rows[k][_hyper.LR], rows[k][_hyper.WEIGHT_DECAY],
                              lr_ratios[i].item())
              for i, (p, w, k) in enumerate(zip(params, works, groups, strict=True))]
    op(params, grads, bufs, works, lr_ratios, hyper, groups, 1, grad_scale=scale, step_advance=step_advance)
    assert step_advance.item() == 1.0
    for i, (p, w) in enumerate(zip(params, wanted, strict=True)):
        assert_bits(p, w, f"param {i}")
    with pytest.raises(ValueError, match="lr_ratios"):
        op(params, grads, bufs, works, lr_ratios.float(), hyper, groups, 1)
    with pytest.raises(ValueError, match="updates"):
        op(params, grads, bufs, [w.float() for w in works], lr_ratios, hyper, groups, 1)


def test_launch_checks_the_phase():
    table = torch.zeros(0, TABLE_COLUMNS, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="phase"):
        launch_muon(table, torch.zeros(0, 2, dtype=torch.int64, device=DEVICE),
                    torch.zeros(1, 8, dtype=torch.float64, device=DEVICE),
                    torch.zeros(1, dtype=torch.int32, device=DEVICE), torch.float32, 1, phase=2)
