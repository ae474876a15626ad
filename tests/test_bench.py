"""Smoke tests of the benchmark suite (python -m bench) on a tiny case: the table, the JSON record, the chart and
the end-to-end check are produced with every field. No timing is asserted."""

import json
import time

import pytest
import torch

from bench import report, suite
from bench.measure import TimeLimitExceeded, time_limit
from bench.shapes import tiny

TORCH_IMPLS = {"torch for-loop", "torch foreach", "torch fused", "torch fused, tensor lr"}
FUSED_SCHED_IMPLS = {"fused_sched cpu", "fused_sched cpu AdamW8bit", "fused_sched cpu bf16 states"}


def _run(tmp_path, *extra):
    return suite.main(["--device", "cpu", "--case", "tiny", "--steps", "2", "--warmup", "1", "--no-compile",
                       "--out", str(tmp_path), "--no-progress", *extra])


def test_suite_writes_table_json_and_chart(tmp_path, capsys):
    record = _run(tmp_path, "--e2e-steps", "6", "--stamp", "smoke")
    out = capsys.readouterr().out

    assert "| case | impl | median ms | p20 ms | p80 ms | GB/s | of copy |" in out
    for name in TORCH_IMPLS | FUSED_SCHED_IMPLS | {report.COPY_IMPL}:
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
    assert {r["impl"] for r in rows} == TORCH_IMPLS | FUSED_SCHED_IMPLS | {report.COPY_IMPL}
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
    assert [t["impl"] for t in data["targets"]] == []  # the CPU target is on the gpt2-124m case only

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
    record = _run(tmp_path, "--no-e2e", "--no-plot", "--impl", "fused", "--impl", "foreach")
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
