"""fused_sched benchmark suite: the optimizer phase of a training step (``opt.step(); sched.step()``) of
fused_sched against eager PyTorch (for-loop, foreach, fused), torch.compile and apex, side by side on whatever
device is present, plus an end-to-end training check.

    python -m bench                          # every case on the default device (CUDA if present, else CPU)
    python -m bench --quick                  # fewer rounds, smaller scaled cases, a shorter end-to-end run
    python -m bench --case gpt2-124m --case many-small --steps 20
    python -m bench --full                   # the 1B case unscaled on a CPU too (implementations in turn)
    python -m bench --muon-only              # only the Muon rows (bench/muon.py) and the Muon convergence check
                                             # (and Muon's FSDP2 all-gathers, bench/muon_distributed.py)

Cases: GPT-2 124M float32 (148 tensors); a Llama-style 1B (Llama-3.2-1B shapes) with bfloat16 parameters and
gradients (fused_sched keeps float32 states; torch keeps its states in the parameter dtype); 2000 tensors of 4096
elements; on a GPU, a Llama-2-7B-sized shard (as many of its blocks as the free memory holds). On a CPU the 1B case
is scaled to 1/8 by default (2 of 16 blocks, 1/8 of the vocabulary rows; every tensor keeps its shape): a full copy
of parameters, gradients and states per implementation would not fit in the CI machine's 24 GiB, and the whole
suite must stay within minutes. Cases whose implementations do not fit in memory together run them one at a time
(states freed in between); the output says which. Then the Muon rows of the GPT-2 and 1B cases (bench/muon.py:
torch.optim.Muon + torch.optim.AdamW against fused_sched.MuonWithAdamW; on a CPU 1 of GPT-2's 12 blocks, the 1B
model with --muon-blocks only) and, after the end-to-end check, the convergence checks (bench/convergence.py: the
state formats, then Muon).

Output: a markdown table on stdout (also saved as .md), a JSON record (device, torch / triton / CUDA versions,
commit, date, every number) and a PNG chart under bench/results/, a progress bar on stderr. Targets of issue 5 are
read from the numbers and listed, never asserted. Details of every metric: bench/measure.py and the legend printed
under the table.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from . import report
from .cases import CASE_NAMES, DEFAULT_CASES, fit_7b_shard, make_case, memory_budget, needs
from .environment import environment
from .impls import PEERS_8BIT, candidates
from .runner import Progress, failure_reason, measure_case


def run_case(name: str, device: torch.device, args, progress: Progress, notes: list,
             info: dict) -> tuple[list, list]:
    """Rows and skipped implementations of one case; `info` receives the case's description. The case is planned
    here (implementations, memory, interleaved or one at a time) and measured by runner.measure_case."""
    skipped: list = []
    case, why = make_case(name, device, args)
    if case is None:
        return [], [{"case": name, "impl": "(whole case)", "reason": why}]
    compile_note = ""
    use_compile = not args.no_compile
    if name == "llama-7b-shard" and use_compile:
        use_compile, compile_note = False, "not attempted on the 7B shard (a compile per case costs minutes of the " \
                                           "GPU check's budget; gpt2-124m and llama-1b measure it)"
    impls, skips = candidates(device, len(case.shapes), compile_=use_compile, compile_limit=args.compile_timeout,
                              compile_max_tensors=args.compile_max_tensors, compile_note=compile_note,
                                param_dtype=case.dtype)
    skipped += [{"case": name, **s} for s in skips]
    if args.impl:
        chosen = [i for i in impls if any(sel.lower() in i.name.lower() for sel in args.impl)]
        skipped += [{"case": name, "impl": i.name, "reason": "not selected (--impl)"} for i in impls
                    if i not in chosen]
        impls = chosen
    budget = memory_budget(device)
    if name == "llama-7b-shard":
        case, why = fit_7b_shard(case, impls, budget)
        if case is None:
            return [], skipped + [{"case": name, "impl": "(whole case)", "reason": why}]
    together, one_at_a_time = needs(impls, case.numel, case.dtype)
    if together <= budget and name != "llama-7b-shard":
        mode = "interleaved"
    elif one_at_a_time <= budget:
        mode = "one at a time"
        why = ("the shard is sized for that" if name == "llama-7b-shard" else
               f"all together need {together / 2**30:.1f} GiB of the {budget / 2**30:.1f} GiB allowed")
        notes.append(f"{case.label}: implementations run one at a time, states freed in between ({why}); the copy "
                     "ceiling is interleaved with each")
    else:
        return [], skipped + [{"case": name, "impl": "(whole case)", "reason": (
            f"needs {one_at_a_time / 2**30:.1f} GiB even one implementation at a time; "
            f"{budget / 2**30:.1f} GiB allowed (--scale to shrink the 1B case)")}]
    notes.extend(case.notes)
    progress.describe(case.label)
    info.update({"label": case.label, "tensors": len(case.shapes), "numel": case.numel,
                 "param_dtype": str(case.dtype).replace("torch.", ""), "mode": mode,
                 "memory_allowed_GiB": round(budget / 2**30, 1), "memory_all_together_GiB": round(together / 2**30, 1),
                 "memory_one_at_a_time_GiB": round(one_at_a_time / 2**30, 1)})
    return measure_case(case, impls, mode, device, args, progress, skipped, info), skipped


# -- main --------------------------------------------------------------------------------------------------------
def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", choices=CASE_NAMES,
                        help=f"case(s) to run (default: {', '.join(DEFAULT_CASES)}; tiny is for smoke tests)")
    parser.add_argument("--impl", action="append", help="only implementations whose name contains this (repeatable)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, help="timed rounds per case (default: as many as --case-budget allows, "
                        "within [--min-steps, --max-steps])")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (state, plans, compiles)")
    parser.add_argument("--case-budget", type=float, help="seconds of timed rounds per case (default: 20 CPU, 8 GPU)")
    parser.add_argument("--min-steps", type=int, default=10)
    parser.add_argument("--max-steps", type=int, help="default: 30 CPU, 100 GPU")
    parser.add_argument("--profile-steps", type=int, default=2, help="steps per profiler / sync-count window")
    parser.add_argument("--scale", type=float, help="fraction of the 1B model's blocks and vocabulary (default: 1 on a "
                        "GPU, 0.125 on a CPU)")
    parser.add_argument("--quick", action="store_true", help="5 timed rounds, 1B at 1/16, 100 end-to-end steps")
    parser.add_argument("--full", action="store_true", help="the 1B case unscaled on a CPU too")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile implementation")
    parser.add_argument("--compile-timeout", type=float, default=150.0,
                        help="seconds allowed to torch.compile's warm-up calls per case (then it is skipped)")
    parser.add_argument("--compile-max-tensors", type=int, default=500,
                        help="do not attempt torch.compile on cases with more tensors")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end GPT check and the convergence "
                        "checks")
    parser.add_argument("--no-muon", action="store_true", help="skip the Muon rows and the Muon convergence check")
    parser.add_argument("--muon-only", action="store_true", help="only the Muon rows of the cases (gpt2-124m, "
                        "llama-1b, tiny) and the Muon convergence check")
    parser.add_argument("--no-muon-distributed", action="store_true", help="skip the Muon FSDP2 all-gather "
                        "measurement (bench/muon_distributed.py: 2 spawned gloo ranks, about 25 s on 2 CPU cores)")
    parser.add_argument("--muon-blocks", type=int, help="blocks of each model in the Muon rows (default: all on a "
                        "GPU; on a CPU 1 of GPT-2's, the 1B model not run)")
    parser.add_argument("--e2e-steps", type=int, help="end-to-end training steps (default 300, --quick 100)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                        help="folder of the JSON record, the markdown and the chart")
    parser.add_argument("--stamp", help="file name stamp of the outputs (default: the date)")
    parser.add_argument("--time-limit", type=float, help="seconds for the whole suite: cases that would start later "
                        "are skipped, the compile timeout shrinks to fit (the GPU check passes what it has left)")
    parser.add_argument("--no-plot", action="store_true", help="no PNG chart")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.explicit_7b = bool(args.case) and "llama-7b-shard" in args.case
    if args.quick:
        args.steps = args.steps or 5
        args.warmup = min(args.warmup, 2)
        args.scale = args.scale if args.scale is not None else (0.25 if gpu else 0.0625)
        args.e2e_steps = args.e2e_steps or 100
        args.compile_timeout = min(args.compile_timeout, 90.0)
    args.case_budget = args.case_budget if args.case_budget is not None else (8.0 if gpu else 20.0)
    args.max_steps = args.max_steps or (100 if gpu else 30)
    args.e2e_steps = args.e2e_steps or 300
    args.compile_timeout_requested = args.compile_timeout
    return args, device


def main(argv=None) -> dict:
    args, device = parse_args(argv)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    env = environment(device)
    cases = list(dict.fromkeys(args.case or DEFAULT_CASES))
    os.makedirs(args.out, exist_ok=True)
    stamp = args.stamp or env["date"].replace(":", "").replace("-", "").replace("+0000", "Z")
    base = os.path.join(args.out, f"suite-{device.type}-{stamp}")
    record = {"benchmark": "suite", **env, "argv": sys.argv[1:] if argv is None else list(argv),
              "settings": {k: v for k, v in vars(args).items() if k not in ("explicit_7b", "compile_timeout")},
              "cases": cases, "case_info": [], "notes": [], "rows": [], "skipped": [], "targets": [], "e2e": None,
              "convergence": None, "muon": None, "muon_convergence": None,
              "interrupted": False}
    header = (f"# fused_sched benchmark suite on {env['device']}: torch {env['torch']}, triton {env['triton']}, "
              f"CUDA {env['cuda']}, commit {env['commit'][:10]}{' (dirty)' if env['dirty'] else ''}, {env['date']}")
    progress = Progress(not args.no_progress)
    started = time.perf_counter()

    def left() -> float:
        return math.inf if args.time_limit is None else args.time_limit - (time.perf_counter() - started)

    try:
        for name in [] if args.muon_only else cases:
            if left() < 30:
                record["skipped"].append({"case": name, "impl": "(whole case)",
                                          "reason": f"--time-limit {args.time_limit:.0f} s reached"})
                continue
            args.compile_timeout = min(args.compile_timeout_requested, max(10.0, 0.4 * left()))
            info = {"case": name}
            case_start = time.perf_counter()
            rows, skipped = run_case(name, device, args, progress, record["notes"], info)
            info["elapsed_s"] = round(time.perf_counter() - case_start, 1)
            record["case_info"].append(info)
            record["rows"] += rows
            record["skipped"] += skipped
            report.write_json(base + ".json", record)  # partial results survive an interrupted run
        if args.no_muon:
            pass
        elif left() < 30:
            record["muon"] = {"error": f"not run: --time-limit {args.time_limit:.0f} s reached"}
        else:
            from .muon import run_muon

            try:
                record["muon"] = run_muon(cases, device, args, progress, left)
            except Exception as exc:  # noqa: BLE001
                record["muon"] = {"error": failure_reason(exc)}
            report.write_json(base + ".json", record)
        if args.no_e2e or args.muon_only:
            pass
        elif left() < 30:
            record["e2e"] = {"error": f"not run: --time-limit {args.time_limit:.0f} s reached"}
        else:
            from .e2e import run_e2e

            progress.describe("end-to-end GPT")
            progress.add(args.e2e_steps)
            try:
                record["e2e"] = run_e2e(device, args.e2e_steps, progress=progress)
            except Exception as exc:  # noqa: BLE001
                record["e2e"] = {"error": failure_reason(exc)}
            if left() >= 30:
                from .convergence import RUNS, SGD_RUNS, run_convergence

                progress.describe("state-format convergence")
                progress.add(len(RUNS) + len(PEERS_8BIT) + len(SGD_RUNS))
                try:
                    record["convergence"] = run_convergence(device, args.e2e_steps, progress=progress)
                except Exception as exc:  # noqa: BLE001
                    record["convergence"] = {"error": failure_reason(exc)}
        if not (args.no_e2e or args.no_muon) and left() >= 30:
            from .convergence import MUON_RUNS, run_muon_convergence

            progress.describe("Muon convergence")
            progress.add(MUON_RUNS)
            try:
                record["muon_convergence"] = run_muon_convergence(device, args.e2e_steps, progress=progress)
            except Exception as exc:  # noqa: BLE001
                record["muon_convergence"] = {"error": failure_reason(exc)}
    except KeyboardInterrupt:
        record["interrupted"] = True
        record["notes"].append("interrupted: the record holds the cases completed before the interrupt")
    finally:
        progress.close()
    record["elapsed_s"] = round(time.perf_counter() - started, 1)
    record["targets"] = report.targets(record["rows"], device.type)
    text = report.render(header, record, device.type)
    print(text)
    png = None if args.no_plot else report.chart(base + ".png", record["rows"], header.lstrip("# "))
    record["chart"] = os.path.basename(png) if png else None
    report.write_json(base + ".json", record)
    with open(base + ".md", "w") as f:
        f.write(text + "\n")
    written = [base + ".json", base + ".md"] + ([png] if png else [])
    print("results written to " + ", ".join(os.path.relpath(p) for p in written), file=sys.stderr)
    return record


if __name__ == "__main__":
    main()
