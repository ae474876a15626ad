"""End-to-end check: a small GPT built here (no download) trained on synthetic data with torch's AdamW and
transformers' cosine-with-warmup schedule, and with fused_sched's AdamW and schedule on each available backend,
in lockstep (same initial weights, same batches, one training step of each run in turn).

Reported: the loss curves, the largest |loss difference| to the torch run over all steps, whether that is within
the tolerance, and the median time of a whole training step (forward, backward, ``opt.step()``,
``sched.step()``, ``zero_grad``) of each run.

The tolerance: the runs start bit-identical, but float32 reductions and update formulas ordered differently
round differently by a few ulps, and training can amplify such differences (on a GPU, kernels that reduce with
atomics are not even deterministic from run to run), so the curves are compared, not the bits. A second torch
run (``fused=True`` instead of the default implementation) measures how far two correct torch implementations
drift apart in the same run (``reference_diff``: about 1e-6 nats over 300 steps on the CI CPU). The tolerance,
1e-3 nats at every step, is 1000x that drift and over 1000x smaller than what training moves the loss (from 6.4
to about 3.7 nats). It catches schedule errors: on the CI CPU, a schedule one step ahead moves the curve by
5e-2 nats, a cosine over 301 steps instead of 300 by 1.7e-3.
"""

from __future__ import annotations

import copy
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import fused_sched
from fused_sched._extension import load_extension

from .impls import hf_cosine
from .measure import sync

#: largest allowed |loss(fused_sched) - loss(torch)| at any step, in nats (see the module docstring)
TOLERANCE = 1e-3

VOCAB, D_MODEL, HEADS, LAYERS, SEQ, BATCH = 512, 128, 4, 2, 64, 16
PEAK_LR, WARMUP_FRACTION, BETAS, WEIGHT_DECAY = 3e-3, 0.1, (0.9, 0.95), 0.1


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab=VOCAB, d=D_MODEL, heads=HEADS, layers=LAYERS, seq=SEQ):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def synthetic_batches(steps: int, seed: int = 1234) -> torch.Tensor:
    """Token sequences of a fixed random Markov chain (peaked transitions, so there is something to learn):
    shape (steps, BATCH, SEQ + 1)."""
    gen = torch.Generator().manual_seed(seed)
    cdf = torch.softmax(3.0 * torch.randn(VOCAB, VOCAB, dtype=torch.float64, generator=gen), dim=1).cumsum(dim=1)
    rows = steps * BATCH
    tokens = torch.empty(rows, SEQ + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(VOCAB, (rows,), generator=gen)
    for t in range(1, SEQ + 1):  # inverse-CDF sampling of each next token
        u = torch.rand(rows, 1, dtype=torch.float64, generator=gen) * cdf[:, -1:][tokens[:, t - 1]]
        tokens[:, t] = torch.searchsorted(cdf[tokens[:, t - 1]], u).squeeze(1).clamp_(max=VOCAB - 1)
    return tokens.view(steps, BATCH, SEQ + 1)


def _runs(device: torch.device):
    """(name, make(model) -> (opt, sched)) of every run; the first is the torch baseline, the second the torch
    reference that measures the drift between two torch implementations."""
    def torch_run(**kwargs):
        def make(model, total):
            opt = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=BETAS, weight_decay=WEIGHT_DECAY,
                                    **kwargs)
            return opt, hf_cosine(opt, int(WARMUP_FRACTION * total), total)
        return make

    def fs_run(backend):
        def make(model, total):
            opt = fused_sched.AdamW(model.parameters(), lr=PEAK_LR, betas=BETAS, weight_decay=WEIGHT_DECAY,
                                    backend=backend)
            return opt, fused_sched.get_cosine_schedule_with_warmup(opt, int(WARMUP_FRACTION * total), total)
        return make

    runs = [("torch AdamW (default) + HF cosine", torch_run()),
            ("torch AdamW fused + HF cosine (reference)", torch_run(fused=True))]
    if device.type == "cpu":
        runs.append(("fused_sched cpu", fs_run("cpu")))
    else:
        runs.append(("fused_sched triton", fs_run("triton")))
        if load_extension().cuda_compiled():
            runs.append(("fused_sched cuda", fs_run("cuda")))
    return runs


def run_e2e(device: torch.device, steps: int = 300, progress=None) -> dict:
    """Train every run for `steps` steps in lockstep; see the module docstring."""
    data = synthetic_batches(steps).to(device)
    torch.manual_seed(0)
    base = TinyGPT().to(device)
    runs = []
    for name, make in _runs(device):
        model = copy.deepcopy(base)
        opt, sched = make(model, steps)
        runs.append({"name": name, "model": model, "opt": opt, "sched": sched, "losses": [], "times": []})
    for step in range(steps):
        x, y = data[step, :, :-1], data[step, :, 1:]
        for run in runs:
            model, opt, sched = run["model"], run["opt"], run["sched"]
            sync(device)
            start = time.perf_counter()
            logits = model(x)
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            run["times"].append(time.perf_counter() - start)
            run["losses"].append(loss.item())
        if progress is not None:
            progress(1)
    baseline = runs[0]["losses"]
    skip = min(5, steps - 1)  # the first steps build plans and compile kernels
    out_runs = []
    for run in runs:
        diffs = [abs(a - b) for a, b in zip(run["losses"], baseline, strict=True)]
        out_runs.append({
            "name": run["name"],
            "step_ms_median": statistics.median(run["times"][skip:]) * 1e3,
            "step_ms_p20": sorted(run["times"][skip:])[int(0.2 * (steps - skip))] * 1e3,
            "step_ms_p80": sorted(run["times"][skip:])[min(steps - skip - 1, int(0.8 * (steps - skip)))] * 1e3,
            "first_loss": run["losses"][0], "final_loss": run["losses"][-1],
            "max_abs_loss_diff": max(diffs),
            "losses": run["losses"],
        })
    reference = out_runs[1]["max_abs_loss_diff"]
    fused = out_runs[2:]
    worst = max((r["max_abs_loss_diff"] for r in fused), default=math.nan)
    return {
        "model": f"GPT {LAYERS} layers, d {D_MODEL}, {HEADS} heads, vocab {VOCAB}, seq {SEQ}, batch {BATCH}, "
                 f"{sum(p.numel() for p in base.parameters())} parameters, float32",
        "data": "synthetic: a fixed random Markov chain over the vocabulary (seed 1234)",
        "optimizer": f"AdamW lr {PEAK_LR} betas {BETAS} weight decay {WEIGHT_DECAY}, cosine with "
                     f"{int(WARMUP_FRACTION * steps)} warmup steps of {steps}",
        "steps": steps, "device": str(device), "tolerance": TOLERANCE,
        "tolerance_reason": "float32 rounding differences grow along training; two torch implementations drift "
                            "apart by reference_diff in the same run",
        "reference_diff": reference, "max_abs_loss_diff": worst,
        "within_tolerance": bool(fused) and worst <= TOLERANCE,
        "runs": out_runs,
    }


def format_e2e(result: dict) -> str:
    if "error" in result:
        return f"\n## End-to-end\n\nfailed: {result['error']}"
    lines = [f"\n## End-to-end: {result['model']}, {result['steps']} steps on {result['device']}",
             f"{result['optimizer']}; data: {result['data']}.", "",
             "| run | step ms (median) | p20 | p80 | first loss | final loss | max abs loss diff vs torch |",
             "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['name']} | {r['step_ms_median']:.2f} | {r['step_ms_p20']:.2f} | {r['step_ms_p80']:.2f} | "
                     f"{r['first_loss']:.4f} | {r['final_loss']:.4f} | {r['max_abs_loss_diff']:.2e} |")
    verdict = "within" if result["within_tolerance"] else "NOT within"
    lines.append(f"\nfused_sched vs torch: max |loss diff| {result['max_abs_loss_diff']:.2e} over all steps, {verdict} "
                 f"the tolerance {result['tolerance']:.0e} nats ({result['tolerance_reason']}: "
                 f"{result['reference_diff']:.2e}). Step: forward, backward, opt.step(), sched.step(), zero_grad.")
    return "\n".join(lines)
