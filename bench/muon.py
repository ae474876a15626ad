"""The suite's Muon rows (python -m bench; alone: python -m bench --muon-only): the optimizer phase of a training
step with Muon for the hidden matrices and AdamW for the rest, on the GPT-2 124M and Llama-style 1B shapes.

* ``muon: torch Muon + torch AdamW``: torch.optim.Muon over the 2-D hidden weights and torch.optim.AdamW (its
  default, foreach on the device) over the embeddings and the 1-D tensors, both stepped, each with its own
  scheduler (transformers' get_cosine_schedule_with_warmup, a LambdaLR), as users run the pair;
* ``muon: torch Muon + torch AdamW fused``: the same with AdamW(fused=True);
* ``muon: fused_sched <backend> MuonWithAdamW``: one optimizer over both param groups (``use_muon``), one
  fused_sched get_cosine_schedule_with_warmup read on the device, on every backend available here.

The split of a shape list (no module to hand to fused_sched.muon_param_groups): 1-D tensors, the 2-D tensors before
the first 1-D one (the embeddings) and after the last one (an untied head) go to AdamW; every other 2-D tensor is a
hidden matrix (Muon). Hyper-parameters: Muon lr 0.02, weight decay 0.1 (torch's), momentum 0.95 Nesterov, 5
Newton-Schulz steps; AdamW lr 1e-3, weight decay 0.01; cosine with 100 warmup steps of 10000.

fused_sched's Newton-Schulz runs once per distinct matrix shape (batched), torch's once per matrix, so the table
of cases gives both counts, and the targets compare launches (ops on a CPU) per distinct shape with torch's per
matrix. On a CPU the Newton-Schulz matmuls dominate: a GPT-2 block is ~130 GFLOP a step, a 1B block ~2.9 TFLOP, so
by default the GPT-2 rows take 1 of its 12 blocks (embeddings kept) and the 1B rows are not run (--muon-blocks N runs
N blocks of both). After the rows, bench/muon_distributed.py measures what Muon's FSDP2 all-gathers cost (2 spawned
ranks; --no-muon-distributed skips it).
"""

from __future__ import annotations

import argparse
import math

import torch

import fused_sched
from fused_sched._extension import load_extension

from .cases import Case, make_params, memory_budget
from .impls import LR, TRAINING_STEPS, WARMUP_STEPS, WEIGHT_DECAY, Built, Impl, hf_cosine, scheduler_source
from .measure import element_size
from .runner import _free, _row, build_entry, extras, rounds
from .shapes import GPT2_LAYERS, gpt2, llama, tiny_gpt

PREFIX = "muon: "
TORCH_PAIR = PREFIX + "torch Muon + torch AdamW"
MUON_LR, MUON_WEIGHT_DECAY = 0.02, 0.1
MUON_CASES = ("gpt2-124m", "llama-1b", "tiny")
LLAMA_1B_LAYERS, LLAMA_1B_VOCAB = 16, 128256


def muon_split(shapes) -> list[bool]:
    """For each shape, whether it is a hidden matrix (Muon) or not (AdamW); see the module docstring."""
    flat = [i for i, s in enumerate(shapes) if len(s) < 2]
    first, last = (flat[0], flat[-1]) if flat else (len(shapes), -1)
    return [len(s) == 2 and first < i < last for i, s in enumerate(shapes)]


def ns_flops(shape, steps: int = 5) -> int:
    """Newton-Schulz's matmul FLOPs for one matrix: per step X X^T, (bA + cA^2) and the product with X."""
    m, n = sorted(shape)
    return steps * (4 * m * m * n + 2 * m ** 3)


def shape_stats(shapes) -> dict:
    split = muon_split(shapes)
    matrices = [tuple(s) for s, m in zip(shapes, split, strict=True) if m]
    return {"tensors": len(shapes), "muon_tensors": len(matrices), "adamw_tensors": len(shapes) - len(matrices),
            "distinct_shapes": len(set(matrices)), "ns_gflop_per_step": sum(map(ns_flops, matrices)) / 1e9}


def muon_case(name: str, device: torch.device, args) -> tuple[Case | None, dict | None, str | None]:
    """(case, statistics of the whole model, None) or (None, None, why not)."""
    blocks = getattr(args, "muon_blocks", None)
    cpu = device.type == "cpu"
    if name == "tiny":
        return Case(name, "tiny-gpt fp32", tiny_gpt(), torch.float32), shape_stats(tiny_gpt()), None
    if name == "gpt2-124m":
        layers = min(blocks or (1 if cpu else GPT2_LAYERS), GPT2_LAYERS)
        label = "gpt2-124m fp32" + (f" ({layers} of {GPT2_LAYERS} blocks)" if layers < GPT2_LAYERS else "")
        return Case(name, label, gpt2(layers), torch.float32), shape_stats(gpt2()), None
    if name == "llama-1b":
        full = llama(LLAMA_1B_LAYERS, 2048, 8192, LLAMA_1B_VOCAB, 512, tied=True)
        if cpu and blocks is None and not args.full:
            return None, None, ("not run on a CPU by default: one block's Newton-Schulz is ~2.9 TFLOP a step "
                                "(about a minute on the 2-core CI machine); --muon-blocks N runs N blocks")
        scale = args.scale if args.scale is not None else (1.0 if not cpu or args.full else 0.125)
        layers = min(blocks or max(1, round(LLAMA_1B_LAYERS * scale)), LLAMA_1B_LAYERS)
        vocab = max(256, round(LLAMA_1B_VOCAB * scale))
        label = "llama-1b bf16"
        if (layers, vocab) != (LLAMA_1B_LAYERS, LLAMA_1B_VOCAB):
            label += f" ({layers} of {LLAMA_1B_LAYERS} blocks, {vocab} vocabulary rows)"
        return (Case(name, label, llama(layers, 2048, 8192, vocab, 512, tied=True), torch.bfloat16),
                shape_stats(full), None)
    raise ValueError(name)


# -- implementations ---------------------------------------------------------------------------------------------
class _States:
    """The state of two optimizers as one ``opt.state`` for bench/measure.py's byte counts."""

    def __init__(self, *opts):
        self.opts = opts
        self.state = self

    def get(self, p, default=None):
        for opt in self.opts:
            if p in opt.state:
                return opt.state[p]
        return default


def _groups(params, split):
    return ([p for p, m in zip(params, split, strict=True) if m],
            [p for p, m in zip(params, split, strict=True) if not m])


def _torch_pair(split, **adamw_options):
    def build(params):
        matrices, rest = _groups(params, split)
        muon = torch.optim.Muon(matrices, lr=MUON_LR, weight_decay=MUON_WEIGHT_DECAY)
        adamw = torch.optim.AdamW(rest, lr=LR, weight_decay=WEIGHT_DECAY, **adamw_options)
        scheds = [hf_cosine(muon), hf_cosine(adamw)]

        def phase():
            muon.step()
            adamw.step()
            for sched in scheds:
                sched.step()

        return Built(_States(muon, adamw), scheds, phase)

    return build


def _fused_sched(split, backend):
    def build(params):
        matrices, rest = _groups(params, split)
        opt = fused_sched.MuonWithAdamW([{"params": matrices, "use_muon": True}, {"params": rest, "use_muon": False}],
                                        lr=MUON_LR, weight_decay=MUON_WEIGHT_DECAY, adamw_lr=LR,
                                        adamw_weight_decay=WEIGHT_DECAY, backend=backend)
        sched = fused_sched.get_cosine_schedule_with_warmup(opt, WARMUP_STEPS, TRAINING_STEPS)

        def phase():
            opt.step()
            sched.step()

        return Built(opt, sched, phase)

    return build


def muon_candidates(device: torch.device, shapes) -> tuple[list[Impl], list[dict]]:
    split = muon_split(shapes)
    hf = f"{scheduler_source()} get_cosine_schedule_with_warmup, one per optimizer"
    impls = [Impl(TORCH_PAIR, "torch", _torch_pair(split), hf),
             Impl(TORCH_PAIR + " fused", "torch", _torch_pair(split, fused=True), hf)]
    skipped = []
    if device.type == "cpu":
        backends = ["cpu"]
        skipped += [{"impl": PREFIX + "fused_sched triton MuonWithAdamW", "reason": "GPU only here (Triton's CPU "
                     "path is its interpreter)"}, {"impl": PREFIX + "fused_sched cuda MuonWithAdamW",
                                                   "reason": "CUDA only"}]
    else:
        backends = ["triton"] if fused_sched.backends.triton_importable() else []
        if load_extension().cuda_compiled():
            backends.append("cuda")
        else:
            skipped.append({"impl": PREFIX + "fused_sched cuda MuonWithAdamW",
                            "reason": "fused_sched was built without its CUDA kernels"})
    fs = "fused_sched get_cosine_schedule_with_warmup (on the device), one for both parts"
    impls += [Impl(f"{PREFIX}fused_sched {b} MuonWithAdamW", "fused_sched", _fused_sched(split, b), fs)
              for b in backends]
    return impls, skipped


def _needs(impls, case: Case) -> tuple[int, int]:
    """(bytes for every implementation at once, bytes one at a time): parameters and gradients, then each
    implementation's states and temporaries. torch: momentum and moments in the parameter dtype, Newton-Schulz on one
    matrix at a time (a few bfloat16 copies of the largest), foreach AdamW's full-size temporary; fused_sched: float32
    momentum and moments, the bfloat16 workspace, Newton-Schulz on a whole shape group (three bfloat16 copies)."""
    es = element_size(case.dtype)
    groups: dict = {}
    rest = 0
    for shape, matrix in zip(case.shapes, muon_split(case.shapes), strict=True):
        if matrix:
            groups[tuple(shape)] = groups.get(tuple(shape), 0) + math.prod(shape)
        else:
            rest += math.prod(shape)
    matrices = sum(groups.values())
    largest = max((math.prod(s) for s in groups), default=0)
    states, temps = [], []
    for impl in impls:
        if impl.kind == "fused_sched":
            states.append(6 * matrices + 8 * rest)
            temps.append(6 * max(groups.values(), default=0))
        else:
            states.append(es * matrices + 2 * es * rest)
            temps.append(8 * largest + es * rest)
    base = 2 * case.numel * es
    return (base + sum(states) + max(temps, default=0),
            base + max((a + b for a, b in zip(states, temps, strict=True)), default=0))


# -- running -----------------------------------------------------------------------------------------------------
def _measure(case: Case, impls: list[Impl], mode: str, device, args, progress, skipped: list) -> list[dict]:
    if device.type == "cpu" and args.steps is None:  # a CPU round of a GPT-2 block takes seconds: 5 rounds at least
        args = argparse.Namespace(**{**vars(args), "min_steps": min(args.min_steps, 5)})
    params = make_params(case, device)
    done = []
    groups = [impls] if mode == "interleaved" else [[i] for i in impls]
    for chosen in groups:
        entries = [e for e in (build_entry(i, params, case, skipped) for i in chosen) if e is not None]
        rounds(entries, device, args, skipped, case, progress, args.case_budget * len(chosen) / len(impls))
        progress.add(len(entries))
        for e in entries:
            extras(e, device, args, progress)
        done += [e for e in entries if e.times]
        if mode != "interleaved":
            for e in entries:
                e.phase = e.built = None
            _free(device)
    rows = [_row(e, case, mode, device) for e in done]
    del done, params
    _free(device)
    return rows


def _finish_rows(rows: list[dict], stats: dict) -> None:
    base = next((r["median_ms"] for r in rows if r["impl"] == TORCH_PAIR), None)
    best = min((r["median_ms"] for r in rows if r["kind"] == "torch"), default=None)
    for r in rows:
        r.update({"muon_tensors": stats["muon_tensors"], "adamw_tensors": stats["adamw_tensors"],
                  "distinct_shapes": stats["distinct_shapes"], "speedup_vs_torch_fused": None,
                  "speedup_vs_torch_muon": base / r["median_ms"] if base else None,
                  "speedup_vs_best_torch": best / r["median_ms"] if best else None})


def run_muon(names, device: torch.device, args, progress, left=lambda: math.inf) -> dict:
    """The Muon rows of the cases in `names` that have them; returns the record's "muon" section. left(): seconds
    left of the suite's --time-limit (a case is not started with less than 30)."""
    out = {"cases": [], "rows": [], "skipped": [], "notes": [], "targets": []}
    for name in [n for n in names if n in MUON_CASES]:
        if left() < 30:
            out["skipped"].append({"case": name, "impl": "(whole case)",
                                   "reason": f"--time-limit {args.time_limit:.0f} s reached"})
            continue
        case, full, why = muon_case(name, device, args)
        if case is None:
            out["skipped"].append({"case": name, "impl": "(whole case)", "reason": why})
            continue
        impls, skips = muon_candidates(device, case.shapes)
        out["skipped"] += [{"case": name, **s} for s in skips]
        if args.impl:
            chosen = [i for i in impls if any(sel.lower() in i.name.lower() for sel in args.impl)]
            out["skipped"] += [{"case": name, "impl": i.name, "reason": "not selected (--impl)"} for i in impls
                               if i not in chosen]
            impls = chosen
        if not impls:
            continue
        together, one = _needs(impls, case)
        budget = memory_budget(device)
        if one > budget:
            out["skipped"].append({"case": name, "impl": "(whole case)", "reason": (
                f"needs {one / 2**30:.1f} GiB even one implementation at a time; {budget / 2**30:.1f} GiB allowed")})
            continue
        mode = "interleaved" if together <= budget else "one at a time"
        progress.describe(f"Muon {case.label}")
        stats = shape_stats(case.shapes)
        rows = _measure(case, impls, mode, device, args, progress, out["skipped"])
        _finish_rows(rows, stats)
        out["rows"] += rows
        out["cases"].append({"case": name, "label": case.label, "mode": mode, "numel": case.numel, **stats,
                             "full_model": full})
        if stats["muon_tensors"] == stats["distinct_shapes"] < full["muon_tensors"]:
            out["notes"].append(f"{case.label}: every matrix has a shape of its own here, so launches (ops) per "
                                f"shape and per matrix coincide; the whole model has {full['muon_tensors']} matrices "
                                f"of {full['distinct_shapes']} shapes")
        if mode != "interleaved":
            out["notes"].append(f"{case.label}: implementations run one at a time (all together need "
                                f"{together / 2**30:.1f} GiB of the {budget / 2**30:.1f} GiB allowed)")
    out["targets"] = muon_targets(out["rows"], out["cases"], device.type)
    if not getattr(args, "no_muon_distributed", True):
        from .muon_distributed import run_section

        progress.describe("Muon under FSDP2")
        out["distributed"] = run_section(names, device, args, left)
    return out


# -- targets and report ------------------------------------------------------------------------------------------
def muon_targets(rows: list[dict], cases: list[dict], device_type: str) -> list[dict]:
    """Read from the rows, never asserted: launches (ops on a CPU) per distinct shape at most torch's per matrix,
    0 syncs (GPU), not slower than the fastest torch pair."""
    key, what = ("launches_per_step", "launches") if device_type == "cuda" else ("ops_per_step", "ops")
    found = []
    for c in cases:
        mine = [r for r in rows if r["case"] == c["case"]]
        base = next((r for r in mine if r["impl"] == TORCH_PAIR and r.get(key) is not None), None)
        for r in (r for r in mine if r["kind"] == "fused_sched"):
            def add(name, value, goal, met, r=r):
                found.append({"target": name, "case": r["case_label"], "impl": r["impl"], "value": value,
                              "goal": goal, "met": bool(met)})

            if base is not None and r.get(key) is not None and c["distinct_shapes"] and c["muon_tensors"]:
                per_shape, per_matrix = r[key] / c["distinct_shapes"], base[key] / c["muon_tensors"]
                add(f"{what}/step per distinct shape <= torch pair's per matrix", f"{per_shape:.1f}",
                    f"<= {per_matrix:.1f}", per_shape <= per_matrix)
            if device_type == "cuda" and r.get("syncs_per_step") is not None:
                add("0 syncs per step", f"{r['syncs_per_step']:.1f}", "0", r["syncs_per_step"] == 0)
            if r.get("speedup_vs_best_torch") is not None:
                add(">= 1.0x the fastest torch Muon + AdamW", f"{r['speedup_vs_best_torch']:.2f}", ">= 1.0",
                    r["speedup_vs_best_torch"] >= 1.0)
    return found


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else format(value, spec) + suffix


def format_muon(result: dict, device_type: str) -> str:
    from .report import targets_table

    if "error" in result:
        return f"\n## Muon\n\nfailed: {result['error']}"
    lines = ["\n## Muon: torch.optim.Muon + torch.optim.AdamW against fused_sched.MuonWithAdamW", "",
             "| case | tensors | Muon matrices | distinct Muon shapes | AdamW tensors | Newton-Schulz GFLOP/step "
             "| whole model: tensors, matrices, shapes |", "|---|---|---|---|---|---|---|"]
    for c in result["cases"]:
        f = c["full_model"]
        lines.append(f"| {c['label']} | {c['tensors']} | {c['muon_tensors']} | {c['distinct_shapes']} | "
                     f"{c['adamw_tensors']} | {c['ns_gflop_per_step']:.1f} | {f['tensors']}, {f['muon_tensors']}, "
                     f"{f['distinct_shapes']} |")
    header = ("case", "impl", "median ms", "p20 ms", "p80 ms", "vs torch Muon + AdamW", "vs best torch",
              "host CPU us/step", "launches/step", "ops/step", "syncs/step", "peak extra MiB", "state B/param")
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in result["rows"]:
        lines.append("| " + " | ".join([
            r["case_label"], r["impl"], _fmt(r["median_ms"], ".3f"), _fmt(r["p20_ms"], ".3f"),
            _fmt(r["p80_ms"], ".3f"), _fmt(r["speedup_vs_torch_muon"], ".2f", "x"),
            _fmt(r["speedup_vs_best_torch"], ".2f", "x"), _fmt(r["host_cpu_us"], ".0f"),
            _fmt(r["launches_per_step"], ".1f"), _fmt(r["ops_per_step"], ".1f"), _fmt(r["syncs_per_step"], ".1f"),
            _fmt(r["peak_extra_MiB"], ".1f"), _fmt(r.get("state_bytes_per_param"), ".2f")]) + " |")
    counted = "CUDA launches" if device_type == "cuda" else "top-level dispatcher ops (no launches on a CPU)"
    lines += ["", f"Phase: the optimizers' step(s) and scheduler step(s); {counted} grow with the distinct Muon shapes "
              "for fused_sched (one batched Newton-Schulz per shape) and with the matrices for torch. Muon lr "
              f"{MUON_LR}, weight decay {MUON_WEIGHT_DECAY}; AdamW lr {LR}, weight decay {WEIGHT_DECAY}."]
    lines += [f"- {n}" for n in result["notes"]]
    groups: dict = {}
    for s in result["skipped"]:
        groups.setdefault((s["impl"], s["reason"]), []).append(s["case"])
    if groups:
        lines += ["", "Not measured:"] + [f"- {', '.join(cs)}: {why}" if impl == "(whole case)" else
                                          f"- {impl} ({', '.join(cs)}): {why}" for (impl, why), cs in groups.items()]
    if result["targets"]:
        lines += ["", "Targets of the Muon rows (read from this run, not asserted):", "",
                  targets_table(result["targets"])]
    if result.get("distributed"):
        from .muon_distributed import format_distributed

        lines.append(format_distributed(result["distributed"]))
    return "\n".join(lines)
