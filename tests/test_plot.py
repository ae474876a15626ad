"""python -m fused_sched plot: the curve it draws is the kernels' learning rate, and the command writes a PNG."""

import subprocess
import sys

import pytest
import torch
import transformers

from fused_sched import plot


def test_curve_is_the_kernel_lr_of_the_schedule():
    values = plot.curve("cosine", 0.01, 10, 100, {}, steps=120)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    ref = transformers.get_cosine_schedule_with_warmup(opt, 10, 100)
    expected = []
    for _ in range(120):
        expected.append(ref.get_last_lr()[0])
        opt.step()
        ref.step()
    assert values == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_plot_command_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is the optional plot dependency (installed by .ci)")
    out = tmp_path / "lr.png"
    result = subprocess.run(
        [sys.executable, "-m", "fused_sched", "plot", "warmup_stable_decay", "--warmup", "10", "--total", "100",
         "--kw", "num_decay_steps=30", "-o", str(out)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown schedule"):
        plot.curve("no_such_schedule", 0.01, 0, 10, {})
