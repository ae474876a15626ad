"""Large-model recipes, side by side with the eager PyTorch code people run for them, on the current device.

Each recipe times the whole optimizer phase of a training step, schedule included, for every implementation in
turn, round after round (A B C A B C ...), on the same parameters and gradients:

* ``clip``: global 2-norm clipping to 1.0 + AdamW + cosine schedule. torch: ``clip_grad_norm_(foreach=True)``,
  then ``AdamW(fused=True)`` (and foreach), transformers' scheduler. fused_sched: ``AdamW(max_grad_norm=1.0)``
  (one norm pass, the coefficient applied inside the update) and its device schedule.
* ``amp``: ``torch.amp.GradScaler``: ``scaler.step(opt); scaler.update()`` + schedule. torch fused AdamW (which
  takes grad_scale / found_inf like fused_sched) and foreach AdamW (the scaler unscales the gradients first).
* ``master``: bf16 parameters with fp32 master weights. torch: the usual recipe, fp32 copies of the parameters in
  a fused (or foreach) AdamW, bf16 gradients copied into their fp32 ``.grad`` before the step and the bf16
  parameters copied back after (``torch._foreach_copy_``). fused_sched: ``AdamW(master_weights=True)`` on the bf16
  parameters (one pass reads and writes the master and writes the bf16 parameter); also ``stochastic_rounding``
  without master copies (no fp32 copy at all) and plain bf16 for reference.

Prints median (p20, p80) ms and the speedup over torch fused; appends a JSON record (device, versions, commit,
date) under bench/results/.

    python -m bench.bench_large_model                      # every recipe on GPT-2 124M shapes
    python -m bench.bench_large_model --recipe clip --steps 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import fused_sched
from fused_sched._extension import load_extension

from .environment import environment
from .impls import hf_cosine
from .measure import quantile, write_record
from .measure import sync as _sync
from .shapes import gpt2_124m

LR = 1e-3
MAX_NORM = 1.0
RECIPES = ("clip", "amp", "master")


CASES = {"gpt2-124m": gpt2_124m, "tiny": lambda: [(64, 32), (32,), (7,)]}  # tiny: smoke tests
SHAPES = {"case": "gpt2-124m"}


def _params(device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = CASES[SHAPES["case"]]()
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=dtype)) for s in shapes]


def _grads(params, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(p.shape, generator=gen) * 1e-2).to(device=p.device, dtype=p.dtype) for p in params]


def _fused_backends(device) -> list[str]:
    """fused_sched's backends for `device`: cpu on a CPU; triton when importable and cuda when compiled, on a
    GPU."""
    if device.type == "cpu":
        return ["cpu"]
    return ((["triton"] if fused_sched.backends.triton_importable() else [])
            + (["cuda"] if load_extension().cuda_compiled() else []))


def _per_backend(device, name, make):
    """{row name: make(backend)} over the backends of `device` (named in the row on a GPU, which has two)."""
    return {(name if device.type == "cpu" else f"{name} [{b}]"): make(b) for b in _fused_backends(device)}


def _fused_sched(device, dtype, backend, **kwargs):
    """fused_sched.AdamW with these options and its device cosine schedule; the gradients set, then the phase."""

    def build():
        params = _params(device, dtype)
        grads = _grads(params)
        opt = fused_sched.AdamW(params, lr=LR, backend=backend, **kwargs)
        sched = fused_sched.get_cosine_schedule_with_warmup(opt, 100, 10_000)

        def phase():
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            opt.step()
            sched.step()

        return phase
    return build


def clip_recipe(device):
    """name -> (setup, phase): setup() gives the state the phase closes over."""

    def torch_impl(flavor):
        def build():
            params = _params(device, torch.float32)
            grads = _grads(params)
            opt = torch.optim.AdamW(params, lr=LR, **{flavor: True})
            sched = hf_cosine(opt)

            def phase():
                for p, g in zip(params, grads, strict=True):
                    p.grad = g  # clip_grad_norm_ scales it in place: the work per step is the same
                torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
                opt.step()
                sched.step()

            return phase
        return build

    return {"torch fused + clip_grad_norm_": torch_impl("fused"),
            "torch foreach + clip_grad_norm_": torch_impl("foreach"),
            **_per_backend(device, "fused_sched max_grad_norm",
                           lambda b: _fused_sched(device, torch.float32, b, max_grad_norm=MAX_NORM))}


def amp_recipe(device):
    scaler_device = device.type

    def make(factory):
        def build():
            params = _params(device, torch.float32)
            grads = [g * 1024.0 for g in _grads(params)]  # as scaled by the scaler's scale (2**10 here)
            opt, sched = factory(params)
            scaler = torch.amp.GradScaler(scaler_device, init_scale=1024.0, growth_interval=10**9)
            scaler.scale(torch.ones((), device=device))  # creates the scale tensor (a backward would do it)

            def phase():
                for p, g in zip(params, grads, strict=True):
                    p.grad = g.clone()  # the scaler unscales in place on the foreach path: a fresh copy each step
                scaler.step(opt)
                scaler.update()
                sched.step()

            return phase
        return build

    def torch_opt(flavor):
        def factory(params):
            opt = torch.optim.AdamW(params, lr=LR, **{flavor: True})
            return opt, hf_cosine(opt)
        return factory

    def fused_factory(backend):
        def factory(params):
            opt = fused_sched.AdamW(params, lr=LR, backend=backend)
            return opt, fused_sched.get_cosine_schedule_with_warmup(opt, 100, 10_000)
        return factory

    return {"torch fused + GradScaler": make(torch_opt("fused")),
            "torch foreach + GradScaler": make(torch_opt("foreach")),
            **_per_backend(device, "fused_sched + GradScaler", lambda b: make(fused_factory(b)))}


def master_recipe(device):
    def torch_impl(flavor):
        def build():
            params = _params(device, torch.bfloat16)
            grads = _grads(params)
            masters = [p.detach().float().requires_grad_() for p in params]
            for m in masters:
                m.grad = torch.empty_like(m)
            opt = torch.optim.AdamW(masters, lr=LR, **{flavor: True})
            sched = hf_cosine(opt)
            master_grads = [m.grad for m in masters]
            low = [p.detach() for p in params]

            def phase():
                torch._foreach_copy_(master_grads, grads)
                opt.step()
                sched.step()
                torch._foreach_copy_(low, masters)

            return phase
        return build

    return {"torch fused on fp32 masters + copies": torch_impl("fused"),
            "torch foreach on fp32 masters + copies": torch_impl("foreach"),
            **_per_backend(device, "fused_sched master_weights",
                           lambda b: _fused_sched(device, torch.bfloat16, b, master_weights=True)),
            **_per_backend(device, "fused_sched stochastic_rounding",
                           lambda b: _fused_sched(device, torch.bfloat16, b, stochastic_rounding=True)),
            **_per_backend(device, "fused_sched plain bf16", lambda b: _fused_sched(device, torch.bfloat16, b))}


BUILDERS = {"clip": clip_recipe, "amp": amp_recipe, "master": master_recipe}


def run_recipe(recipe, device, steps, warmup=3):
    phases = {name: build() for name, build in BUILDERS[recipe](device).items()}
    times = {name: [] for name in phases}
    cpu = {name: [] for name in phases}
    for round_ in range(warmup + steps):
        for name, phase in phases.items():
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            phase()
            _sync(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    rows = []
    for name in phases:
        rows.append({"recipe": recipe, "impl": name, "median_ms": statistics.median(times[name]) * 1e3,
                     "p20_ms": quantile(times[name], 0.2) * 1e3, "p80_ms": quantile(times[name], 0.8) * 1e3,
                     "cpu_ms": statistics.median(cpu[name]) * 1e3})
    base = rows[0]["median_ms"]  # the torch fused row
    for r in rows:
        r["speedup_vs_torch_fused"] = base / r["median_ms"]
    return rows


def print_table(rows):
    print("| recipe | implementation | median ms | p20 ms | p80 ms | host CPU ms | vs torch fused |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['impl']} | {r['median_ms']:.2f} | {r['p20_ms']:.2f} | {r['p80_ms']:.2f} | "
              f"{r['cpu_ms']:.2f} | {r['speedup_vs_torch_fused']:.2f}x |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", action="append", choices=RECIPES, help="recipe(s) to run (default: all)")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds per recipe")
    parser.add_argument("--case", choices=sorted(CASES), default="gpt2-124m", help="parameter shapes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                        help="folder that receives the JSON record")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    SHAPES["case"] = args.case
    env = environment(device)
    print(f"# large-model recipes, {args.case} shapes, on {env['device']} - torch {env['torch']}, "
          f"commit {env['commit'][:10]}")
    rows = []
    for recipe in args.recipe or RECIPES:
        rows += run_recipe(recipe, device, args.steps)
    print_table(rows)
    record = {"benchmark": "large-model", "case": args.case, **env, "rows": rows}
    path = write_record(args.out, "large-model", device, record)
    print(f"results written to {os.path.relpath(path)}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
