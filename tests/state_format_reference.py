"""Plain-torch float64 references of the low-memory state formats, written from the paper and bitsandbytes'
description, independent of fused_sched/optim/state_format.py (which is the kernels' exact mirror).

* The dynamic map: for each exponent i = 0..6, the midpoints of an even split of [0.1, 1] into 2^i (signed, with
  their negatives) or 2^(i+1) (unsigned) parts, scaled by 10^(i-6); plus 0 and 1.
* Blockwise quantization: absmax of each block, the value divided by it, the nearest map value.
* One Adam / SGD step in float64 on the dequantized states.
"""

from __future__ import annotations

import math

import torch


def dynamic_map64(signed: bool) -> torch.Tensor:
    values = [0.0, 1.0]
    for i in range(7):
        parts = 2 ** i if signed else 2 ** (i + 1)
        for j in range(parts):
            mid = 0.1 + 0.9 * (j + 0.5) / parts
            values.append(mid * 10.0 ** (i - 6))
            if signed:
                values.append(-mid * 10.0 ** (i - 6))
    return torch.tensor(sorted(values), dtype=torch.float64)


def quantize64(x: torch.Tensor, codes: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, absmax, normalized values) of float64 values: nearest map value (argmin of the distance)."""
    flat = x.reshape(-1).double()
    n = flat.numel()
    blocks = -(-n // block)
    padded = torch.zeros(blocks * block, dtype=torch.float64)
    padded[:n] = flat
    absmax = padded.abs().reshape(blocks, block).amax(1)
    scale = absmax.repeat_interleave(block)[:n]
    y = torch.where(scale == 0, torch.zeros_like(flat), flat / scale)
    q = (y[:, None] - codes.double()[None, :]).abs().argmin(1)
    return q, absmax, y


def dequantize64(q: torch.Tensor, absmax: torch.Tensor, codes: torch.Tensor, block: int) -> torch.Tensor:
    n = q.numel()
    return codes.double()[q.reshape(-1).long()] * absmax.double().repeat_interleave(block)[:n]


def adam_step64(p, g, m, v, step, lr, beta1, beta2, eps, wd, decoupled=True):
    """torch.optim.AdamW's (decoupled) or Adam's update in float64; step: the count after the increment."""
    p, g, m, v = p.double(), g.double(), m.double(), v.double()
    if decoupled:
        p = p * (1 - lr * wd)
    else:
        g = g + wd * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    denom = v.sqrt() / math.sqrt(1 - beta2 ** step) + eps
    p = p - lr / (1 - beta1 ** step) * m / denom
    return p, m, v


def sgd_step64(p, g, buf, lr, momentum, dampening, wd, nesterov, fresh):
    p, g = p.double(), g.double()
    g = g + wd * p
    buf = g.clone() if fresh else momentum * buf.double() + (1 - dampening) * g
    d = g + momentum * buf if nesterov else buf
    return p - lr * d, buf


def near_tie(y: torch.Tensor, codes: torch.Tensor, rel: float = 1e-5) -> torch.Tensor:
    """Where a normalized value lies within `rel` (relative) of the midpoint of two neighbouring codes: there the
    float32 kernel may pick either neighbour."""
    c = codes.double()
    mids = (c[:-1] + c[1:]) / 2
    d = (y[:, None] - mids[None, :]).abs().amin(1)
    return d <= rel * y.abs().clamp_min(1e-30) + 1e-12


def code_step(q: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The gap to the farther neighbour of each code (one code step, the quantization's resolution there)."""
    c = codes.double()
    lo = c[(q - 1).clamp_min(0)]
    hi = c[(q + 1).clamp_max(255)]
    return torch.maximum(c[q] - lo, hi - c[q])
