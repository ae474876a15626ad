"""How the kernels see a tensor: a DTensor's local shard, dense memory, the strides a gradient and the states are walked
with, GradScaler scalars moved to a bucket's device."""

from __future__ import annotations

import torch


def is_dtensor(t) -> bool:
    dtensor = dtensor_class()
    return dtensor is not None and isinstance(t, dtensor)


_DTENSOR = []


def dtensor_class():
    if not _DTENSOR:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # a torch built without distributed support
            DTensor = None
        _DTENSOR.append(DTensor)
    return _DTENSOR[0]


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose memory a kernel updates: a DTensor's local shard, any other tensor itself."""
    return t._local_tensor if is_dtensor(t) else t


def traced_tensor(value) -> bool:
    """A tensor hyper-parameter while Dynamo traces: its value is not compared on the host (that would be a
    data-dependent graph break); it was checked when its param group was added, as a tensor lr's value is checked
    in eager steps too (the row holds 0.0 for it, so a new value never re-runs the checks)."""
    return isinstance(value, torch.Tensor) and torch.compiler.is_compiling()


def on_device(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A GradScaler tensor on `device`, as a float32 [1]: a non-blocking copy to an accelerator; a blocking one to
    the CPU, whose kernels read it at once (a non-blocking device-to-host copy may not have landed yet)."""
    if t is None:
        return None
    if t.device != device or t.dtype != torch.float32:
        t = t.to(device=device, dtype=torch.float32, non_blocking=device.type != "cpu")
    return t.reshape(1)


def walked_strides(t: torch.Tensor) -> tuple:
    """The strides the kernels walk a parameter's gradient and states with: the parameter's own, or for a parameter
    that is not dense (a stand-in's, see Bucket) the contiguous ones that empty_like gives it."""
    if is_dense(t):
        return t.stride()
    strides, step = [], 1
    for size in reversed(t.shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def dense_copy(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`t` itself when it has the strides of `like`, else a copy of it with them."""
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like).copy_(t)


def is_dense(t: torch.Tensor) -> bool:
    """True when the elements of `t` fill a contiguous block of memory in some order (no gaps, no overlap)."""
    if t.numel() <= 1:
        return True
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape, strict=True) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True
