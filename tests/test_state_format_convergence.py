"""Convergence of every state format (bench/convergence.py): bench/e2e.py's small GPT trained 300 steps on the CPU
with each format ends within 1% of float32 AdamW's loss (mean of the last 20 steps), each SGD format within 1% of
float32 SGD's. bfloat16 moments rounded to nearest run for contrast and are only reported."""

from __future__ import annotations

import pytest
import torch

from bench.convergence import RUNS, SGD_RUNS, TARGET, final_loss, train


@pytest.mark.parametrize("family", ["AdamW", "SGD"])
def test_every_format_converges_like_float32(family):
    device = torch.device("cpu")
    # The benchmark's model at half its width (d_model 64: every weight matrix still has >= 4096 elements, so
    # AdamW8bit and SGD8bit quantize all of them; 4x less work per step for CI's 2 cores).
    family_runs = RUNS if family == "AdamW" else SGD_RUNS
    runs = {name: (train(make, dtype, 300, device, d=64)[0], contrast)
            for name, make, dtype, contrast in family_runs}
    base_losses, _ = runs[family_runs[0][0]]
    base = final_loss(base_losses)
    print({name: round(final_loss(losses), 4) for name, (losses, _) in runs.items()})
    assert base_losses[0] - base > 1.0  # it learned something
    for name, (losses, contrast) in runs.items():
        if not contrast:
            assert abs(final_loss(losses) - base) <= TARGET * base, f"{name}: {final_loss(losses):.4f} vs {base:.4f}"
