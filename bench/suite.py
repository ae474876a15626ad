"""fused_sched benchmark suite: the optimizer phase of a training step (``opt.step(); sched.step()``) of
fused_sched against eager PyTorch (for-loop, foreach, fused), torch.compile and apex, side by side on whatever
device is present, plus an end-to-end training check.

    python -m bench                          # every case on the default device (CUDA if present, else CPU)
    python -m bench --quick                  # fewer rounds, smaller scaled cases, a shorter end-to-end run
    python -m bench --case gpt2-124m --case many-small --steps 20
    python -m bench --full                   # the 1B case unscaled on a CPU too (implementations in turn)

Cases: GPT-2 124M float32 (148 tensors); a Llama-style 1B (Llama-3.2-1B shapes) with bfloat16 parameters and
gradients (fused_sched keeps float32 states; torch keeps its states in the parameter dtype); 2000 tensors of 4096
elements; on a GPU, a Llama-2-7B-sized shard (as many of its blocks as the free memory holds). On a CPU the 1B case
is scaled to 1/8 by default (2 of 16 blocks, 1/8 of the vocabulary rows; every tensor keeps its shape): a full copy
of parameters, gradients and states per implementation would not fit in the CI machine's 24 GiB, and the whole
suite must stay within minutes. Cases whose implementations do not fit in memory together run them one at a time
(states freed in between); the output says which.

Output: a markdown table on stdout (also saved as .md), a JSON record (device, torch / triton / CUDA versions,
commit, date, every number) and a PNG chart under bench/results/, a progress bar on stderr. Targets of issue 5 are
read from the numbers and listed, never asserted. Details of every metric: bench/measure.py and the legend printed
under the table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

from . import measure, report
from .impls import Impl, candidates, scheduler_source, state_bytes_per_param
from .measure import TimeLimitExceeded, cpu_clock, element_size, sync, time_limit
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
    states = [numel * state_bytes_per_param(i, dtype) for i in impls] or [0]
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


# -- progress ----------------------------------------------------------------------------------------------------
class Progress:
    """tqdm on stderr when it imports, else a plain counter line."""

    def __init__(self, enabled: bool):
        self.bar = None
        self.enabled = enabled
        self.total = self.done = 0
        self.desc = ""
        self.last = 0.0
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=0, unit="step", file=sys.stderr, dynamic_ncols=True, leave=False,
                                mininterval=0.5 if sys.stderr.isatty() else 20.0)
            except ImportError:
                self.bar = None

    def add(self, n: int) -> None:
        self.total += n
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def describe(self, text: str) -> None:
        self.desc = text
        if self.bar is not None:
            self.bar.set_description(text)

    def __call__(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last > 1.0:
            self.last = time.monotonic()
            print(f"\r{self.desc}: {self.done}/{self.total}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


# -- running -----------------------------------------------------------------------------------------------------
@dataclass
class Entry:
    name: str
    kind: str
    scheduler: str
    phase: object
    built: object = None
    warmup_limit: float | None = None
    times: list = field(default_factory=list)
    cpu: list = field(default_factory=list)
    process_cpu: list = field(default_factory=list)
    bytes_per_step: int = 0
    state_dtype: str = "-"
    extras: dict = field(default_factory=dict)
    warmup_spent: float = 0.0


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def rounds(entries: list[Entry], device: torch.device, args, skipped: list, case: Case, progress: Progress,
           budget_s: float) -> None:
    """Warm-up rounds, then timed rounds; implementation after implementation within each round."""
    clock = cpu_clock(device)
    progress.add(args.warmup * len(entries))
    last_round = 0.0
    for r in range(args.warmup):
        last_round = 0.0
        for e in list(entries):
            start = time.perf_counter()
            try:
                limit = None if e.warmup_limit is None else e.warmup_limit - e.warmup_spent
                with time_limit(limit):
                    sync(device)
                    e.phase()
                    sync(device)
            except TimeLimitExceeded:
                entries.remove(e)
                skipped.append({"case": case.name, "impl": e.name, "reason": (
                    f"compile did not finish within --compile-timeout {e.warmup_limit:.0f} s; abandoned")})
                e.phase = e.built = None
                _reset_compile()
                _free(device)
                continue
            except Exception as exc:  # noqa: BLE001 (one implementation failing must not stop the suite)
                entries.remove(e)
                skipped.append({"case": case.name, "impl": e.name, "reason": f"failed in warm-up: {_reason(exc)}"})
                e.phase = e.built = None
                _free(device)
                continue
            finally:
                progress()
            elapsed = time.perf_counter() - start
            e.warmup_spent += elapsed
            last_round += elapsed
        if r == 0:
            for e in entries:
                if e.built is not None:
                    e.bytes_per_step, e.state_dtype = measure.step_bytes(e.built.params, e.built.opt)
    on_cpu = device.type == "cpu"
    steps = args.steps or max(args.min_steps, min(args.max_steps, int(budget_s / max(last_round, 1e-6))))
    progress.add(steps * len(entries))
    for _ in range(steps):
        for e in list(entries):
            try:
                if on_cpu:  # every thread's CPU time: only meaningful on a CPU, and it costs two syscalls
                    p0 = time.process_time()
                sync(device)
                start = time.perf_counter()
                c0 = clock()
                e.phase()
                c1 = clock()
                sync(device)
                e.times.append(time.perf_counter() - start)
                e.cpu.append(c1 - c0)
                if on_cpu:
                    e.process_cpu.append(time.process_time() - p0)
            except Exception as exc:  # noqa: BLE001
                entries.remove(e)
                skipped.append({"case": case.name, "impl": e.name, "reason": f"failed while timed: {_reason(exc)}"})
                e.phase = e.built = None
                _free(device)
            progress()


def extras(e: Entry, device: torch.device, args, progress: Progress) -> None:
    """Profiler counts, syncs and peak memory of one entry (after its timed rounds)."""
    out = e.extras
    try:
        out.update(measure.profile_phase(e.phase, device, steps=args.profile_steps))
    except Exception as exc:  # noqa: BLE001
        out["profile_error"] = _reason(exc)
    try:
        out["syncs_per_step"] = measure.count_syncs(e.phase, device, steps=args.profile_steps)
    except Exception as exc:  # noqa: BLE001
        out["syncs_error"] = _reason(exc)
    if device.type == "cuda":
        try:
            out["peak_extra"], out["peak_memory_method"] = measure.peak_extra_bytes(e.phase, device)
        except Exception as exc:  # noqa: BLE001
            out["peak_error"] = _reason(exc)
    else:
        out["peak_extra"] = out.get("cpu_allocator_peak")
        out["peak_memory_method"] = "c10 allocator peak (profiler memory events)"
    progress(1)


def _reset_compile() -> None:
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _Built:
    """An implementation's objects plus the parameters its bytes are counted on."""

    def __init__(self, built, params):
        self.opt, self.sched, self.keep, self.params = built.opt, built.sched, built.keep, params


def build_entry(impl: Impl, params, case: Case, skipped: list) -> Entry | None:
    try:
        built = impl.build(params)
    except Exception as exc:  # noqa: BLE001
        skipped.append({"case": case.name, "impl": impl.name, "reason": f"construction failed: {_reason(exc)}"})
        return None
    return Entry(impl.name, impl.kind, impl.scheduler, built.phase, _Built(built, params), impl.warmup_limit)


def make_params(case: Case, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in case.shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, device=device, dtype=case.dtype))
        p.grad = torch.randn(shape, generator=gen, device=device, dtype=case.dtype)
        params.append(p)
    return params


def run_case(name: str, device: torch.device, args, progress: Progress, notes: list,
             info: dict) -> tuple[list, list]:
    """Rows and skipped implementations of one case; `info` receives the case's description."""
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
                              compile_max_tensors=args.compile_max_tensors, compile_note=compile_note)
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

    params = make_params(case, device)
    es = element_size(case.dtype)
    fs_bytes = case.numel * (3 * es + 16)
    nbuf = copy_buffer_bytes(fs_bytes)
    src = torch.empty(nbuf // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy = Entry(report.COPY_IMPL, "copy", "-", _copier(src, dst), bytes_per_step=2 * src.numel() * 4)
    info["copy_buffer_MiB"] = nbuf // MiB
    budget_s = args.case_budget
    done: list[Entry] = []
    if mode == "interleaved":
        entries = [copy] + [e for e in (build_entry(i, params, case, skipped) for i in impls) if e is not None]
        rounds(entries, device, args, skipped, case, progress, budget_s)
        progress.add(len(entries))
        for e in entries:
            extras(e, device, args, progress)
        done = entries
    else:
        copy_times, copy_cpu, copy_process = [], [], []
        for impl in impls:
            e = build_entry(impl, params, case, skipped)
            if e is None:
                continue
            copy.times, copy.cpu, copy.process_cpu = [], [], []
            entries = [copy, e]
            rounds(entries, device, args, skipped, case, progress, budget_s / max(len(impls), 1))
            copy_times += copy.times
            copy_cpu += copy.cpu
            copy_process += copy.process_cpu
            if e in entries:
                progress.add(1)
                extras(e, device, args, progress)
                e.phase = None
                e.built.opt = e.built.sched = e.built.keep = None
                done.append(e)
            del entries, e
            _free(device)
        copy.times, copy.cpu, copy.process_cpu = copy_times, copy_cpu, copy_process
        progress.add(1)
        extras(copy, device, args, progress)
        done = [copy] + done
    rows = [_row(e, case, mode, device) for e in done if e.times]
    _speedups(rows)
    for e in done:
        e.phase = e.built = None
    del done, params, src, dst, copy
    _reset_compile()
    _free(device)
    return rows, skipped


def _copier(src: torch.Tensor, dst: torch.Tensor):
    def phase():
        dst.copy_(src)

    return phase


def _row(e: Entry, case: Case, mode: str, device: torch.device) -> dict:
    s = measure.summarize(e.times)
    x = e.extras
    row = dict.fromkeys(report.ROW_KEYS)
    row.update({
        "case": case.name, "case_label": case.label, "impl": e.name, "kind": e.kind, "scheduler": e.scheduler,
        "tensors": len(case.shapes), "numel": case.numel, "param_dtype": str(case.dtype).replace("torch.", ""),
        "state_dtype": e.state_dtype, "mode": mode, "steps": len(e.times),
        "median_ms": s["median"] * 1e3, "p20_ms": s["p20"] * 1e3, "p80_ms": s["p80"] * 1e3,
        "bytes_per_step": e.bytes_per_step, "GBps": e.bytes_per_step / s["median"] / 1e9 if e.bytes_per_step else None,
        "host_cpu_us": measure.summarize(e.cpu)["median"] * 1e6, "host_cpu_clock": measure.cpu_clock_name(device),
        "process_cpu_us_mean": sum(e.process_cpu) / len(e.process_cpu) * 1e6 if e.process_cpu else None,
        "launches_per_step": x.get("launches_per_step"),
        "launch_detail": None if x.get("launch_detail") is None else {**x["launch_detail"],
                                                                     "source": x.get("launch_source")},
        "warmup_s": e.warmup_spent,
        "ops_per_step": x.get("ops_per_step"), "syncs_per_step": x.get("syncs_per_step"),
        "peak_extra_MiB": None if x.get("peak_extra") is None else x["peak_extra"] / MiB,
        "peak_memory_method": x.get("peak_memory_method"),
        "errors": {k: v for k, v in x.items() if k.endswith("_error")} or None,
    })
    if e.kind == "copy":
        row["state_dtype"] = None
    return row


def _speedups(rows: list[dict]) -> None:
    copy = next((r for r in rows if r["kind"] == "copy"), None)
    fused = [r["median_ms"] for r in rows if r["impl"].startswith("torch fused")]
    best = [r["median_ms"] for r in rows if r["kind"] in ("torch", "compile")]
    for r in rows:
        if copy is not None and r["GBps"] is not None:
            r["copy_GBps"] = copy["GBps"]
            r["fraction_of_copy"] = r["GBps"] / copy["GBps"]
        if r["kind"] != "copy":
            r["speedup_vs_torch_fused"] = min(fused) / r["median_ms"] if fused else None
            r["speedup_vs_best_torch"] = min(best) / r["median_ms"] if best else None


# -- environment -------------------------------------------------------------------------------------------------
def _git(*cmd) -> str:
    try:
        return subprocess.run(["git", *cmd], capture_output=True, text=True, check=False,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return ""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import fused_sched
    from fused_sched._extension import load_extension

    native = load_extension()
    env = {
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "python": platform.python_version(), "fused_sched": fused_sched.__version__,
        "commit": _git("rev-parse", "HEAD") or os.environ.get("BENCH_COMMIT", ""),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device_type": device.type, "cpu": _cpu_model(), "cpu_threads": torch.get_num_threads(),
        "cpu_capability": native.cpu_capability(), "fused_sched_cuda_kernels": bool(native.cuda_compiled()),
        "scheduler_source": scheduler_source(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"] = torch.cuda.get_device_name(device)
        env["gpu_memory_GiB"] = round(props.total_memory / 2**30, 1)
        env["cuda_driver"] = _nvidia_driver()
    else:
        env["device"] = f"{env['cpu']} ({env['cpu_threads']} threads)"
    return env


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=False, timeout=20).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


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
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end GPT check")
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
              "interrupted": False}
    header = (f"# fused_sched benchmark suite on {env['device']}: torch {env['torch']}, triton {env['triton']}, "
              f"CUDA {env['cuda']}, commit {env['commit'][:10]}{' (dirty)' if env['dirty'] else ''}, {env['date']}")
    progress = Progress(not args.no_progress)
    started = time.perf_counter()

    def left() -> float:
        return math.inf if args.time_limit is None else args.time_limit - (time.perf_counter() - started)

    try:
        for name in cases:
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
        if args.no_e2e:
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
                record["e2e"] = {"error": _reason(exc)}
    except KeyboardInterrupt:
        record["interrupted"] = True
        record["notes"].append("interrupted: the record holds the cases completed before the interrupt")
    finally:
        progress.close()
    record["elapsed_s"] = round(time.perf_counter() - started, 1)
    record["targets"] = report.targets(record["rows"], device.type)
    text = render(header, record, device)
    print(text)
    png = None if args.no_plot else report.chart(base + ".png", record["rows"], header.lstrip("# "))
    record["chart"] = os.path.basename(png) if png else None
    report.write_json(base + ".json", record)
    with open(base + ".md", "w") as f:
        f.write(text + "\n")
    written = [base + ".json", base + ".md"] + ([png] if png else [])
    print("results written to " + ", ".join(os.path.relpath(p) for p in written), file=sys.stderr)
    return record


def render(header: str, record: dict, device: torch.device) -> str:
    from .e2e import format_e2e

    parts = [header, ""]
    if record["rows"]:
        parts += [report.markdown_table(record["rows"]), "", report.legend(device.type), ""]
    for note in record["notes"]:
        parts.append(f"- {note}")
    if record["skipped"]:
        parts += ["", "Not measured:"]
        groups: dict = {}
        for s in record["skipped"]:
            groups.setdefault((s["impl"], s["reason"]), []).append(s["case"])
        parts += [f"- {', '.join(cases)}: {reason}" if impl == "(whole case)" else
                  f"- {impl} ({', '.join(cases)}): {reason}" for (impl, reason), cases in groups.items()]
    if record["targets"]:
        parts += ["", "## Targets (issue 5; read from this run, not asserted)", "",
                  report.targets_table(record["targets"])]
    if record["e2e"]:
        parts.append(format_e2e(record["e2e"]))
    parts.append(f"\nsuite time {record['elapsed_s']:.0f} s")
    return "\n".join(parts)


if __name__ == "__main__":
    main()
