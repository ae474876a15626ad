"""fused_sched: the optimizer step of large-model training, fused.

Drop-in replacements for torch.optim.AdamW / Adam / SGD that update every parameter tensor of a
(device, dtype) bucket in one call (C++ on CPU, Triton or CUDA on GPUs)::

    import fused_sched
    opt = fused_sched.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)

State dicts are interchangeable with torch.optim's.
"""

from .optim import SGD, Adam, AdamW

__version__ = "0.1.0"

__all__ = ["Adam", "AdamW", "SGD", "__version__"]
