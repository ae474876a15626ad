"""torch.distributed.checkpoint with fused_sched on FSDP2: a resumed run equals the uninterrupted one, and the
checkpoint API's state initialization leaves the parameters untouched (tests/distributed_cases.py: the harness).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import fused_sched
from distributed_cases import (
    _assert_params_equal,
    _fsdp_optimizer,
    _local,
    _mlp,
    _run,
    _sharded_mlp,
    _train,
)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


def _dcp_worker(rank: int, kind: str, directory: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    first, rest = 6, 4
    # Uninterrupted: first + rest steps.
    straight = _sharded_mlp()
    opt, sched = _fsdp_optimizer(kind, straight)
    straight_losses = _train(straight, opt, sched, rank, first + rest)

    # Interrupted: `first` steps, save model and optimizer with torch.distributed.checkpoint ...
    model = _sharded_mlp()
    opt, sched = _fsdp_optimizer(kind, model)
    losses = _train(model, opt, sched, rank, first)
    saved_sched = sched.state_dict()
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=directory)
    optim_state = get_optimizer_state_dict(model, opt)
    del model, opt, sched

    # ... then a fresh model (other weights) and optimizer load them and train `rest` more steps.
    model = _sharded_mlp(seed=123)
    opt, sched = _fsdp_optimizer(kind, model)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=directory)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    sched.load_state_dict(saved_sched)
    # The restored optimizer state is the saved one, DTensor shards included.
    restored = get_optimizer_state_dict(model, opt)
    for name, entry in optim_state["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(_local(restored["state"][name][key]), _local(value), rtol=0, atol=0)
    losses += _train(model, opt, sched, rank, rest, start=first)

    # Saving and loading is exact: the resumed run is the uninterrupted one, bit for bit.
    torch.testing.assert_close(losses, straight_losses, rtol=0, atol=0)
    for (name, a), (_, b) in zip(model.named_parameters(), straight.named_parameters(), strict=True):
        torch.testing.assert_close(_local(a), _local(b), rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
    if kind == "fused":
        # And it is torch's run.
        reference = _sharded_mlp()
        opt, sched = _fsdp_optimizer("torch", reference)
        torch.testing.assert_close(losses, _train(reference, opt, sched, rank, first + rest))
        _assert_params_equal(model, reference, rank)


@pytest.mark.parametrize("kind", ["torch", "fused"])
def test_fsdp2_checkpoint_resume_equals_uninterrupted(kind, tmp_path):
    """kind="torch" checks the harness (FSDP2 on gloo CPU with torch.optim.AdamW(foreach=False, fused=False) and
    the checkpoint round trip); kind="fused" is what fused_sched must do."""
    _run(_dcp_worker, kind, str(tmp_path / "checkpoint"))


def test_get_optimizer_state_dict_of_a_fresh_optimizer_leaves_params_untouched():
    """The checkpoint API's state initialization must not move the parameters: torch.optim.AdamW with its scheduler
    does not; neither must fused_sched.AdamW with its own (in process: no process group is needed)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    for kind, opt_class, schedulers in (
        ("torch", torch.optim.AdamW, torch.optim.lr_scheduler),
        ("fused", fused_sched.AdamW, fused_sched.lr_scheduler),
    ):
        model = _mlp()
        before = [p.detach().clone() for p in model.parameters()]
        opt = opt_class(model.parameters(), lr=0.1, weight_decay=0.5)
        schedulers.CosineAnnealingLR(opt, T_max=10)
        state = get_optimizer_state_dict(model, opt)
        assert len(state["state"]) == len(before)
        for p, b in zip(model.parameters(), before, strict=True):
            torch.testing.assert_close(p.detach(), b, rtol=0, atol=0, msg=lambda m, kind=kind: f"{kind}: {m}")
