"""fused_sched.AdamW8bit and fused_sched.Adam8bit: AdamW / Adam with blockwise 8-bit moments (Dettmers et al.,
"8-bit Optimizers via Block-wise Quantization", 2022), in the same one-launch kernels as the float32 states."""

from __future__ import annotations

import torch

from .adam import Adam, AdamW

_EIGHT_BIT = """
    **8-bit states.** ``exp_avg`` is stored as one uint8 code per element in the signed dynamic (tree) map and
    ``exp_avg_sq`` in the unsigned one (bitsandbytes' ``create_dynamic_map``, 7 exponent bits), each with one float32
    ``absmax`` per block of ``block_size`` consecutive elements (``exp_avg_absmax``, ``exp_avg_sq_absmax`` in the
    state): a value is ``map[code] * absmax``. Each step dequantizes a block, runs the float32 update above on it,
    takes the block's new absmax and requantizes to the nearest code, in the same pass that updates the
    parameter: about 2 bytes of state per parameter instead of 8. Tensors with fewer than ``min_8bit_size``
    elements keep float32 states (``state_dtype``), as does a param group with ``optim_bits=32``.

    Args (besides those of {base}):
        block_size (int): elements per quantization block: 32, 64, 128 or 256, one for the whole optimizer
            (default: 256).
        min_8bit_size (int): tensors with fewer elements keep float32 states (default: 4096). Under FSDP2 the
            parameter's global size decides, and blocks run over each rank's local shard.
        optim_bits (int, param-group option): 8, or 32 to keep the group's states in float32 (default: 8).

    ``amsgrad`` is not supported with 8-bit states. ``state_dict()`` saves the codes and absmax as they are (a
    resumed run continues bit for bit); a torch.optim.AdamW state_dict loads and is quantized at the next step;
    ``fused_sched.to_torch_state_dict`` converts this optimizer's state_dict into one torch.optim.AdamW loads.
    ``block_size`` and ``min_8bit_size`` take effect when the optimizer builds its plan (the first step, and after
    ``add_param_group``, ``load_state_dict`` or a change of a group's format).
"""


def _eight_bit_defaults(block_size: int, min_8bit_size: int) -> dict:
    return {"optim_bits": 8, "block_size": block_size, "min_8bit_size": min_8bit_size}


class AdamW8bit(AdamW):
    __doc__ = AdamW.__doc__ + _EIGHT_BIT.format(base="AdamW")

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, block_size: int = 256,
                 min_8bit_size: int = 4096, **kwargs) -> None:
        self._eight_bit = _eight_bit_defaults(block_size, min_8bit_size)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **kwargs)

    def _format_defaults(self) -> dict:
        return self._eight_bit


class Adam8bit(Adam):
    __doc__ = Adam.__doc__ + _EIGHT_BIT.format(base="Adam")

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, amsgrad: bool = False, *, block_size: int = 256,
                 min_8bit_size: int = 4096, **kwargs) -> None:
        self._eight_bit = _eight_bit_defaults(block_size, min_8bit_size)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **kwargs)

    def _format_defaults(self) -> dict:
        return self._eight_bit
