"""Side-by-side AdamW step benchmark on the current device: torch for-loop, foreach and fused against fused_sched.
The full suite (schedulers, torch.compile, apex, launches, syncs, memory, chart, end-to-end check) is
``python -m bench`` (bench/suite.py); this is the quick ``opt.step()``-only comparison.

For each case and implementation it prints the median (p20, p80) time of ``opt.step()``, the bytes the step must
move divided by that time, and that rate as a fraction of a plain device copy measured in the same run. A JSON
record (device, versions, commit, date, every number) is appended under bench/results/.

    python -m bench.bench_adamw                 # all cases
    python -m bench.bench_adamw --case gpt2-124m --steps 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import fused_sched

from .environment import environment
from .measure import quantile, write_record
from .measure import sync as _sync
from .shapes import gpt2_124m, many_small

CASES = {
    "gpt2-124m": (gpt2_124m, torch.float32),
    "many-small-2000x256": (lambda: many_small(2000, 256), torch.float32),
}

# AdamW without amsgrad reads param, grad, exp_avg, exp_avg_sq and writes param, exp_avg, exp_avg_sq.
def adamw_bytes(numel: int, dtype: torch.dtype) -> int:
    p = torch.tensor([], dtype=dtype).element_size()
    return numel * (2 * p + p + 4 * 2 * 2)  # param read+write, grad read, two fp32 states read+write


def time_it(fn, device, steps: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def copy_rate(device, nbytes: int, steps: int) -> float:
    """Bytes read plus written per second by dst.copy_(src) over buffers of `nbytes` each."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = time_it(lambda: dst.copy_(src), device, steps)
    return 2 * src.numel() * 4 / statistics.median(times)


def plan_check_us(opt) -> float | None:
    """fused_sched only: host time of the per-step check that the cached buckets and address tables still hold
    (every gradient gathered and compared in C++)."""
    plan = getattr(opt, "_plan", None)
    if plan is None:
        return None
    times = []
    for _ in range(50):
        start = time.perf_counter()
        plan.current()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def implementations(device):
    impls = {
        "torch for-loop": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False),
        "torch foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "torch fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    }
    if device.type == "cpu":
        impls["fused_sched cpu"] = lambda ps: fused_sched.AdamW(ps, lr=1e-3, backend="cpu")
    else:
        impls["fused_sched triton"] = lambda ps: fused_sched.AdamW(ps, lr=1e-3, backend="triton")
        import fused_sched._C as native

        if native.cuda_compiled():
            impls["fused_sched cuda"] = lambda ps: fused_sched.AdamW(ps, lr=1e-3, backend="cuda")
    return impls


def run_case(name, device, steps, only=None):
    """Every implementation steps the same parameters in turn, round after round (A B C D A B C D ...), so a
    drift in the machine's speed (shared, noisy hosts) lands on all of them alike."""
    shapes_fn, dtype = CASES[name]
    shapes = shapes_fn()
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype)
    numel = sum(p.numel() for p in params)
    nbytes = adamw_bytes(numel, dtype)
    copy_bps = copy_rate(device, max(nbytes // 2, 1 << 26), steps)
    opts = {impl: make(params) for impl, make in implementations(device).items() if not only or impl in only}
    times = {impl: [] for impl in opts}
    for round_ in range(steps + 3):
        for impl, opt in opts.items():
            _sync(device)
            start = time.perf_counter()
            opt.step()
            _sync(device)
            if round_ >= 3:  # the first rounds allocate state, build plans and compile kernels
                times[impl].append(time.perf_counter() - start)
    rows = []
    for impl, opt in opts.items():
        med = statistics.median(times[impl])
        rows.append({
            "case": name, "impl": impl, "tensors": len(params), "numel": numel, "dtype": str(dtype),
            "median_ms": med * 1e3, "p20_ms": quantile(times[impl], 0.2) * 1e3,
            "p80_ms": quantile(times[impl], 0.8) * 1e3, "bytes_per_step": nbytes, "GBps": nbytes / med / 1e9,
            "copy_GBps": copy_bps / 1e9, "fraction_of_copy": nbytes / med / copy_bps,
            "plan_check_us": plan_check_us(opt),
        })
    fused = {r["impl"]: r["median_ms"] for r in rows}
    for r in rows:
        r["speedup_vs_torch_fused"] = fused.get("torch fused", float("nan")) / r["median_ms"]
        r["speedup_vs_torch_foreach"] = fused.get("torch foreach", float("nan")) / r["median_ms"]
    return rows


def print_table(rows):
    header = ("case", "impl", "median ms", "p20 ms", "p80 ms", "GB/s", "of copy", "vs torch fused", "vs foreach",
              "host check us")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['case']} | {r['impl']} | {r['median_ms']:.3f} | {r['p20_ms']:.3f} | {r['p80_ms']:.3f} | "
              f"{r['GBps']:.1f} | {r['fraction_of_copy']:.0%} | {r['speedup_vs_torch_fused']:.2f}x | "
              f"{r['speedup_vs_torch_foreach']:.2f}x | "
              f"{'' if r['plan_check_us'] is None else format(r['plan_check_us'], '.0f')} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="case(s) to run (default: all)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per implementation")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                        help="folder that receives the JSON record")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    env = environment(device)
    print(f"# AdamW step on {env['device']} - torch {env['torch']}, triton {env['triton']}, "
          f"commit {env['commit'][:10]}")
    rows = []
    for case in args.case or list(CASES):
        rows += run_case(case, device, args.steps)
    print_table(rows)
    path = write_record(args.out, "adamw", device, {"benchmark": "adamw", **env, "rows": rows})
    print(f"results written to {os.path.relpath(path)}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
