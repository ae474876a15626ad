"""The CUDA kernels of Muon's two elementwise passes (csrc/cuda/muon.cu), bit for bit against tests/muon_reference.py.

Each check builds a bucket (the C++ OptimBucket: state0 the float32 momentum buffers, state1 the bfloat16
workspaces, column 5 the addresses of float64 lr ratios) and runs it through the CUDA runner: the momentum pass
(phase 0), "orthogonalized" bfloat16 values written into the workspaces in place of Newton-Schulz, then the update
pass (phase 1). On a GPU when there is one, else on CPU tensors under the host emulation (tests/cuda_host_emulation.py).
Covered: float32 / bfloat16 / float16 params, odd sizes (lanes cut short by a tensor's end), a tensor over three
chunks, a misaligned tensor (the element-by-element path), Nesterov on and off, both branches of torch.lerp
(momentum 0.95 and 0.3), two groups with different rows, weight decay, GradScaler's scale and a clip coefficient
(the prescaled gradient written back), found_inf skipping both passes, step_advance, and a schedule driving lr and
momentum. The list op (muon_step_) only on a GPU: its CUDA implementation is the only one.
"""

from __future__ import annotations

import pytest
import torch

import muon_reference as ref
from fused_sched import _hyper
from fused_sched import _schedule_program as sp
from fused_sched._extension import load_extension
from fused_sched.backends.cuda_backend import CHUNK_ELEMENTS, CudaBucketRunner

NUMELS = [1, 255, 257, 1000]
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")


def hyper_rows(groups):
    """float64 [len(groups), 8] hyper table; each group a dict of lr, momentum, weight_decay, nesterov, flags."""
    table = torch.zeros(len(groups), _hyper.COLUMNS, dtype=torch.float64)
    for g, group in enumerate(groups):
        table[g, _hyper.LR] = group["lr"]
        table[g, _hyper.MOMENTUM] = group["momentum"]
        table[g, _hyper.WEIGHT_DECAY] = group.get("weight_decay", 0.0)
        flags = group.get("flags", 0) | (_hyper.NESTEROV if group.get("nesterov") else 0)
        table[g, _hyper.FLAGS] = float(flags)
    return table


def make_case(dtype, numels, n_groups=2, *, seed=0, misaligned=()):
    """CPU tensors of a bucket: params with grads, momentum buffers, workspaces (garbage: the momentum pass
    overwrites them), lr ratios, group of each param (i % n_groups) and the orthogonalized updates phase 1 reads.
    The params listed in `misaligned` are views one element into their storage."""
    gen = torch.Generator().manual_seed(seed)
    case = {"params": [], "grads": [], "bufs": [], "workspaces": [], "orth": []}
    for i, n in enumerate(numels):
        p = torch.randn(n, generator=gen).to(dtype)
        if i in misaligned:
            p = torch.cat([torch.zeros(1, dtype=dtype), p])[1:]
        case["params"].append(p)
        case["grads"].append(torch.randn(n, generator=gen).to(dtype))
        case["bufs"].append(torch.randn(n, generator=gen) * 0.5)
        case["workspaces"].append(torch.randn(n, generator=gen).bfloat16())
        case["orth"].append((torch.randn(n, generator=gen) * 0.2).bfloat16())
    case["lr_ratios"] = torch.rand(len(numels), generator=gen, dtype=torch.float64) * 2 + 0.25
    case["groups"] = [i % n_groups for i in range(len(numels))]
    return case


def copy(t):
    """A copy of `t` on DEVICE at the same element offset into its storage (a misaligned view stays misaligned)."""
    offset = t.storage_offset()
    return torch.empty(offset + t.numel(), dtype=t.dtype, device=DEVICE)[offset:].copy_(t)


def to_device(case):
    """Copies of the case's tensors on DEVICE: the kernels write them, the case stays the mirror's input."""
    return {k: v if k == "groups" else copy(v) if isinstance(v, torch.Tensor) else [copy(t) for t in v]
            for k, v in case.items()}


def cpu(tensors):
    return [t.cpu() for t in tensors]


def bits(t):
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def assert_bits(got, expected, what):
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.dtype == e.dtype and g.shape == e.shape, (what, i)
        if not torch.equal(bits(g.cpu()), bits(e)):
            diff = (g.cpu().float() - e.float()).abs()
            raise AssertionError(f"{what}[{i}]: {int((diff != 0).sum())} elements differ, max {diff.max().item()}")


class Bucket:
    """The device-side bucket of a case (OptimBucket + CudaBucketRunner), the two passes and their inputs."""

    def __init__(self, case, dtype):
        self.t = to_device(case)
        for p, g in zip(self.t["params"], self.t["grads"], strict=True):
            p.grad = g
        ratios = self.t["lr_ratios"]
        self.native = load_extension().OptimBucket(
            self.t["params"], [self.t["bufs"], self.t["workspaces"]], [ratios[i:i + 1] for i in range(ratios.numel())],
            self.t["groups"], [], list(range(len(self.t["params"]))))
        assert self.native.refresh_grads() == ""
        table = self.native.address_table()
        assert table[:, 5].tolist() == [ratios.data_ptr() + 8 * i for i in range(ratios.numel())]
        self.runner = CudaBucketRunner(DEVICE, dtype, "muon")

    def run(self, hyper, phase, **options):
        options = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in options.items()}
        self.runner.run(self.native, hyper.to(DEVICE), phase=phase, release_grads=phase == 1, **options)
        assert int(self.runner.counter.item()) == 0  # the ticket counter is left zero by every launch

    def write_orthogonalized(self):
        for w, o in zip(self.t["workspaces"], self.t["orth"], strict=True):
            w.copy_(o)  # in place: the table's addresses stay


def scalar(value):
    return None if value is None else torch.tensor([value], dtype=torch.float32)


def mirror(case, rows, *, grad_scale=None, clip_coef=None):
    """Both passes of tests/muon_reference.py: the written grads, buffers, workspaces after phase 0 and params after
    phase 1. rows: per group (lr, momentum, weight_decay, nesterov) as the kernel sees them (schedule applied)."""
    out = {"grads": [], "bufs": [], "workspaces": [], "params": []}
    for i, p in enumerate(case["params"]):
        lr, momentum, weight_decay, nesterov = rows[case["groups"][i]]
        g, buf, update = ref.momentum_pass(case["grads"][i], case["bufs"][i], momentum, nesterov,
                                           grad_scale=grad_scale, clip_coef=clip_coef)
        out["grads"].append(g)
        out["bufs"].append(buf)
        out["workspaces"].append(update)
        out["params"].append(ref.update_pass(p.clone(), case["orth"][i], lr, weight_decay, case["lr_ratios"][i].item()))
    return out


def row_values(groups):
    return [(g["lr"], g["momentum"], g.get("weight_decay", 0.0), bool(g.get("nesterov"))) for g in groups]


def two_passes(case, dtype, groups, *, expected_rows=None, grad_scale=None, clip_coef=None, **options):
    """Runs both passes and checks every tensor against the mirror after each pass; returns the step_advance."""
    bucket = Bucket(case, dtype)
    expected = mirror(case, expected_rows or row_values(groups), grad_scale=grad_scale, clip_coef=clip_coef)
    hyper = hyper_rows(groups)
    step_advance = torch.zeros(1, dtype=torch.float64, device=DEVICE)
    common = dict(grad_scale=scalar(grad_scale), clip_coef=scalar(clip_coef), step_advance=step_advance, **options)
    bucket.run(hyper, 0, **common)
    assert step_advance.item() == 0.0  # only the update pass completes a step
    assert_bits(bucket.t["grads"], expected["grads"], "grads")
    assert_bits(bucket.t["bufs"], expected["bufs"], "momentum buffers")
    assert_bits(bucket.t["workspaces"], expected["workspaces"], "workspaces")
    assert_bits(bucket.t["params"], case["params"], "params after the momentum pass")
    bucket.write_orthogonalized()
    bucket.run(hyper, 1, **common)
    assert step_advance.item() == 1.0
    assert_bits(bucket.t["params"], expected["params"], "params")
    assert_bits(bucket.t["bufs"], expected["bufs"], "momentum buffers after the update pass")
    assert_bits(bucket.t["workspaces"], case["orth"], "workspaces after the update pass")
    return step_advance


# Group 1 takes the other momentum and the other Nesterov flag: each case runs both lerp branches of both lerps.
ROWS = [(dtype, momentum, nesterov) for dtype in DTYPES for momentum in (0.95, 0.3) for nesterov in (False, True)]


@pytest.mark.parametrize("dtype,momentum,nesterov", ROWS,
                         ids=[f"{d}-m{m}" + ("-nesterov" if n else "") for d, m, n in ROWS])
def test_two_passes_match_the_reference(cuda_backend, dtype, momentum, nesterov):
    groups = [dict(lr=0.02, momentum=momentum, nesterov=nesterov),
              dict(lr=0.05, momentum=1.25 - momentum, nesterov=not nesterov, weight_decay=0.1)]
    two_passes(make_case(DTYPES[dtype], NUMELS, seed=1), DTYPES[dtype], groups)


@pytest.mark.parametrize("dtype", DTYPES)
def test_over_several_chunks_and_misaligned(cuda_backend, dtype):
    # 3 chunks (the last cut short), and a tensor one element into its storage: every lane element by element.
    numels = [2 * CHUNK_ELEMENTS + 77, 300, 1000]
    groups = [dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.05)]
    case = make_case(DTYPES[dtype], numels, n_groups=1, seed=2, misaligned=(1,))
    assert case["params"][1].data_ptr() % 16 != 0
    two_passes(case, DTYPES[dtype], groups)


PRESCALE = [(dtype, scale, clip) for dtype in ("f32", "bf16", "f16")
            for scale, clip in ((1024.0, None), (None, 0.37), (3.0, 0.6))]


@pytest.mark.parametrize("dtype,grad_scale,clip_coef", PRESCALE,
                         ids=[f"{d}-scale{s}-clip{c}" for d, s, c in PRESCALE])
def test_prescaled_gradients_are_written_back(cuda_backend, dtype, grad_scale, clip_coef):
    groups = [dict(lr=0.02, momentum=0.95, nesterov=True), dict(lr=0.03, momentum=0.3, weight_decay=0.2)]
    two_passes(make_case(DTYPES[dtype], NUMELS, seed=3), DTYPES[dtype], groups, grad_scale=grad_scale,
               clip_coef=clip_coef)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_found_inf_skips_both_passes(cuda_backend, dtype):
    case = make_case(DTYPES[dtype], NUMELS, seed=4)
    bucket = Bucket(case, DTYPES[dtype])
    before = {k: [t.clone() for t in bucket.t[k]] for k in ("params", "grads", "bufs", "workspaces")}
    hyper = hyper_rows([dict(lr=0.02, momentum=0.95, nesterov=True), dict(lr=0.05, momentum=0.3, weight_decay=0.1)])
    step_advance = torch.full((1,), 0.0, dtype=torch.float64, device=DEVICE)
    options = dict(grad_scale=scalar(2.0), clip_coef=scalar(0.5), found_inf=scalar(1.0), step_advance=step_advance)
    bucket.run(hyper, 0, **options)
    bucket.write_orthogonalized()
    before["workspaces"] = [t.clone() for t in bucket.t["workspaces"]]
    bucket.run(hyper, 1, **options)
    for k, tensors in before.items():
        assert_bits(bucket.t[k], cpu(tensors), k)  # nothing written, not even the unscaled gradients
    assert step_advance.item() == 0.0  # left alone by a skipped step


def test_schedule_drives_lr_and_momentum(cuda_backend):
    # Group 0: lr from a linear warmup, momentum set to 0.3 (the row says 0.95). Group 1: the same lr program but
    # its row's lr holds (LR_FROM_TABLE), momentum from the row.
    warmup = sp.Segment(sp.LINEAR, (0.04, 0.25, 1.0, 10.0))
    programs = [sp.Program([warmup, sp.Segment(sp.CONST, (0.3,), target=sp.MOMENTUM)]), sp.Program([warmup])]
    groups = [dict(lr=0.5, momentum=0.95, nesterov=True, weight_decay=0.1),
              dict(lr=0.07, momentum=0.9, weight_decay=0.01, flags=_hyper.LR_FROM_TABLE)]
    t = 3.0
    rows = []
    for program, group in zip(programs, groups, strict=True):
        lr, momentum = sp.evaluate_reference(program, t, defaults=(group["lr"], group["momentum"]))
        if group.get("flags", 0) & _hyper.LR_FROM_TABLE:
            lr = group["lr"]
        rows.append((lr, momentum, group["weight_decay"], bool(group.get("nesterov"))))
    assert rows[0][:2] == (0.04 * (0.25 + 0.75 * 3.0 / 10.0), 0.3) and rows[1][:2] == (0.07, 0.9)
    schedule = sp.pack(programs).to(DEVICE)
    schedule_step = torch.tensor([t], dtype=torch.float64, device=DEVICE)
    two_passes(make_case(torch.float32, NUMELS, seed=5), torch.float32, groups, expected_rows=rows,
               schedule=schedule, schedule_step=schedule_step)


def test_bad_phase_is_refused(cuda_backend):
    bucket = Bucket(make_case(torch.float32, [10], n_groups=1), torch.float32)
    with pytest.raises((ValueError, RuntimeError), match="phase"):
        bucket.run(hyper_rows([dict(lr=0.1, momentum=0.9)]), 2)


@pytest.mark.skipif(not GPU, reason="muon_step_ has a CUDA implementation only: needs a GPU")
def test_list_op_matches_the_reference():
    if not load_extension().cuda_compiled():
        pytest.skip("fused_sched was built without its CUDA kernels")
    dtype = torch.bfloat16
    case = make_case(dtype, NUMELS + [CHUNK_ELEMENTS + 5], seed=6)
    groups = [dict(lr=0.02, momentum=0.95, nesterov=True), dict(lr=0.05, momentum=0.3, weight_decay=0.1)]
    expected = mirror(case, row_values(groups), grad_scale=8.0)
    t = to_device(case)
    hyper = hyper_rows(groups).to(DEVICE)
    step_advance = torch.zeros(1, dtype=torch.float64, device=DEVICE)
    common = dict(grad_scale=scalar(8.0).to(DEVICE), step_advance=step_advance)
    op = torch.ops.fused_sched.muon_step_
    op(t["params"], t["grads"], t["bufs"], t["workspaces"], t["lr_ratios"], hyper, t["groups"], 0, **common)
    assert step_advance.item() == 0.0
    assert_bits(t["grads"], expected["grads"], "grads")
    assert_bits(t["bufs"], expected["bufs"], "momentum buffers")
    assert_bits(t["workspaces"], expected["workspaces"], "workspaces")
    for w, o in zip(t["workspaces"], t["orth"], strict=True):
        w.copy_(o)
    op(t["params"], t["grads"], t["bufs"], t["workspaces"], t["lr_ratios"], hyper, t["groups"], 1, **common)
    assert step_advance.item() == 1.0
    assert_bits(t["params"], expected["params"], "params")
