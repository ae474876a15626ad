"""fused_sched.hf_schedules.get_scheduler against transformers': names, dispatch, errors, and the lambdas that fall
back to host mode."""

import copy

import pytest
import torch

import fused_sched
from fused_sched import hf_schedules as ours
from hf_schedule_cases import LR, HFSchedulerType, _assert_applied, _fused, _run, _same_error, _torch, hf

# -- get_scheduler ---------------------------------------------------------------------------------------------
SCHEDULER_KWARGS = {
    "linear": {},
    "cosine": {"num_cycles": 1.25},
    "cosine_with_restarts": {"num_cycles": 3},
    "polynomial": {"power": 2.0, "lr_end": 1e-3},
    "constant": {},
    "constant_with_warmup": {},
    "inverse_sqrt": {"timescale": 30},
    "cosine_with_min_lr": {"min_lr_rate": 0.1},
    "cosine_warmup_with_min_lr": {"min_lr": 1e-3, "warmup_lr_rate": 0.2},
    "warmup_stable_decay": {"num_decay_steps": 30, "decay_type": "1-sqrt", "min_lr_ratio": 0.05},
}


def test_scheduler_names():
    assert set(ours.SCHEDULER_NAMES) == set(SCHEDULER_KWARGS)
    assert [t.value for t in ours.SchedulerType] == [t.value for t in HFSchedulerType]
    for t in HFSchedulerType:
        assert ours.SchedulerType(t) is ours.SchedulerType(t.value) is ours.SchedulerType[t.name]


@pytest.mark.parametrize("name", sorted(SCHEDULER_KWARGS))
@pytest.mark.parametrize("spelling", ["str", "ours", "transformers"])
def test_get_scheduler_dispatch(name, spelling):
    key = {"str": name, "ours": ours.SchedulerType(name), "transformers": HFSchedulerType(name)}[spelling]
    kwargs = SCHEDULER_KWARGS[name]
    opt, params = _fused()
    sched = ours.get_scheduler(key, opt, num_warmup_steps=10, num_training_steps=100,
                               scheduler_specific_kwargs=dict(kwargs) or None)
    hf_opt = _torch()
    hf_sched = hf.get_scheduler(name, hf_opt, num_warmup_steps=10, num_training_steps=100,
                                scheduler_specific_kwargs=dict(kwargs) or None)
    assert isinstance(sched, ours.ProgramLambdaLR) and type(hf_sched) is torch.optim.lr_scheduler.LambdaLR
    _assert_applied(*_run(opt, params, sched, hf_opt, hf_sched, 400))

    # on a torch optimizer: a plain LambdaLR with transformers' values
    t_opt = _torch()
    t_sched = ours.get_scheduler(key, t_opt, num_warmup_steps=10, num_training_steps=100,
                                 scheduler_specific_kwargs=dict(kwargs) or None)
    hf_opt = _torch()
    hf_sched = hf.get_scheduler(name, hf_opt, num_warmup_steps=10, num_training_steps=100,
                                scheduler_specific_kwargs=dict(kwargs) or None)
    assert t_sched._binding is None
    for _ in range(150):
        assert t_sched.get_last_lr() == hf_sched.get_last_lr()
        t_opt.step()
        hf_opt.step()
        t_sched.step()
        hf_sched.step()


def test_get_scheduler_reduce_on_plateau():
    try:
        from fused_sched.lr_scheduler import ReduceLROnPlateau as expected_cls
    except ImportError:
        expected_cls = torch.optim.lr_scheduler.ReduceLROnPlateau
    for key in ("reduce_lr_on_plateau", HFSchedulerType.REDUCE_ON_PLATEAU):
        sched = ours.get_scheduler(key, _torch(), num_warmup_steps=None,
                                   scheduler_specific_kwargs={"patience": 2, "factor": 0.5})
        assert type(sched) is expected_cls
        assert (sched.patience, sched.factor) == (2, 0.5)
    sched = ours.get_scheduler("reduce_lr_on_plateau", _torch())
    assert sched.patience == 10


def test_get_scheduler_constant_ignores_arguments():
    opt, params = _fused()
    sched = ours.get_scheduler("constant", opt, num_warmup_steps=10, num_training_steps=100,
                               scheduler_specific_kwargs={"anything": 1})
    hf_opt = _torch()
    hf_sched = hf.get_scheduler("constant", hf_opt, num_warmup_steps=10, num_training_steps=100,
                                scheduler_specific_kwargs={"anything": 1})
    _assert_applied(*_run(opt, params, sched, hf_opt, hf_sched, 50))


def test_get_scheduler_errors_match_transformers():
    fused_opt = _fused()[0]
    torch_opt = _torch()
    calls = [("cosine_annealing", {}), ("LINEAR", {"num_warmup_steps": 1, "num_training_steps": 2})]
    for name in SCHEDULER_KWARGS:
        if name != "constant":
            calls.append((name, {"num_training_steps": 100}))  # no num_warmup_steps
        if name not in ("constant", "constant_with_warmup", "inverse_sqrt"):
            calls.append((name, {"num_warmup_steps": 10}))  # no num_training_steps (wsd: no stable steps either)
    calls += [
        ("linear", {"num_warmup_steps": 10, "num_training_steps": 100, "scheduler_specific_kwargs": {"power": 2}}),
        ("cosine_with_min_lr", {"num_warmup_steps": 10, "num_training_steps": 100}),
        ("polynomial", {"num_warmup_steps": 10, "num_training_steps": 100,
                        "scheduler_specific_kwargs": {"lr_end": 1.0}}),
    ]
    for name, kwargs in calls:
        err = _same_error(lambda n=name, k=kwargs: ours.get_scheduler(n, fused_opt, **copy.deepcopy(k)),
                          lambda n=name, k=kwargs: hf.get_scheduler(n, torch_opt, **copy.deepcopy(k)))
        assert isinstance(err, (ValueError, TypeError)), (name, kwargs, err)
    # an unknown name lists the known ones, as transformers does
    with pytest.raises(ValueError, match="is not a valid SchedulerType, please select one of"):
        ours.get_scheduler("step", fused_opt)
    # wsd with only the stable phase given needs no total
    sched = ours.get_scheduler("warmup_stable_decay", fused_opt, num_warmup_steps=5,
                               scheduler_specific_kwargs={"num_decay_steps": 10, "num_stable_steps": 7})
    assert sched._binding is not None


def test_user_lambda_falls_back_to_host_mode():
    opt, params = _fused()
    sched = ours.ProgramLambdaLR(opt, lambda t: 0.5 ** t)
    hf_opt = _torch()
    hf_sched = torch.optim.lr_scheduler.LambdaLR(hf_opt, lambda t: 0.5 ** t)
    assert sched._host_mode
    _assert_applied(*_run(opt, params, sched, hf_opt, hf_sched, 30))


def test_tensor_lr_runs_in_host_mode():
    # torch computes a Tensor lr's schedule in the tensor's dtype: the host values are the truth, uploaded each step
    p = torch.nn.Parameter(torch.zeros(1))
    p.grad = torch.ones(1)
    opt = fused_sched.SGD([p], lr=torch.tensor(LR), backend="cpu")
    sched = ours.get_cosine_schedule_with_warmup(opt, 10, 100)
    hf_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=torch.tensor(LR))
    hf_sched = hf.get_cosine_schedule_with_warmup(hf_opt, 10, 100)
    assert sched._host_mode
    for _ in range(150):
        lr = hf_sched.get_last_lr()[0]
        assert torch.equal(sched.get_last_lr()[0], lr)
        opt.step()
        hf_opt.step()
        assert torch.equal(-p.detach(), lr.reshape(1))
        with torch.no_grad():
            p.zero_()
        sched.step()
        hf_sched.step()


def test_get_scheduler_greedy_is_transformers():
    sched = ours.get_scheduler("greedy", _torch(), scheduler_specific_kwargs={"patience": 3})
    assert type(sched) is hf.GreedyLR and sched.patience == 3
