"""fused_sched.SGD8bit: SGD whose momentum buffer is kept in blockwise 8 bits, in the same one-launch kernels."""

from __future__ import annotations

import torch

from .adam8bit import _eight_bit_defaults
from .sgd import SGD


class SGD8bit(SGD):
    __doc__ = SGD.__doc__ + """
    **8-bit momentum.** ``momentum_buffer`` is stored as one uint8 code per element in the signed dynamic map
    (bitsandbytes' ``create_dynamic_map``) with one float32 ``absmax`` per block of ``block_size`` elements
    (``momentum_buffer_absmax``); each step dequantizes, updates in float32 and requantizes in one pass. Tensors
    with fewer than ``min_8bit_size`` elements, and groups with ``optim_bits=32``, keep a buffer of the group's
    ``state_dtype`` (float32 by default).

    Args (besides those of SGD):
        block_size (int): 32, 64, 128 or 256 (default: 256).
        min_8bit_size (int): smaller tensors keep a float32 buffer (default: 4096).
        optim_bits (int, param-group option): 8, or 32 for float32 buffers (default: 8).
"""

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, block_size: int = 256, min_8bit_size: int = 4096,
                 **kwargs) -> None:
        self._eight_bit = _eight_bit_defaults(block_size, min_8bit_size)
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, **kwargs)

    def _format_defaults(self) -> dict:
        return self._eight_bit
