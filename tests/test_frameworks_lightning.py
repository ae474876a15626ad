"""fused_sched's AdamW in a Lightning module against torch.optim.AdamW (tolerances: tests/frameworks_cases.py)."""

from __future__ import annotations

import pytest
import torch

import fused_sched
from frameworks_cases import (
    _assert_params_close,
    _cosine,
    _data,
    _mlp,
    _one_thread,  # noqa: F401 (an autouse fixture: pytest finds it in this module)
    _optimizer,
)


# -- Lightning --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["CosineAnnealingLR", "get_cosine_schedule_with_warmup"])
def test_lightning_module_matches_torch_adamw(schedule):
    lightning = pytest.importorskip("lightning")
    if schedule == "get_cosine_schedule_with_warmup":
        transformers = pytest.importorskip("transformers")
    steps = 8

    class Module(lightning.LightningModule):
        def __init__(self, kind: str):
            super().__init__()
            self.net = _mlp()
            self.kind = kind
            self.losses, self.lrs = [], []

        def training_step(self, batch, batch_index):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.losses.append(loss.item())
            self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
            return loss

        def configure_optimizers(self):
            opt = _optimizer(self.kind, self.parameters())
            if schedule == "CosineAnnealingLR":
                sched = _cosine(self.kind, opt, steps)
            elif self.kind == "fused":
                sched = fused_sched.get_cosine_schedule_with_warmup(opt, 2, steps)
            else:
                sched = transformers.get_cosine_schedule_with_warmup(opt, 2, steps)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    xs, ys = zip(*_data(steps), strict=True)
    dataset = torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))
    runs = {}
    for kind in ("fused", "torch"):
        module = Module(kind)
        trainer = lightning.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False,
                                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, torch.utils.data.DataLoader(dataset, batch_size=4))
        assert type(trainer.optimizers[0]) is (fused_sched.AdamW if kind == "fused" else torch.optim.AdamW)
        assert len(module.losses) == steps
        runs[kind] = module
    ours, theirs = runs["fused"], runs["torch"]
    # Stepped at every step ("interval": "step"): a new lr at each step (warmup-cosine repeats 0.005 once).
    assert ours.lrs == theirs.lrs and len(set(ours.lrs)) >= steps - 1
    # Measured: losses at most 1.2e-7 apart, params at most 3e-8.
    torch.testing.assert_close(ours.losses, theirs.losses)
    _assert_params_close(ours, theirs)
