"""What fused_sched.Muon's FSDP2 all-gathers cost (python -m bench --muon-only; alone:
python -m bench.muon_distributed).

A Muon update needs the whole matrix: under FSDP2 (DTensor parameters sharded on dim 0) each shape group's bfloat16
workspaces, the local rows padded to the largest shard, are all-gathered (one collective per shape group), every rank
runs Newton-Schulz on the whole batch and keeps its own rows (fused_sched/optim/_muon_work.py). Here 2 spawned ranks
(gloo on CPU; nccl and one GPU each where 2 GPUs are present) step fused_sched.Muon on a model of Muon matrices
sharded with ``fully_shard`` (by default GPT-2's first block: 768x2304, 768x768, 768x3072, 3072x768), with gradients
set once. Steps alternate:

* plain steps: the step as users run it (``opt.step()`` after a barrier);
* instrumented steps: the same, with timers around the collective (``_muon_work._all_gather``, after a
  ``torch.distributed.barrier()`` of its own, so that waiting for the slower rank is counted apart from the
  transfer), ``newton_schulz``, ``MuonWork.orthogonalize`` and the bucket's run (the two kernel passes are the
  bucket's run less orthogonalize); on a GPU every timer synchronizes.

Then the same matrices unsharded in one process (this one), at the ranks' threads per process and with every thread.
Numbers: medians over the steps, per rank; the table gives the slower rank's. Bytes gathered per rank and step:
2 x n x ceil(rows / world) x cols x (world - 1) per shape group of n matrices (the padding included), counted again
from the collective's tensors.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time

import torch

WORLD = 2
JOIN_TIMEOUT_S = 300
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)
STEPS, WARMUP = 5, 1
PARTS = ("wait", "gather", "newton_schulz", "orthogonalize", "run_bucket")


def gather_bytes(shapes, world: int = WORLD) -> tuple[int, int]:
    """(bytes each rank receives per step, of which padding) for Muon matrices of these global shapes sharded on
    dim 0 over `world` ranks: one bfloat16 all-gather per distinct shape of ceil(rows / world) rows per matrix."""
    total = padding = 0
    for shape, n in _count(shapes).items():
        padded, rest = -(-shape[0] // world), math.prod(shape[1:])
        total += 2 * n * padded * rest * (world - 1)
        padding += 2 * n * (padded * world - shape[0]) * rest * (world - 1) // world
    return total, padding


def _count(shapes) -> dict:
    counts: dict = {}
    for s in shapes:
        counts[tuple(s)] = counts.get(tuple(s), 0) + 1
    return counts


def default_matrices(names=("gpt2-124m",), blocks: int | None = None) -> tuple[str, list[tuple[int, int]]]:
    """(label, shapes): the Muon matrices of GPT-2's first `blocks` blocks, or of tiny-gpt when "tiny" is among
    the cases and gpt2-124m is not (smoke tests)."""
    from .muon import muon_split
    from .shapes import gpt2, tiny_gpt

    if "tiny" in names and "gpt2-124m" not in names:
        label, shapes = "tiny-gpt", tiny_gpt()
    else:
        blocks = blocks or 1
        label, shapes = f"gpt2-124m, {blocks} block{'s' if blocks > 1 else ''}", gpt2(blocks)
    return label, [tuple(s) for s, m in zip(shapes, muon_split(shapes), strict=True) if m]


# -- instrumentation ---------------------------------------------------------------------------------------------
class _Timers:
    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.active = False
        self.reset(False)

    def reset(self, active: bool) -> None:
        self.active = active
        self.ms = dict.fromkeys(PARTS, 0.0)
        self.bytes = self.gathers = 0

    def wrap(self, key: str, fn):
        def timed(*args, **kwargs):
            if not self.active:
                return fn(*args, **kwargs)
            self.sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            self.ms[key] += (time.perf_counter() - start) * 1e3
            return out

        return timed


@contextlib.contextmanager
def _instrumented(timers: _Timers):
    """Timers around the collective (after a barrier), Newton-Schulz, orthogonalize and the bucket's run."""
    from fused_sched.optim import _muon_work, muon

    real = (_muon_work._all_gather, _muon_work.newton_schulz, _muon_work.MuonWork.orthogonalize,
            muon.Muon._run_bucket)
    gather = timers.wrap("gather", real[0])

    def all_gather(output, input_, group):
        if timers.active:
            timers.wrap("wait", torch.distributed.barrier)(group=group)
            timers.bytes += output.numel() * output.element_size() - input_.numel() * input_.element_size()
            timers.gathers += 1
        gather(output, input_, group=group)

    _muon_work._all_gather = all_gather
    _muon_work.newton_schulz = timers.wrap("newton_schulz", real[1])
    _muon_work.MuonWork.orthogonalize = timers.wrap("orthogonalize", real[2])
    muon.Muon._run_bucket = timers.wrap("run_bucket", real[3])
    try:
        yield
    finally:
        (_muon_work._all_gather, _muon_work.newton_schulz, _muon_work.MuonWork.orthogonalize,
         muon.Muon._run_bucket) = real


def _time_steps(opt, timers: _Timers, steps: int, warmup: int, barrier) -> dict:
    """Medians of `steps` plain and `steps` instrumented steps, alternating, after `warmup` steps."""
    for _ in range(warmup):
        opt.step()
    plain, parts = [], []
    with _instrumented(timers):
        for _ in range(steps):
            for instrumented in (False, True):
                barrier()
                timers.sync()
                timers.reset(instrumented)
                start = time.perf_counter()
                opt.step()
                timers.sync()
                ms = (time.perf_counter() - start) * 1e3
                if instrumented:
                    parts.append({**timers.ms, "step": ms, "bytes": timers.bytes, "gathers": timers.gathers})
                else:
                    plain.append(ms)
        timers.reset(False)
    out = {k: statistics.median(p[k] for p in parts) for k in ("step", *PARTS)}
    out["kernel_passes"] = statistics.median(p["run_bucket"] - p["orthogonalize"] for p in parts)
    out["other"] = statistics.median(p["step"] - p["run_bucket"] + p["orthogonalize"] - p["wait"] - p["gather"]
                                     - p["newton_schulz"] for p in parts)
    return {"step_ms": statistics.median(plain), "plain_steps_ms": plain,
            **{f"{k}_ms": v for k, v in out.items() if k not in ("step", "run_bucket")},
            "instrumented_step_ms": out["step"], "bytes_per_step": [p["bytes"] for p in parts],
            "gathers_per_step": [p["gathers"] for p in parts]}


def _model(shapes, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.weights = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(s, device=device) / s[1] ** 0.5)
                                           for s in shapes)
    return model


def _optimizer(params):
    import fused_sched

    return fused_sched.Muon(params, lr=0.02, weight_decay=0.1)


# -- the ranks ---------------------------------------------------------------------------------------------------
def _worker(rank: int, port: int, backend: str, world: int, shapes, steps: int, warmup: int, threads: int,
            out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(threads)
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor, Shard, distribute_tensor

        mesh = init_device_mesh(device.type, (world,))
        model = _model(shapes, device)
        fully_shard(model, mesh=mesh)
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            assert isinstance(p, DTensor) and tuple(p.placements) == (Shard(0),)
            p.grad = distribute_tensor(torch.randn(p.shape, generator=gen).to(device), mesh, [Shard(0)])
        opt = _optimizer(model.parameters())
        barrier = (lambda: dist.barrier(device_ids=[rank])) if backend == "nccl" else dist.barrier
        result = _time_steps(opt, _Timers(device), steps, warmup, barrier)
        result["local_rows"] = [p.to_local().shape[0] for p in model.parameters()]
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # As tests/distributed_cases.py: leave without the interpreter's teardown (a rare abort there on CI).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(backend: str, world: int, shapes, steps: int, warmup: int, threads: int) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        context = mp.start_processes(_worker, args=(_free_port(), backend, world, shapes, steps, warmup, threads,
                                                    out), nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while not context.join(timeout=2):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise TimeoutError(f"the {world} ranks did not finish within {JOIN_TIMEOUT_S} s")
        ranks = []
        for rank in range(world):
            with open(os.path.join(out, f"rank{rank}.json")) as f:
                ranks.append(json.load(f))
    return ranks


def _one_process(shapes, device: torch.device, steps: int, warmup: int, threads: int) -> dict:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = _model(shapes, device)
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen).to(device)
        return _time_steps(_optimizer(model.parameters()), _Timers(device), steps, warmup, lambda: None)
    finally:
        torch.set_num_threads(before)


def run_muon_distributed(shapes, label: str = "", device: torch.device | None = None, steps: int = STEPS,
                         warmup: int = WARMUP) -> dict:
    """The section of the record: the sharded run on WORLD ranks, the one-process runs, the bytes."""
    import torch.distributed as dist

    device = device or torch.device("cpu")
    notes = []
    if device.type == "cuda" and torch.cuda.device_count() >= WORLD and dist.is_nccl_available():
        backend, threads, where = "nccl", torch.get_num_threads(), device
    else:
        if not dist.is_available() or not dist.is_gloo_available():
            raise RuntimeError("torch.distributed with gloo is not available")
        if device.type == "cuda":
            notes.append(f"{torch.cuda.device_count()} GPU(s) here, {WORLD} needed for nccl: the gloo CPU variant ran")
        backend, where = "gloo", torch.device("cpu")
        threads = max(1, torch.get_num_threads() // WORLD)
    shapes = [tuple(s) for s in shapes]
    started = time.perf_counter()
    ranks = _spawn(backend, WORLD, shapes, steps, warmup, threads)
    keys = [k for k in ranks[0] if k.endswith("_ms") and k != "plain_steps_ms"]
    sharded = {"run": f"FSDP2, {WORLD} ranks ({backend})", "processes": WORLD, "threads": threads,
               **{k: max(r[k] for r in ranks) for k in keys}, "ranks": ranks}
    runs = [sharded]
    totals = [threads] if where.type == "cuda" else sorted({threads, torch.get_num_threads()})
    for n in totals:
        one = _one_process(shapes, where, steps, warmup, n)
        runs.append({"run": "one process" + (f", {n} thread{'s' if n > 1 else ''}" if where.type == "cpu" else ""),
                     "processes": 1, "threads": n, **one})
    total, padding = gather_bytes(shapes, WORLD)
    return {"label": label, "device": str(where), "backend": backend, "world": WORLD, "steps": steps,
            "shapes": [list(s) for s in shapes], "groups": len(_count(shapes)), "bytes_per_rank": total,
            "padding_bytes_per_rank": padding, "runs": runs, "notes": notes,
            "elapsed_s": round(time.perf_counter() - started, 1)}


def run_section(names, device: torch.device, args, left=lambda: math.inf) -> dict:
    """bench/muon.py's hook: the "distributed" part of the record's "muon" section."""
    from .runner import failure_reason

    if left() < 30:
        return {"error": f"not run: --time-limit {args.time_limit:.0f} s reached"}
    blocks = getattr(args, "muon_blocks", None) or (None if device.type == "cpu" else 12)
    label, shapes = default_matrices(names, blocks)
    try:
        return run_muon_distributed(shapes, label, device, steps=args.steps or STEPS)
    except Exception as exc:  # noqa: BLE001
        return {"error": failure_reason(exc)}


# -- report ------------------------------------------------------------------------------------------------------
def _ms(value) -> str:
    return "n/a" if value is None else f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.3g} MB"


def format_distributed(result: dict) -> str:
    if "error" in result:
        return f"\n### Muon under FSDP2\n\nfailed: {result['error']}"
    sharded, one, every = result["runs"][0], result["runs"][1], result["runs"][-1]
    lines = [f"\n### Muon under FSDP2: the all-gathers ({result['label']}, {len(result['shapes'])} matrices of "
             f"{result['groups']} shapes, {result['world']} ranks, {result['backend']} on {result['device']})", "",
             "| run | processes x threads | step ms | instrumented step ms | waiting ms | all-gather ms | "
             "Newton-Schulz ms | kernel passes ms | other ms | gathered per rank and step |", "|" + "---|" * 10]
    for r in result["runs"]:
        gathered = _mb(result["bytes_per_rank"]) if r is sharded else "0"
        lines.append(f"| {r['run']} | {r['processes']} x {r['threads']} | {_ms(r['step_ms'])} | "
                     f"{_ms(r['instrumented_step_ms'])} | {_ms(r['wait_ms'])} | {_ms(r['gather_ms'])} | "
                     f"{_ms(r['newton_schulz_ms'])} | {_ms(r['kernel_passes_ms'])} | {_ms(r['other_ms'])} | "
                     f"{gathered} |")
    step, ms = sharded["instrumented_step_ms"], sharded["step_ms"]
    gather, ns = 100 * sharded["gather_ms"] / step, 100 * sharded["newton_schulz_ms"] / step
    lines += ["", f"Per rank and step the {result['groups']} all-gathers (one per shape) receive "
              f"{_mb(result['bytes_per_rank'])} ({_mb(result['padding_bytes_per_rank'])} of it padding of uneven "
              f"shards) in {_ms(sharded['gather_ms'])} ms: {gather:.0f}% of the instrumented {_ms(step)} ms step, "
              f"after {_ms(sharded['wait_ms'])} ms waiting for the other rank; Newton-Schulz on the whole matrices, "
              f"repeated on every rank, is {ns:.0f}%. The sharded step ({_ms(ms)} ms) is {ms / one['step_ms']:.2f}x "
              f"the one-process step at the same threads per process ({_ms(one['step_ms'])} ms)"
              + ("." if every is one else f", {ms / every['step_ms']:.2f}x the one process's with "
                 f"{every['threads']} threads, the ranks' cores together ({_ms(every['step_ms'])} ms).")]
    lines.append(f"Medians of {result['steps']} steps (the slower rank's); waiting: a barrier before each gather; "
                 "other: the step less the rest (the gathered rows' copies, the host's work).")
    lines += [f"- {n}" for n in result["notes"]]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.muon_distributed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--blocks", type=int, help="GPT-2 blocks (default: 1 on a CPU, 12 on a GPU)")
    parser.add_argument("--tiny", action="store_true", help="tiny-gpt's matrices (a smoke test)")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    blocks = args.blocks or (1 if device.type == "cpu" else 12)
    label, shapes = default_matrices(("tiny",) if args.tiny else ("gpt2-124m",), blocks)
    result = run_muon_distributed(shapes, label, device, steps=args.steps)
    print(format_distributed(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    from bench.muon_distributed import main as _main

    _main()
