"""Micro-benchmark of the CPU kernels' 8-bit state format: ns per element of one Adam / SGD step per moment format
(float32, blockwise 8-bit) through the extension's OptimBucket, next to torch.optim.AdamW(fused=True) in the same
run. This branch has no 8-bit optimizer classes, so the buckets are built as the tests build them.

    python bench/bench_state_format_cpu.py [--threads 1 2] [--numel 25000000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's fused_sched, not an installed one

from fused_sched._extension import load_extension  # noqa: E402
from fused_sched.optim import state_format as sf  # noqa: E402
from fused_sched.optim.adam import adam_row  # noqa: E402
from fused_sched.optim.sgd import sgd_row  # noqa: E402

ADAM = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2, "amsgrad": False,
        "maximize": False, "decoupled_weight_decay": True}
SGD = {"lr": 1e-2, "momentum": 0.9, "dampening": 0.0, "weight_decay": 1e-2, "nesterov": False, "maximize": False}
# GPT-2 124M-like: the token embedding, an MLP weight, an attention weight
SHAPES = ((50257 * 768,), (768 * 3072,), (768 * 2304,))


def _best(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _bucket(algorithm, fmt, numels, block_size=256):
    native = load_extension()
    gen = torch.Generator().manual_seed(0)
    params, states, absmax, steps, formats = [], [[], []], [[], []], [], []
    for n in numels:
        p = torch.randn(n, generator=gen)
        p.grad = torch.randn(n, generator=gen) * 1e-2
        params.append(p)
        moments = (torch.randn(n, generator=gen) * 1e-3, torch.rand(n, generator=gen) * 1e-5)
        for k, m in enumerate(moments):
            if fmt == sf.BLOCKWISE_8BIT:
                codes, a = sf.quantize_blockwise(m, k == 0, block_size)
                states[k].append(codes)
                absmax[k].append(a)
            else:
                states[k].append(m)
        steps.append(torch.tensor(3.0))
        formats.append(sf.format_column(fmt, False, block_size))
    kept = 2 if algorithm == "adam" else 1
    q8 = fmt == sf.BLOCKWISE_8BIT
    absmax = (absmax if kept == 2 else [absmax[0], []]) if q8 else []
    bucket = native.OptimBucket(params, states[:kept], steps if algorithm == "adam" else [], [0] * len(params), [],
                                list(range(len(params))), formats, absmax, sf.qmap("cpu") if q8 else None)
    group = ADAM if algorithm == "adam" else SGD
    row = list(adam_row(group) if algorithm == "adam" else sgd_row(group))
    h = torch.tensor([row], dtype=torch.float64)
    fresh = [0] * len(params)

    def step():  # a step releases the gradients it read: refresh them as the optimizers do (microseconds)
        assert bucket.refresh_grads() == ""
        if algorithm == "adam":
            bucket.adam_step(h)
        else:
            bucket.sgd_step(h, fresh)

    return step, (params, states)


def _torch_fused(numels):
    params = [torch.randn(n).requires_grad_() for n in numels]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, fused=True)
    return opt.step, params


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the GPT-2 shapes' sizes")
    args = ap.parse_args()
    numels = [max(256, int(s[0] * args.scale)) for s in SHAPES]
    total = sum(numels)
    native = load_extension()
    print(f"{total} elements; capability {native.cpu_capability()}; {native.__file__}")
    cases = [("torch AdamW fused (f32)", _torch_fused(numels))]
    for algorithm in ("adam", "sgd"):
        for name, fmt in (("f32", sf.FLOAT32), ("8bit", sf.BLOCKWISE_8BIT)):
            cases.append((f"fused_sched {algorithm} {name}", _bucket(algorithm, fmt, numels)))
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, (fn, _) in cases:
            t = _best(fn, args.repeat)
            print(f"threads={threads} {name:28s} {t * 1e9 / total:6.3f} ns/element", flush=True)

if __name__ == "__main__":
    main()
