"""The implementations the suite compares, each paired with the learning-rate scheduler its users run.

Every implementation is AdamW (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.01) with a cosine schedule
with warmup (100 warmup steps of 10000), and its timed phase is ``opt.step(); sched.step()``:

* torch for-loop, torch foreach: a float lr, transformers' ``get_cosine_schedule_with_warmup`` (a LambdaLR);
* torch fused: with a float lr and, as torch recommends for schedules without recompiles and graph capture,
  with a tensor lr on the device; the same transformers scheduler (an LRScheduler writes the tensor in place);
* torch.compile: ``torch.compile(opt.step)`` of torch's AdamW with a tensor lr on the device, the scheduler
  stepped eagerly (PyTorch's recipe for compiled optimizers with an LR scheduler);
* apex FusedAdam (adam_w_mode) with the transformers scheduler, where apex imports;
* fused_sched on every backend available here, with fused_sched's own ``get_cosine_schedule_with_warmup``
  (the schedule runs inside the update kernel from a device step counter).

If transformers is not installed, the torch rows use a torch LambdaLR with transformers' cosine lambda
(``fused_sched.hf_schedules._factors._cosine_factor``, the same function), and the record says so.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

import fused_sched
from fused_sched._extension import load_extension

LR = 1e-3
WEIGHT_DECAY = 0.01
WARMUP_STEPS = 100
TRAINING_STEPS = 10_000


@dataclass
class Built:
    opt: Any
    sched: Any
    phase: Any
    #: extra objects kept alive (compiled functions, tensors)
    keep: list = field(default_factory=list)


@dataclass
class Impl:
    name: str
    kind: str  # "torch", "compile", "apex", "fused_sched"
    build: Any  # params -> Built
    scheduler: str
    #: wall-clock budget (s) of the warm-up calls, which compile (torch.compile only)
    warmup_limit: float | None = None


def scheduler_source() -> str:
    return "transformers" if importlib.util.find_spec("transformers") is not None else "torch LambdaLR + hf lambda"


def hf_cosine(opt, warmup: int = WARMUP_STEPS, total: int = TRAINING_STEPS):
    """transformers.get_cosine_schedule_with_warmup, or the identical LambdaLR when transformers is missing."""
    try:
        from transformers import get_cosine_schedule_with_warmup
    except ImportError:
        from torch.optim.lr_scheduler import LambdaLR

        from fused_sched.hf_schedules._factors import _cosine_factor

        lam = partial(_cosine_factor, num_warmup_steps=warmup, num_training_steps=total, num_cycles=0.5)
        return LambdaLR(opt, lam)
    return get_cosine_schedule_with_warmup(opt, warmup, total)


def _phase(opt, sched):
    def phase():
        opt.step()
        sched.step()

    return phase


def _torch(tensor_lr: bool = False, **kwargs):
    def build(params):
        lr = torch.tensor(LR, device=params[0].device) if tensor_lr else LR
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY, **kwargs)
        sched = hf_cosine(opt)
        return Built(opt, sched, _phase(opt, sched))

    return build


def _compiled(params):
    device = params[0].device
    opt = torch.optim.AdamW(params, lr=torch.tensor(LR, device=device), weight_decay=WEIGHT_DECAY)
    sched = hf_cosine(opt)

    @torch.compile(fullgraph=False)
    def compiled_step():
        opt.step()

    def phase():
        compiled_step()
        sched.step()

    return Built(opt, sched, phase, keep=[compiled_step])


def _apex(params):
    from apex.optimizers import FusedAdam

    opt = FusedAdam(params, lr=LR, weight_decay=WEIGHT_DECAY, adam_w_mode=True)
    sched = hf_cosine(opt)
    return Built(opt, sched, _phase(opt, sched))


def _fused_sched(backend, cls: str = "AdamW", **kwargs):
    def build(params):
        opt = getattr(fused_sched, cls)(params, lr=LR, weight_decay=WEIGHT_DECAY, backend=backend, **kwargs)
        sched = fused_sched.get_cosine_schedule_with_warmup(opt, WARMUP_STEPS, TRAINING_STEPS)
        return Built(opt, sched, _phase(opt, sched))

    return build


#: fused_sched's low-memory state formats (issue 19), a row each per backend: (row suffix, class, options, param
#: dtypes it applies to).
STATE_FORMATS = (
    ("AdamW8bit", "AdamW8bit", {}, None),
    ("bf16 states", "AdamW", {"state_dtype": torch.bfloat16}, None),
    ("AdamW8bit + remainder masters", "AdamW8bit", {"master_weights": "remainder"}, torch.bfloat16),
)


#: The 8-bit peers, each run where its package imports: (row / run label, package, module holding AdamW8bit).
PEERS_8BIT = (("bitsandbytes AdamW8bit", "bitsandbytes", "bitsandbytes.optim"),
              ("torchao AdamW8bit", "torchao", "torchao.optim"))


def _peer_8bit(module: str, name: str):
    def build(params):
        package = importlib.import_module(module)
        opt = getattr(package, name)(params, lr=LR, weight_decay=WEIGHT_DECAY)
        sched = hf_cosine(opt)
        return Built(opt, sched, _phase(opt, sched))

    return build


def _peers_8bit(device: torch.device, hf: str) -> tuple[list[Impl], list[dict]]:
    """bitsandbytes' and torchao's AdamW8bit where they import (their own checks decide whether they run on this
    device: a failure in construction or in the first steps skips the row with its reason)."""
    impls, skipped = [], []
    for label, package, module in PEERS_8BIT:
        if importlib.util.find_spec(package) is None:
            skipped.append({"impl": label, "reason": f"{package} is not installed"})
            continue
        impls.append(Impl(label, "8bit-peer", _peer_8bit(module, "AdamW8bit"), f"{hf}, float lr"))
    return impls, skipped


def candidates(device: torch.device, tensors: int, *, compile_: bool, compile_limit: float,
               compile_max_tensors: int, compile_note: str = "",
               param_dtype: torch.dtype = torch.float32) -> tuple[list[Impl], list[dict]]:
    """The implementations to run on `device` for a case of `tensors` tensors, and the skipped ones with why."""
    hf = f"{scheduler_source()} get_cosine_schedule_with_warmup"
    impls = [
        Impl("torch for-loop", "torch", _torch(foreach=False), f"{hf}, float lr"),
        Impl("torch foreach", "torch", _torch(foreach=True), f"{hf}, float lr"),
        Impl("torch fused", "torch", _torch(fused=True), f"{hf}, float lr"),
        Impl("torch fused, tensor lr", "torch", _torch(fused=True, tensor_lr=True), f"{hf}, tensor lr"),
    ]
    skipped = []
    name = "torch.compile, tensor lr"
    if not compile_:
        skipped.append({"impl": name, "reason": compile_note or "disabled (--no-compile)"})
    elif tensors > compile_max_tensors:
        skipped.append({"impl": name, "reason": (
            f"not attempted: {tensors} tensors > --compile-max-tensors {compile_max_tensors} (compiling AdamW over "
            "2000 tensors did not finish within 10 min on the 2-core CI machine, torch 2.13)")})
    else:
        impls.append(Impl(name, "compile", _compiled, f"{hf}, tensor lr, stepped eagerly", warmup_limit=compile_limit))

    apex_note = None
    if device.type != "cuda":
        apex_note = "CUDA only"
    elif importlib.util.find_spec("apex") is None:
        apex_note = "apex is not installed"
    else:
        try:
            from apex.optimizers import FusedAdam  # noqa: F401
        except Exception as exc:  # noqa: BLE001 (apex without its CUDA extensions fails in many ways)
            apex_note = f"apex.optimizers.FusedAdam does not import: {type(exc).__name__}: {exc}"
    if apex_note is None:
        impls.append(Impl("apex FusedAdam", "apex", _apex, f"{hf}, float lr"))
    else:
        skipped.append({"impl": "apex FusedAdam", "reason": apex_note})

    native = load_extension()
    fs_sched = "fused_sched get_cosine_schedule_with_warmup (on the device)"
    if device.type == "cpu":
        impls.append(Impl("fused_sched cpu", "fused_sched", _fused_sched("cpu"), fs_sched))
        skipped.append({"impl": "fused_sched triton", "reason": (
            "Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1): a correctness path, not a "
            "performance one")})
        skipped.append({"impl": "fused_sched cuda", "reason": "CUDA only"})
    else:
        skipped.append({"impl": "fused_sched cpu", "reason": "CPU tensors only"})
        impls.append(Impl("fused_sched triton", "fused_sched", _fused_sched("triton"), fs_sched))
        if native.cuda_compiled():
            impls.append(Impl("fused_sched cuda", "fused_sched", _fused_sched("cuda"), fs_sched))
        else:
            skipped.append({"impl": "fused_sched cuda", "reason": "fused_sched was built without its CUDA kernels"})
    backends_here = [i.name.split()[-1] for i in impls if i.kind == "fused_sched"]
    for suffix, cls, options, dtype in STATE_FORMATS:
        if dtype is not None and dtype != param_dtype:
            continue
        for backend in backends_here:
            impls.append(Impl(f"fused_sched {backend} {suffix}", "fused_sched",
                              _fused_sched(backend, cls, **options), fs_sched))
    peers, peer_skips = _peers_8bit(device, hf)
    return impls + peers, skipped + peer_skips


def planned_state_bytes(impl: Impl, param_dtype: torch.dtype) -> int:
    """An upper bound of the resident state of one parameter element, to plan which implementations fit in memory
    together (the rows report the measured value, measure.state_bytes_per_param): exp_avg + exp_avg_sq in float32
    for fused_sched (its low-memory formats take less) plus a float32 master for the remainder rows' bound, the
    parameter dtype for torch and apex, 2 bytes for the 8-bit peers."""
    if impl.kind == "8bit-peer":
        return 3
    es = 4 if impl.kind == "fused_sched" else torch.empty((), dtype=param_dtype).element_size()
    return 2 * es
