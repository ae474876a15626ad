"""The schedulers' lrs applied by the Triton and CUDA backends' kernels, against torch (CPU tensors)."""

from __future__ import annotations

import pytest
import torch

import fused_sched
from fused_sched import hf_schedules
from sched_cases import CASES, Pair

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# The Triton backend evaluates the same programs in its own float64 code (fused_sched/backends/triton/schedule.py);
# under the interpreter a step costs tens of milliseconds, so a few cases and fewer steps. The CUDA kernels include
# schedule_math.h as the CPU kernels do; these CPU-tensor tests run their host build (conftest.py), so they check
# the CUDA kernels' use of the programs, not CUDA's device cos / pow (tests/test_gpu.py does, on a GPU).
TRITON_CASES = ["cosine_eta_min", "warm_restarts_t_mult_2", "cyclic_triangular2", "polynomial_sqrt"]
DEVICE_BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(not fused_sched.backends.triton_interpreted(),
                                                    reason="needs TRITON_INTERPRET=1 (CPU tensors)")),
    pytest.param("cuda", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                  reason="CPU tensors: the host build of the CUDA kernels")),
]


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("name", TRITON_CASES)
def test_kernel_lr_matches_torch_on_device_backends(name, backend):
    factory, _, exact = CASES[name]
    pair = Pair(backend=backend)
    scheds = pair.make(factory)
    pair.run(scheds, 150)
    if exact:
        assert pair.off_by_one_ulp == []


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("factory,kwargs", [
    ("get_cosine_schedule_with_warmup", {"num_warmup_steps": 20, "num_training_steps": 100}),
    ("get_wsd_schedule", {"num_warmup_steps": 10, "num_decay_steps": 40, "num_training_steps": 100,
                          "warmup_type": "cosine", "decay_type": "1-sqrt", "min_lr_ratio": 0.1}),
], ids=lambda v: v if isinstance(v, str) else "")
def test_transformers_schedule_kernel_lr_on_device_backends(factory, kwargs, backend):
    import transformers

    probe = torch.zeros(1, requires_grad=True)
    opt = fused_sched.SGD([probe], lr=0.05, backend=backend)
    ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    ours, ref = getattr(hf_schedules, factory)(opt, **kwargs), getattr(transformers, factory)(ref_opt, **kwargs)
    for step in range(130):  # past the end of the schedule
        probe.grad = torch.ones(1)
        opt.step()
        assert -probe.item() == torch.tensor(ref.get_last_lr()[0], dtype=torch.float32).item(), step
        with torch.no_grad():
            probe.zero_()
        ref_opt.step()
        ours.step()
        ref.step()
