"""Smoke tests of the benchmark suite (python -m bench) on a tiny case: the table, the JSON record, the chart and
the end-to-end check are produced with every field. No timing is asserted."""

import importlib.util
import json
import time

import pytest
import torch

from bench import report, suite
from bench.impls import PEERS_8BIT
from bench.measure import TimeLimitExceeded, time_limit
from bench.shapes import tiny

TORCH_IMPLS = {"torch for-loop", "torch foreach", "torch fused", "torch fused, tensor lr"}
FUSED_SCHED_IMPLS = {"fused_sched cpu", "fused_sched cpu AdamW8bit", "fused_sched cpu bf16 states"}
# The 8-bit peers: test requirements (so CI has both, and both run on a CPU); a machine without one (the GPU check
# installs nothing) lists it under "Not measured" instead.
PEERS = {label for label, _, _ in PEERS_8BIT}
PEER_IMPLS = {label for label, package, _ in PEERS_8BIT if importlib.util.find_spec(package) is not None}


def _run(tmp_path, *extra):
    return suite.main(["--device", "cpu", "--case", "tiny", "--steps", "2", "--warmup", "1", "--no-compile",
                       "--out", str(tmp_path), "--no-progress", *extra])


def test_suite_writes_table_json_and_chart(tmp_path, capsys):
    record = _run(tmp_path, "--e2e-steps", "6", "--stamp", "smoke", "--no-muon")  # Muon: its own tests below
    out = capsys.readouterr().out

    assert "| case | impl | median ms | p20 ms | p80 ms | GB/s | of copy |" in out
    for name in TORCH_IMPLS | FUSED_SCHED_IMPLS | PEER_IMPLS | {report.COPY_IMPL}:
        assert f"| tiny fp32 | {name} |" in out
    assert "## End-to-end" in out
    assert "Convergence of the state formats" in out

    data = json.loads((tmp_path / "suite-cpu-smoke.json").read_text())
    assert data == json.loads(json.dumps(record, default=str))
    for key in ("device", "torch", "triton", "cuda", "commit", "date"):
        assert key in data
    assert data["device"] and data["date"] and data["torch"] == torch.__version__
    assert data["cuda"] == torch.version.cuda
    assert data["interrupted"] is False

    rows = data["rows"]
    assert {r["impl"] for r in rows} == TORCH_IMPLS | FUSED_SCHED_IMPLS | PEER_IMPLS | {report.COPY_IMPL}
    by_impl = {r["impl"]: r for r in rows}
    # Measured from the state tensors: float32 moments and a float32 step per tensor; bfloat16 moments half of it.
    full, half = by_impl["fused_sched cpu"]["state_bytes_per_param"], by_impl["fused_sched cpu bf16 states"][
        "state_bytes_per_param"]
    assert 8 <= full < 9 and 4 <= half < 5 and half - 4 == pytest.approx(full - 8)
    numel = sum(torch.Size(s).numel() for s in tiny())
    for r in rows:
        assert set(report.ROW_KEYS) <= set(r), set(report.ROW_KEYS) - set(r)
        assert r["steps"] == 2 and r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["GBps"] > 0 and r["fraction_of_copy"] > 0 and r["ops_per_step"] >= 1
        assert r["launches_per_step"] is None and r["syncs_per_step"] is None  # no device: n/a, not 0
        if r["impl"] != report.COPY_IMPL:
            # float32 AdamW: param read + write, grad read, two float32 states read + write (bfloat16 states: two
            # bytes each; the tiny case's tensors are below min_8bit_size, so AdamW8bit keeps float32 states)
            assert r["bytes_per_step"] == (20 if r["impl"].endswith("bf16 states") else 28) * numel
            assert r["numel"] == numel and r["tensors"] == len(tiny())
            assert r["speedup_vs_torch_fused"] > 0 and r["peak_extra_MiB"] is not None
    skipped = {s["impl"] for s in data["skipped"]}
    assert {"torch.compile, tensor lr", "apex FusedAdam", "fused_sched triton", "fused_sched cuda"} <= skipped
    assert set(PEERS) - PEER_IMPLS <= skipped
    assert [t["impl"] for t in data["targets"]] == []  # the CPU target is on the gpt2-124m case only

    convergence = data["convergence"]
    assert PEER_IMPLS <= {r["run"] for r in convergence["runs"]}, convergence["skipped"]
    for r in convergence["runs"]:
        assert len(r["losses"]) == 6 and r["step_ms"] > 0

    e2e = data["e2e"]
    assert e2e["steps"] == 6 and e2e["tolerance"] > 0
    assert [r["name"] for r in e2e["runs"]][-1] == "fused_sched cpu"
    for r in e2e["runs"]:
        assert len(r["losses"]) == 6 and r["step_ms_median"] > 0
    assert e2e["max_abs_loss_diff"] <= e2e["tolerance"]

    assert (tmp_path / "suite-cpu-smoke.md").read_text().startswith("# fused_sched benchmark suite on ")
    if data["chart"] is None:
        pytest.importorskip("matplotlib")  # the chart is optional: without matplotlib only it may be missing
        pytest.fail("matplotlib is installed but no chart was written")
    assert (tmp_path / data["chart"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_implementations_run_one_at_a_time_when_they_do_not_fit_together(tmp_path, monkeypatch, capsys):
    real = suite.needs

    def budget(device):
        impls, _ = suite.candidates(device, len(tiny()), compile_=False, compile_limit=0, compile_max_tensors=0)
        _, one_at_a_time = real(impls, sum(torch.Size(s).numel() for s in tiny()), torch.float32)
        return one_at_a_time  # enough for one implementation, not for all of them

    monkeypatch.setattr(suite, "memory_budget", budget)
    record = _run(tmp_path, "--no-e2e", "--no-muon", "--no-plot", "--impl", "fused", "--impl", "foreach")
    assert {r["mode"] for r in record["rows"]} == {"one at a time"}
    assert {r["impl"] for r in record["rows"]} == {report.COPY_IMPL, "torch foreach", "torch fused",
                                                   "torch fused, tensor lr"} | FUSED_SCHED_IMPLS
    copy = next(r for r in record["rows"] if r["impl"] == report.COPY_IMPL)
    assert copy["steps"] == 2 * 6  # the copy ceiling is timed alongside each implementation
    assert "one at a time" in capsys.readouterr().out


def test_time_limit_interrupts_a_long_call():
    start = time.perf_counter()
    with pytest.raises(TimeLimitExceeded), time_limit(0.2):
        while time.perf_counter() - start < 10:
            pass
    assert time.perf_counter() - start < 5
    with time_limit(None):  # no limit: a no-op
        pass


def test_table_and_targets_handle_missing_metrics():
    row = dict.fromkeys(report.ROW_KEYS)
    row.update({"case": "many-small", "case_label": "many-small", "impl": "fused_sched triton",
                "kind": "fused_sched", "median_ms": 1.0, "p20_ms": 0.9, "p80_ms": 1.1, "speedup_vs_torch_fused": 6.0,
                "host_cpu_us": 25.0, "syncs_per_step": 0.0, "launches_per_step": 3.0})
    assert "| many-small | fused_sched triton | 1.000 |" in report.markdown_table([row])
    met = {t["target"]: t["met"] for t in report.targets([row], "cuda")}
    assert met == {">= 5x torch fused + scheduler": True, "host time <= 30 us/step at 2000 tensors": True,
                   "0 syncs per step": True, "<= 2 launches per step": False}


class _FakeKinetoEvent:
    def __init__(self, name, kind):
        self._name, self._kind = name, kind

    def name(self):
        return self._name

    def activity_type(self):
        return self._kind


def test_launch_count_keeps_kernels_and_copies_and_drops_annotations():
    from bench.measure import device_activities

    events = [_FakeKinetoEvent("fused_adam_kernel", "kernel"), _FakeKinetoEvent("Memcpy HtoD", "gpu_memcpy"),
              _FakeKinetoEvent("Memset (Device)", "gpu_memset"),
              _FakeKinetoEvent("Optimizer.step#AdamW.step", "gpu_user_annotation"),
              _FakeKinetoEvent("cudaLaunchKernel", "cuda_runtime"), _FakeKinetoEvent("aten::add_", "cpu_op")]
    assert device_activities(events) == {"kernels": 1, "memcpy": 1, "memset": 1, "runtime_launch_calls": 1}


def test_large_model_recipes_run_and_record(tmp_path, capsys):
    from bench import bench_large_model

    rows = bench_large_model.main(["--case", "tiny", "--steps", "2", "--out", str(tmp_path)])
    assert {r["recipe"] for r in rows} == {"clip", "amp", "master"}
    assert all(r["median_ms"] > 0 and r["speedup_vs_torch_fused"] > 0 for r in rows)
    assert [r["impl"] for r in rows if r["recipe"] == "clip"][0].startswith("torch fused")
    record = json.loads(next(tmp_path.glob("large-model-*.json")).read_text())
    assert record["case"] == "tiny" and record["rows"] == rows and record["commit"]
    assert "| clip | fused_sched max_grad_norm |" in capsys.readouterr().out


# -- Muon rows (bench/muon.py) and the Muon convergence check ------------------------------------------------------
MUON_IMPLS = {"muon: torch Muon + torch AdamW", "muon: torch Muon + torch AdamW fused",
              "muon: fused_sched cpu MuonWithAdamW"}


def test_muon_rows_and_convergence_in_the_suite(tmp_path, capsys, monkeypatch):
    from functools import partial

    from bench import convergence
    from bench.muon import muon_split
    from bench.shapes import tiny_gpt

    monkeypatch.setattr(convergence, "TinyGPT", partial(convergence.TinyGPT, d=32, heads=2, layers=1))  # seconds
    record = _run(tmp_path, "--muon-only", "--e2e-steps", "4", "--no-plot", "--stamp", "muon")
    out = capsys.readouterr().out
    assert record["rows"] == [] and record["e2e"] is None and record["convergence"] is None  # --muon-only
    assert "## Muon: torch.optim.Muon + torch.optim.AdamW" in out
    assert "| tiny-gpt fp32 | 28 | 8 | 4 | 20 |" in out  # tensors, Muon matrices, distinct shapes, AdamW tensors
    muon = json.loads((tmp_path / "suite-cpu-muon.json").read_text())["muon"]
    rows = {r["impl"]: r for r in muon["rows"]}
    assert set(rows) == MUON_IMPLS
    shapes = tiny_gpt()
    split = muon_split(shapes)
    matrices = sum(torch.Size(s).numel() for s, m in zip(shapes, split, strict=True) if m)
    numel = sum(torch.Size(s).numel() for s in shapes)
    # float32 momentum for the matrices, two float32 moments for the rest, plus step counters (a few bytes)
    floor = (4 * matrices + 8 * (numel - matrices)) / numel
    for name, r in rows.items():
        assert set(report.ROW_KEYS) <= set(r)
        assert r["case"] == "tiny" and r["steps"] == 2 and r["numel"] == numel
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["ops_per_step"] >= 1
        assert r["launches_per_step"] is None and r["syncs_per_step"] is None  # no device: n/a, not 0
        assert (r["muon_tensors"], r["distinct_shapes"], r["adamw_tensors"]) == (8, 4, 20)
        assert floor <= r["state_bytes_per_param"] < floor + 0.05, name
        assert r["speedup_vs_torch_muon"] > 0 and r["speedup_vs_best_torch"] > 0
    assert rows["muon: torch Muon + torch AdamW"]["speedup_vs_torch_muon"] == 1.0
    assert [t["impl"] for t in muon["targets"]] == ["muon: fused_sched cpu MuonWithAdamW"] * 2
    assert "## Muon convergence" in out

    conv = record["muon_convergence"]
    assert [r["run"] for r in conv["runs"]] == ["torch Muon + torch AdamW", "torch Muon + torch AdamW fused "
                                                "(reference)", "fused_sched cpu MuonWithAdamW"]
    base = conv["runs"][0]["losses"]
    for r in conv["runs"]:
        assert len(r["losses"]) == 4 and r["step_ms"] > 0
        gaps = [abs(r["losses"][s - 1] - base[s - 1]) / base[s - 1] for s in conv["logged_steps"]]
        assert r["logged_relative_diff"] == pytest.approx(gaps) and max(gaps) <= 0.01
    assert conv["within_target"] is True

    # Muon's FSDP2 all-gathers (bench/muon_distributed.py) follow the Muon rows, on tiny-gpt's matrices here.
    if torch.distributed.is_available() and torch.distributed.is_gloo_available():
        distributed = muon["distributed"]
        assert "error" not in distributed, distributed
        assert distributed["label"] == "tiny-gpt" and len(distributed["shapes"]) == 8 and distributed["groups"] == 4
        assert distributed["steps"] == 2 and "### Muon under FSDP2: the all-gathers (tiny-gpt" in out


DISTRIBUTED = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                 reason="torch.distributed with gloo is needed")


@DISTRIBUTED
def test_muon_distributed_counts_the_gathered_bytes_and_times_the_parts():
    """2 gloo ranks, uneven shards (5 rows as 3 + 2, 3 as 2 + 1, 1 as 1 + 0) padded to the larger one: the bytes
    each rank receives, computed by hand and counted from the collective's tensors; every part timed, within the
    step."""
    from bench.muon_distributed import format_distributed, gather_bytes, run_muon_distributed

    shapes = [(5, 8), (5, 8), (3, 16), (1, 4), (24, 24)]
    # Per shape group, 2 bytes x matrices x padded rows x columns, received from the one other rank:
    # 5x8 (two): 2*2*3*8 = 96 (16 of it padding); 3x16: 2*2*16 = 64 (16); 1x4: 2*1*4 = 8 (4); 24x24: 2*12*24 = 576.
    assert gather_bytes(shapes) == (744, 36)
    result = run_muon_distributed(shapes, "uneven", steps=2, warmup=1)
    assert (result["backend"], result["world"], result["groups"]) == ("gloo", 2, 4)
    assert (result["bytes_per_rank"], result["padding_bytes_per_rank"]) == (744, 36)
    sharded, *single = result["runs"]
    assert [r["local_rows"] for r in sharded["ranks"]] == [[3, 3, 2, 1, 12], [2, 2, 1, 0, 12]]
    for rank in sharded["ranks"]:
        assert rank["bytes_per_step"] == [744, 744] and rank["gathers_per_step"] == [4, 4]
        assert len(rank["plain_steps_ms"]) == 2 and min(rank["plain_steps_ms"]) > 0
        assert 0 < rank["gather_ms"] <= rank["instrumented_step_ms"]
        assert 0 < rank["newton_schulz_ms"] <= rank["orthogonalize_ms"] <= rank["instrumented_step_ms"]
        assert rank["wait_ms"] + rank["gather_ms"] + rank["newton_schulz_ms"] <= rank["orthogonalize_ms"]
        assert rank["kernel_passes_ms"] > 0 and rank["other_ms"] >= 0
    assert sharded["gather_ms"] == max(r["gather_ms"] for r in sharded["ranks"])  # the slower rank's
    assert single and single[0]["processes"] == 1
    for r in single:
        assert r["gather_ms"] == r["wait_ms"] == 0 and r["bytes_per_step"] == [0, 0]
        assert 0 < r["newton_schulz_ms"] <= r["instrumented_step_ms"] and r["step_ms"] > 0
    text = format_distributed(result)
    assert "| FSDP2, 2 ranks (gloo) | 2 x " in text and "| one process" in text
    assert "the 4 all-gathers (one per shape) receive 0.000744 MB (3.6e-05 MB of it padding" in text


def test_muon_convergence_logs_every_step_within_one_percent():
    from bench.convergence import format_muon_convergence, run_muon_convergence

    result = run_muon_convergence(torch.device("cpu"), steps=8, log_every=3, d=32, heads=2, layers=1)
    assert result["logged_steps"] == [1, 4, 7, 8]
    torch_run, fused = result["runs"][0], result["runs"][-1]
    assert fused["run"] == "fused_sched cpu MuonWithAdamW"
    assert torch_run["losses"][-1] < torch_run["losses"][0]  # it trains
    for step, gap in zip(result["logged_steps"], fused["logged_relative_diff"], strict=True):
        a, b = fused["losses"][step - 1], torch_run["losses"][step - 1]
        assert gap == pytest.approx(abs(a - b) / b) and gap <= 0.01
    assert result["within_target"] is True
    text = format_muon_convergence(result)
    assert "| 8 |" in text and "every logged step within 1%" in text


def test_muon_ops_grow_with_distinct_shapes_not_matrices():
    """Three blocks have three times the matrices of one block and the same four shapes: fused_sched's ops per step
    stay the same, torch's grow."""
    from bench.measure import profile_phase
    from bench.muon import muon_candidates
    from bench.shapes import gpt2

    ops = {}
    for layers in (1, 3):
        shapes = gpt2(layers, d=32, vocab=64, ctx=16)
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        impls, _ = muon_candidates(torch.device("cpu"), shapes)
        for impl in impls:
            built = impl.build(params)
            built.phase()  # the first step builds states and plans
            ops[impl.name, layers] = profile_phase(built.phase, torch.device("cpu"), steps=1)["ops_per_step"]
    fused, torch_pair = "muon: fused_sched cpu MuonWithAdamW", "muon: torch Muon + torch AdamW"
    assert ops[fused, 3] == ops[fused, 1]
    assert ops[torch_pair, 3] >= ops[torch_pair, 1] + 8 * 10  # 8 more matrices, a Newton-Schulz each
