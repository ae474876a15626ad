"""The two elementwise passes of a Muon step (csrc/include/fused_sched/muon_math.h) written with torch's own ops, as
torch.optim.Muon (torch/optim/_muon.py) performs them: the model every backend's Muon kernels are compared with.

The params' arithmetic is float32 whatever their dtype (a bfloat16 / float16 param is widened, updated, and rounded
to nearest even once), the momentum buffer is float32 and the workspace of the update bfloat16.
"""

from __future__ import annotations

import torch


def momentum_pass(grad: torch.Tensor, buf: torch.Tensor, momentum: float, nesterov: bool, *,
                  grad_scale: float | None = None, clip_coef: float | None = None):
    """Returns (the gradient as the kernel writes it back, the new momentum buffer, the bfloat16 update)."""
    g = grad.float()
    if grad_scale is not None:
        g = g / torch.tensor(grad_scale, dtype=torch.float32)
    if clip_coef is not None:
        g = g * torch.tensor(clip_coef, dtype=torch.float32)
    buf = buf.clone()
    buf.lerp_(g, 1 - momentum)  # torch.optim.Muon: buf.lerp_(grad, 1 - momentum)
    update = g.lerp(buf, momentum) if nesterov else buf
    written_grad = g.to(grad.dtype) if (grad_scale is not None or clip_coef is not None) else grad.clone()
    return written_grad, buf, update.bfloat16()


def update_pass(param: torch.Tensor, update: torch.Tensor, lr: float, weight_decay: float, lr_ratio: float):
    """The param after torch.optim.Muon's two in-place ops, given the orthogonalized bfloat16 update."""
    p = param.to(torch.float32, copy=True)  # param.float() of a float32 param is the param itself
    p.mul_(1 - lr * weight_decay)
    p.add_(update, alpha=-(lr * lr_ratio))  # torch.optim.Muon: param.add_(update, alpha=-adjusted_lr)
    return p.to(param.dtype)
