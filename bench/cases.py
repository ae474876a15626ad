"""The suite's cases: their definitions (built from bench/shapes.py), the memory their implementations need, and
their parameters and gradients."""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field

import torch

from .impls import Impl, planned_state_bytes
from .measure import element_size
from .shapes import LLAMA_7B_LAYERS, gpt2_124m, llama_1b, llama_7b, many_small, tiny

CASE_NAMES = ("gpt2-124m", "llama-1b", "many-small", "llama-7b-shard", "tiny")
DEFAULT_CASES = ("gpt2-124m", "llama-1b", "many-small", "llama-7b-shard")
MiB = 1 << 20


@dataclass
class Case:
    name: str
    label: str
    shapes: list
    dtype: torch.dtype
    notes: list = field(default_factory=list)

    @property
    def numel(self) -> int:
        return _numel(self.shapes)


def _numel(shapes) -> int:
    return sum(math.prod(s) for s in shapes)


# -- memory planning ---------------------------------------------------------------------------------------------
def memory_budget(device: torch.device) -> int:
    """Bytes the suite allows itself: 85% of the free GPU memory, 80% of the available host memory."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.85)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 * 8 // 10
    except OSError:
        pass
    return 8 << 30


def copy_buffer_bytes(case_bytes: int) -> int:
    """Size of each of the copy ceiling's two buffers: half the step's traffic, clamped to [64 MiB, 1 GiB] (large
    enough to stream from memory, past any cache; small enough to leave room for the cases)."""
    return int(min(max(case_bytes // 2, 64 * MiB), 1024 * MiB))


def needs(impls: list[Impl], numel: int, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes to run every implementation at once, bytes to run them one at a time), parameters, gradients and the
    copy buffers included; implementations built on torch's unfused ops get a full-size temporary as headroom
    (foreach's square root of exp_avg_sq is one)."""
    es = element_size(dtype)
    base = 2 * numel * es + 2 * copy_buffer_bytes(numel * (3 * es + 16))
    states = [numel * planned_state_bytes(i, dtype) for i in impls] or [0]
    temps = [0 if i.kind == "fused_sched" or "fused" in i.name else numel * es for i in impls] or [0]
    return base + sum(states) + max(temps), base + max(s + t for s, t in zip(states, temps, strict=True))


def make_case(name: str, device: torch.device, args) -> tuple[Case | None, str | None]:
    if name == "gpt2-124m":
        return Case(name, "gpt2-124m fp32", gpt2_124m(), torch.float32), None
    if name == "many-small":
        return Case(name, "many-small 2000x4096 fp32", many_small(2000, 4096), torch.float32), None
    if name == "tiny":
        return Case(name, "tiny fp32", tiny(), torch.float32), None
    if name == "llama-1b":
        scale = args.scale if args.scale is not None else (1.0 if device.type == "cuda" or args.full else 0.125)
        shapes = llama_1b(scale)
        label = "llama-1b bf16"
        notes = []
        if scale != 1.0:
            blocks = (len(shapes) - 2) // 9
            label += f" (scale {scale:g})"
            notes.append(f"llama-1b scaled to {scale:g}: {blocks} of 16 blocks and {shapes[0][0]} of 128256 vocabulary "
                         f"rows, {_numel(shapes) / 1e6:.0f}M parameters (tensor shapes kept); --scale 1 or --full "
                         "for the whole model")
        return Case(name, label, shapes, torch.bfloat16, notes), None
    if name == "llama-7b-shard":
        if device.type != "cuda" and not args.explicit_7b:
            return None, "GPU only by default (name it with --case to run it here)"
        return Case(name, "llama-7b-shard bf16", llama_7b(), torch.bfloat16), None
    raise ValueError(name)


def fit_7b_shard(case: Case, impls: list[Impl], budget: int) -> tuple[Case | None, str]:
    """The largest shard of the 7B model (embeddings, output and the most blocks) whose implementations fit one
    at a time."""
    for layers in range(LLAMA_7B_LAYERS, 0, -1):
        shapes = llama_7b(layers)
        _, one_at_a_time = needs(impls, _numel(shapes), case.dtype)
        if one_at_a_time <= budget:
            case.shapes = shapes
            case.label = f"llama-7b-shard bf16 ({layers}/{LLAMA_7B_LAYERS} blocks)"
            case.notes.append(f"llama-7b-shard: {layers} of {LLAMA_7B_LAYERS} blocks ({case.numel / 1e9:.2f}B "
                              f"parameters) fit in {budget / 2**30:.0f} GiB with one implementation at a time")
            return case, ""
    return None, f"not even one block of the 7B model fits in {budget / 2**30:.1f} GiB"


def make_params(case: Case, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in case.shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, device=device, dtype=case.dtype))
        p.grad = torch.randn(shape, generator=gen, device=device, dtype=case.dtype)
        params.append(p)
    return params
