"""Convergence of the low-memory state formats (issue 19): bench/e2e.py's small GPT trained with each format, and
with bitsandbytes' / torchao's AdamW8bit where they run here, against float32 AdamW: the loss (mean of the last 20
steps) relative to float32's, the largest gap at any logged step, and the median time of a training step.

bfloat16 moments rounded to nearest run for contrast: the known failure of bfloat16 states (updates smaller than
half a bfloat16 spacing are lost), which stochastic rounding (the default) avoids.
tests/test_state_format_convergence.py asserts the 1% target on the CPU with the same runs.
"""

from __future__ import annotations

import importlib
import importlib.util
import statistics
import time

import torch
import torch.nn.functional as F

import fused_sched

from .e2e import BETAS, PEAK_LR, VOCAB, WEIGHT_DECAY, TinyGPT, synthetic_batches
from .impls import hf_cosine
from .measure import sync

#: largest allowed relative gap of the final loss (mean of the last 20 steps) to float32 AdamW's
TARGET = 0.01


def _fused(cls="AdamW", **kwargs):
    def make(params):
        opt = getattr(fused_sched, cls)(params, lr=PEAK_LR, betas=BETAS, weight_decay=WEIGHT_DECAY, **kwargs)
        return opt, None

    return make


def _peer(module: str):
    def make(params):
        opt = importlib.import_module(module).AdamW8bit(params, lr=PEAK_LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
        return opt, "hf"

    return make


#: (name, make(params) -> (opt, scheduler kind), parameter dtype, contrast only)
RUNS = [
    ("float32 AdamW", _fused(), torch.float32, False),
    ("AdamW8bit", _fused("AdamW8bit"), torch.float32, False),
    ("bf16 states (stochastic)", _fused(state_dtype=torch.bfloat16), torch.float32, False),
    ("bf16 states (nearest, contrast)", _fused(state_dtype=torch.bfloat16, state_rounding="nearest"),
     torch.float32, True),
    ("AdamW8bit + remainder masters, bf16 params", _fused("AdamW8bit", master_weights="remainder"),
     torch.bfloat16, False),
]


def train(make, dtype: torch.dtype, steps: int, device: torch.device, **model_kwargs) -> tuple[list[float], float]:
    """(losses, median seconds per training step) of one run from the same initial weights and batches;
    model_kwargs: TinyGPT's sizes (the tests train a narrower one)."""
    data = synthetic_batches(steps).to(device)
    torch.manual_seed(0)
    model = TinyGPT(**model_kwargs).to(device=device, dtype=dtype)
    opt, kind = make(model.parameters())
    warmup = steps // 10
    sched = hf_cosine(opt, warmup, steps) if kind == "hf" else fused_sched.get_cosine_schedule_with_warmup(
        opt, warmup, steps)
    losses, times = [], []
    for batch in data:
        start = time.perf_counter()
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return losses, statistics.median(times)


def final_loss(losses: list[float]) -> float:
    return sum(losses[-20:]) / 20


def run_convergence(device: torch.device, steps: int = 300, progress=None) -> dict:
    runs = list(RUNS)
    skipped = []
    for label, package, module in (("bitsandbytes AdamW8bit", "bitsandbytes", "bitsandbytes.optim"),
                                   ("torchao AdamW8bit", "torchao", "torchao.optim")):
        if importlib.util.find_spec(package) is None:
            skipped.append({"run": label, "reason": f"{package} is not installed"})
        else:
            runs.append((label, _peer(module), torch.float32, False))
    results = []
    base = None
    for name, make, dtype, contrast in runs:
        try:
            losses, step_s = train(make, dtype, steps, device)
        except Exception as exc:  # noqa: BLE001 (a peer that does not run on this device)
            skipped.append({"run": name, "reason": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        if progress is not None:
            progress(1)
        if base is None:
            base = losses
        gap = max(abs(a - b) / b for a, b in zip(losses, base, strict=True))
        rel = abs(final_loss(losses) - final_loss(base)) / final_loss(base)
        results.append({"run": name, "param_dtype": str(dtype).replace("torch.", ""), "final_loss":
                        final_loss(losses), "relative_to_float32": rel, "largest_step_gap": gap,
                        "step_ms": step_s * 1e3, "within_target": rel <= TARGET, "contrast": contrast,
                        "losses": losses})
    return {"steps": steps, "target": TARGET, "runs": results, "skipped": skipped}


def format_convergence(result: dict) -> str:
    lines = [f"Convergence of the state formats: small GPT, {result['steps']} steps, final loss (mean of the last "
             f"20) against float32 AdamW (target: within {result['target']:.0%})", "",
             "| run | param dtype | final loss | vs float32 | largest gap at a step | step ms | within target |",
             "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        within = "contrast" if r["contrast"] else ("yes" if r["within_target"] else "NO")
        lines.append(f"| {r['run']} | {r['param_dtype']} | {r['final_loss']:.4f} | {r['relative_to_float32']:.2%} | "
                     f"{r['largest_step_gap']:.2%} | {r['step_ms']:.1f} | {within} |")
    for s in result["skipped"]:
        lines.append(f"| {s['run']} | - | - | - | - | - | not run: {s['reason']} |")
    return "\n".join(lines)
