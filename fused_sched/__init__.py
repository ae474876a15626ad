"""fused_sched: the optimizer step of large-model training, fused.

Drop-in replacements for torch.optim.AdamW / Adam / SGD that update every parameter tensor of a
(device, dtype) bucket in one call (C++ on CPU, Triton or CUDA on GPUs)::

    import fused_sched
    opt = fused_sched.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)

State dicts are interchangeable with torch.optim's.
"""

from . import hf_schedules, lr_scheduler
from .hf_schedules import (
    get_constant_schedule,
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_cosine_with_hard_restarts_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup_lr_rate,
    get_inverse_sqrt_schedule,
    get_linear_schedule_with_warmup,
    get_polynomial_decay_schedule_with_warmup,
    get_scheduler,
    get_wsd_schedule,
)
from .optim import (
    SGD,
    Adam,
    Adam8bit,
    AdamW,
    AdamW8bit,
    Muon,
    MuonWithAdamW,
    SGD8bit,
    muon_param_groups,
    to_torch_state_dict,
)

__version__ = "0.1.0"

__all__ = [
    "Adam",
    "AdamW",
    "SGD",
    "Muon",
    "MuonWithAdamW",
    "muon_param_groups",
    "AdamW8bit",
    "Adam8bit",
    "SGD8bit",
    "to_torch_state_dict",
    "get_constant_schedule",
    "get_constant_schedule_with_warmup",
    "get_cosine_schedule_with_warmup",
    "get_cosine_with_hard_restarts_schedule_with_warmup",
    "get_cosine_with_min_lr_schedule_with_warmup",
    "get_cosine_with_min_lr_schedule_with_warmup_lr_rate",
    "get_inverse_sqrt_schedule",
    "get_linear_schedule_with_warmup",
    "get_polynomial_decay_schedule_with_warmup",
    "get_scheduler",
    "get_wsd_schedule",
    "hf_schedules",
    "lr_scheduler",
    "__version__",
]
