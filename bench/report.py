"""Output of the suite: the markdown table, the targets read from it, the markdown report around them, the JSON
record and the PNG chart."""

from __future__ import annotations

import json
import os
import textwrap

#: metric keys every row of the JSON record carries (None where a metric does not apply or was not measured)
ROW_KEYS = (
    "case", "case_label", "impl", "kind", "scheduler", "tensors", "numel", "param_dtype", "state_dtype",
    "state_bytes_per_param", "mode",
    "steps", "median_ms", "p20_ms", "p80_ms", "bytes_per_step", "GBps", "copy_GBps", "fraction_of_copy",
    "speedup_vs_torch_fused", "speedup_vs_best_torch", "host_cpu_us", "host_cpu_clock", "process_cpu_us_mean",
    "launches_per_step",
    "launch_detail", "ops_per_step", "syncs_per_step", "peak_extra_MiB", "peak_memory_method", "warmup_s",
)

COPY_IMPL = "device copy (ceiling)"


def _fmt(value, spec: str, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    text = format(value, spec)
    if spec.endswith("f") and value > 0 and float(text) == 0:
        return "<" + format(10 ** -int(spec.strip(".f")), spec) + suffix  # e.g. "<0.1" rather than "0.0"
    return text + suffix


def markdown_table(rows: list[dict]) -> str:
    header = ("case", "impl", "median ms", "p20 ms", "p80 ms", "GB/s", "of copy", "vs torch fused",
              "vs best torch", "host CPU us/step", "launches/step", "ops/step", "syncs/step", "peak extra MiB",
              "state B/param")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["case_label"], r["impl"], _fmt(r["median_ms"], ".3f"), _fmt(r["p20_ms"], ".3f"),
            _fmt(r["p80_ms"], ".3f"), _fmt(r["GBps"], ".1f"), _fmt(r["fraction_of_copy"], ".0%"),
            _fmt(r["speedup_vs_torch_fused"], ".2f", "x"), _fmt(r["speedup_vs_best_torch"], ".2f", "x"),
            _fmt(r["host_cpu_us"], ".0f"), _fmt(r["launches_per_step"], ".1f"), _fmt(r["ops_per_step"], ".1f"),
            _fmt(r["syncs_per_step"], ".1f"), _fmt(r["peak_extra_MiB"], ".1f"),
            _fmt(r.get("state_bytes_per_param"), ".2f"),
        ]) + " |")
    return "\n".join(lines)


LEGEND = """\
Each row times the optimizer phase of a training step, `opt.step(); sched.step()` (AdamW with a cosine schedule
with warmup), implementations interleaved round by round on the same parameters and gradients, warm-up rounds
excluded. GB/s: the bytes the step must move (parameter read + write, gradient read, both states read + write, in
each implementation's own dtypes: torch and apex keep states in the parameter dtype, fused_sched in float32)
divided by the median time; "of copy": that rate over a device copy timed in the same rounds. "vs torch fused":
median time of the faster torch fused row (float or tensor lr) over this row's; "vs best torch": the same against
the fastest torch row (compile included). Host CPU: {clock}. Launches: {launches}. Ops: top-level dispatcher ops
(aten::, fused_sched::) per step. Syncs: {syncs}. Peak extra: {memory}."""


def legend(device_type: str) -> str:
    return textwrap.fill(_legend(device_type).replace("\n", " "), width=118)


def _legend(device_type: str) -> str:
    if device_type == "cuda":
        return LEGEND.format(
            clock="time.thread_time of the launching thread during the phase (the final synchronize excluded)",
            launches="CUDA kernels, memcpys and memsets per step recorded by the profiler (CUPTI)",
            syncs='warnings under torch.cuda.set_sync_debug_mode("warn") per step',
            memory="torch.cuda.max_memory_allocated during the phase minus the memory allocated before it")
    return LEGEND.format(
        clock="time.thread_time of the calling thread during the phase (on a CPU the host is the device: this is "
              "the calling thread's share of the arithmetic, not an overhead; the other intra-op threads are not in "
              "it, the JSON has the mean process_time of all threads)",
        launches="n/a on a CPU (no kernel launches; see ops)",
        syncs="n/a on a CPU (no device to wait for)",
        memory="peak of the c10 CPU allocator's allocations minus frees during the phase (profiler memory events)"
    ) + (" On a CPU a copy is not this machine's bandwidth ceiling for a few threads: kernels with more concurrent "
         "streams (AdamW has seven) move more bytes per second than a one-read one-write copy, so above 100% of copy "
         "is possible.")


# -- targets (issue 5): read from the benchmark, never asserted --------------------------------------------------
def targets(rows: list[dict], device_type: str) -> list[dict]:
    found = []

    def check(name, case, predicate, key, goal, fmt):
        for r in rows:
            if r["case"] == case and r["kind"] == "fused_sched" and r.get(key) is not None:
                value = r[key]
                found.append({"target": name, "case": r["case_label"], "impl": r["impl"], "value": format(value, fmt),
                              "goal": goal, "met": bool(predicate(value))})

    if device_type == "cuda":
        for case in ("gpt2-124m", "llama-1b"):
            check(">= 90% of copy", case, lambda v: v >= 0.9, "fraction_of_copy", ">= 0.90", ".2f")
        check(">= 1.3x torch fused + scheduler", "llama-1b", lambda v: v >= 1.3, "speedup_vs_torch_fused", ">= 1.3",
              ".2f")
        check(">= 5x torch fused + scheduler", "many-small", lambda v: v >= 5, "speedup_vs_torch_fused", ">= 5",
              ".2f")
        check("host time <= 30 us/step at 2000 tensors", "many-small", lambda v: v <= 30, "host_cpu_us", "<= 30",
              ".1f")
        for case in sorted({r["case"] for r in rows}):
            check("0 syncs per step", case, lambda v: v == 0, "syncs_per_step", "0", ".1f")
            check("<= 2 launches per step", case, lambda v: v <= 2, "launches_per_step", "<= 2", ".1f")
    else:
        check(">= 1.0x torch fused on GPT-2 shapes", "gpt2-124m", lambda v: v >= 1.0, "speedup_vs_torch_fused",
              ">= 1.0", ".2f")
    found += _state_format_targets(rows, device_type)
    return found


def _state_format_targets(rows: list[dict], device_type: str) -> list[dict]:
    """Issue 19's targets of the low-memory state formats (measured state bytes, speed)."""
    found = []

    def add(name, r, value, goal, met, fmt=".2f"):
        found.append({"target": name, "case": r["case_label"], "impl": r["impl"], "value": format(value, fmt),
                      "goal": goal, "met": bool(met)})

    plain = {(r["case"], r["impl"]): r for r in rows if r["kind"] == "fused_sched"}
    for r in rows:
        if r["kind"] != "fused_sched" or r.get("state_bytes_per_param") is None:
            continue
        bytes_ = r["state_bytes_per_param"]
        if "uint8" not in (r.get("state_dtype") or ""):
            continue  # every tensor below min_8bit_size: float32 states, no 8-bit target to read
        if r["impl"].endswith("AdamW8bit"):
            add("8-bit states <= 2.1 bytes/param", r, bytes_, "<= 2.1", bytes_ <= 2.1)
            base = plain.get((r["case"], r["impl"].removesuffix(" AdamW8bit")))
            if device_type == "cuda" and base is not None:
                ratio = base["median_ms"] / r["median_ms"]
                add("8-bit step >= 1.5x the float32-state step", r, ratio, ">= 1.5", ratio >= 1.5)
            if device_type != "cuda" and r["case"] == "gpt2-124m" and r.get("speedup_vs_torch_fused") is not None:
                add("8-bit not slower than torch fused on GPT-2", r, r["speedup_vs_torch_fused"], ">= 1.0",
                    r["speedup_vs_torch_fused"] >= 1.0)
        elif r["impl"].endswith("remainder masters"):
            add("AdamW8bit + remainder masters <= 4.2 bytes/param", r, bytes_, "<= 4.2", bytes_ <= 4.2)
    return found


def targets_table(found: list[dict]) -> str:
    lines = ["| target | case | impl | measured | goal | met |", "|---|---|---|---|---|---|"]
    for t in found:
        lines.append(f"| {t['target']} | {t['case']} | {t['impl']} | {t['value']} | {t['goal']} | "
                     f"{'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines)


# -- files -------------------------------------------------------------------------------------------------------
def write_json(path: str, record: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, default=str)
    os.replace(tmp, path)


COLORS = {"torch": "#7f7f7f", "compile": "#9467bd", "apex": "#2ca02c", "fused_sched": "#1f77b4"}


def chart(path: str, rows: list[dict], title: str) -> str | None:
    """Bytes moved per second per implementation, one panel per case, the device copy as the ceiling line.
    Returns None when matplotlib is missing (the table and the JSON do not need it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cases = []
    for r in rows:
        if r["case_label"] not in cases:
            cases.append(r["case_label"])
    if not cases:
        return None
    panels = []
    for case in cases:
        mine = [r for r in rows if r["case_label"] == case]
        impls = [r for r in mine if r["impl"] != COPY_IMPL and r["GBps"] is not None]
        copy = next((r for r in mine if r["impl"] == COPY_IMPL), None)
        panels.append((case, impls, copy))
    height = sum(1.0 + 0.32 * max(len(i), 1) for _, i, _ in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, max(3.0, height)), squeeze=False)
    for ax, (case, impls, copy) in zip(axes[:, 0], panels, strict=True):
        names = [r["impl"] for r in impls]
        rates = [r["GBps"] for r in impls]
        ax.barh(range(len(impls)), rates, color=[COLORS.get(r["kind"], "#ff7f0e") for r in impls])
        ax.set_yticks(range(len(impls)), names, fontsize=8)
        ax.invert_yaxis()
        if copy is not None and copy["GBps"]:
            ax.axvline(copy["GBps"], color="#d62728", linestyle="--", linewidth=1.2)
            ax.text(copy["GBps"], -0.6, f" device copy {copy['GBps']:.0f} GB/s", color="#d62728", fontsize=7,
                    va="bottom")
        for i, r in enumerate(impls):
            label = f" {r['GBps']:.1f}" + (f" ({r['fraction_of_copy']:.0%})" if r["fraction_of_copy"] else "")
            ax.text(r["GBps"], i, label, va="center", fontsize=7)
        top = max(rates + [copy["GBps"] if copy and copy["GBps"] else 0.0] + [1e-9])
        ax.set_xlim(0, top * 1.3)
        ax.set_title(case, fontsize=9, loc="left")
        ax.set_xlabel("GB/s moved by opt.step(); sched.step()", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(textwrap.fill(title, 100), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(header: str, record: dict, device_type: str) -> str:
    """The suite's markdown report: table and legend, notes, what was not measured and why, targets and the
    end-to-end check."""
    from .e2e import format_e2e

    parts = [header, ""]
    if record["rows"]:
        parts += [markdown_table(record["rows"]), "", legend(device_type), ""]
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
        parts += ["", "## Targets (issues 5 and 19; read from this run, not asserted)", "",
                  targets_table(record["targets"])]
    if record["e2e"]:
        parts.append(format_e2e(record["e2e"]))
    convergence = record.get("convergence")
    if convergence:
        from .convergence import format_convergence

        parts.append(format_convergence(convergence) if "runs" in convergence
                     else f"State-format convergence: {convergence['error']}")
    if record.get("muon"):
        from .muon import format_muon

        parts.append(format_muon(record["muon"], device_type))
    muon_convergence = record.get("muon_convergence")
    if muon_convergence:
        from .convergence import format_muon_convergence

        parts.append(format_muon_convergence(muon_convergence) if "runs" in muon_convergence
                     else f"\nMuon convergence: {muon_convergence['error']}")
    parts.append(f"\nsuite time {record['elapsed_s']:.0f} s")
    return "\n".join(parts)
