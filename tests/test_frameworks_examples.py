"""The scripts under examples/ run, and the plain loop matches torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from frameworks_cases import _one_thread  # noqa: F401 (an autouse fixture: pytest finds it in this module)

ROOT = Path(__file__).resolve().parent.parent


# -- examples/ --------------------------------------------------------------------------------------------------
def _run_example(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _logged(stdout: str) -> list[tuple[int, float, float]]:
    """The (step, loss, lr) lines the examples print."""
    rows = []
    for line in stdout.splitlines():
        words = line.split()
        if len(words) == 6 and words[0] == "step" and words[2] == "loss" and words[4] == "lr":
            rows.append((int(words[1]), float(words[3]), float(words[5])))
    return rows


def test_example_plain_pytorch_loop():
    rows = _logged(_run_example("plain_pytorch_loop.py", "--steps", "30", "--log-every", "1"))
    assert [r[0] for r in rows] == list(range(1, 31))
    assert rows[-1][1] < rows[0][1] - 0.5  # it learns
    lrs = [r[2] for r in rows]
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(3e-3, rel=1e-3) and lrs[-1] < 1e-4  # warmup, then cosine


def test_example_hf_trainer_gpt2():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    rows = _logged(_run_example("hf_trainer_gpt2.py", "--steps", "4"))
    assert [r[0] for r in rows] == [1, 2, 3, 4]
    assert all(r[1] > 0 for r in rows)


def test_example_plain_loop_matches_torch():
    """The example's loop with fused_sched and with torch.optim + transformers' schedule: the same losses."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import plain_pytorch_loop
    finally:
        sys.path.remove(str(ROOT / "examples"))
    ours = plain_pytorch_loop.main(["--steps", "12", "--log-every", "100"])
    theirs = plain_pytorch_loop.main(["--steps", "12", "--log-every", "100", "--optimizer", "torch"])
    torch.testing.assert_close(ours, theirs)
