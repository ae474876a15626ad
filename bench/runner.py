"""The suite's runner: implementations timed round by round (interleaved), their profiler counts, syncs and peak
memory, and the rows of the record made from them; a progress bar."""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass, field

import torch

from . import measure, report
from .cases import Case, MiB, copy_buffer_bytes, make_params
from .impls import Impl
from .measure import TimeLimitExceeded, cpu_clock, element_size, sync, time_limit


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
    state_bytes: float | None = None  # measured optimizer-state bytes per parameter element
    extras: dict = field(default_factory=dict)
    warmup_spent: float = 0.0


def failure_reason(exc: BaseException) -> str:
    """The exception's type and the first line of its message (at most 300 characters), for the record."""
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
                skipped.append({"case": case.name, "impl": e.name,
                                "reason": f"failed in warm-up: {failure_reason(exc)}"})
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
                    e.state_bytes = measure.state_bytes_per_param(e.built.params, e.built.opt)
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
                skipped.append({"case": case.name, "impl": e.name,
                                "reason": f"failed while timed: {failure_reason(exc)}"})
                e.phase = e.built = None
                _free(device)
            progress()


def extras(e: Entry, device: torch.device, args, progress: Progress) -> None:
    """Profiler counts, syncs and peak memory of one entry (after its timed rounds)."""
    out = e.extras
    try:
        out.update(measure.profile_phase(e.phase, device, steps=args.profile_steps))
    except Exception as exc:  # noqa: BLE001
        out["profile_error"] = failure_reason(exc)
    try:
        out["syncs_per_step"] = measure.count_syncs(e.phase, device, steps=args.profile_steps)
    except Exception as exc:  # noqa: BLE001
        out["syncs_error"] = failure_reason(exc)
    if device.type == "cuda":
        try:
            out["peak_extra"], out["peak_memory_method"] = measure.peak_extra_bytes(e.phase, device)
        except Exception as exc:  # noqa: BLE001
            out["peak_error"] = failure_reason(exc)
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
        skipped.append({"case": case.name, "impl": impl.name, "reason": f"construction failed: {failure_reason(exc)}"})
        return None
    return Entry(impl.name, impl.kind, impl.scheduler, built.phase, _Built(built, params), impl.warmup_limit)


def measure_case(case: Case, impls: list[Impl], mode: str, device: torch.device, args, progress: Progress,
                 skipped: list, info: dict) -> list[dict]:
    """Rows of `case`: the device copy ceiling and the implementations timed round by round, all interleaved or
    (mode "one at a time") each with the copy alone and its states freed before the next; implementations that
    fail are appended to `skipped`, the copy buffer's size to `info`."""
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
    return rows


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
        "state_dtype": e.state_dtype, "state_bytes_per_param": e.state_bytes, "mode": mode, "steps": len(e.times),
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
