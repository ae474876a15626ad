"""The optimizers' side of the low-memory state formats (docs/state_formats.md): which format each tensor's states
take, their creation, and their conversion when a state arrives in another format (a torch.optim state_dict loaded
into an 8-bit optimizer, a group switched between formats, master_weights switched between a copy and
remainders). The formats' rules are fused_sched/optim/state_format.py."""

from __future__ import annotations

import torch

from .. import _hyper
from . import state_format as sf
from ._tensors import is_dtensor, local_shard

#: State key of a parameter's float32 master copy (master_weights=True).
MASTER_KEY = "master_param"

_MOMENT_DTYPES = {sf.FLOAT32: torch.float32, sf.BFLOAT16: torch.bfloat16, sf.BLOCKWISE_8BIT: torch.uint8}


def master_mode(group: dict, p: torch.Tensor) -> str | None:
    """None (no master), "copy" (float32 master_param) or "remainder" (int16 master_remainder) for `p`."""
    mode = group.get("master_weights", False)
    if not mode or p.dtype == torch.float32:
        return None
    return "remainder" if mode == "remainder" else "copy"


def _wrap_like(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """A state made on p's local shard, as a DTensor laid out like p when p is one (torch creates DTensor states
    under FSDP2: zeros_like of the DTensor param)."""
    if not is_dtensor(p):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def _local_like(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty_like(local_shard(p), dtype=dtype, memory_format=torch.preserve_format)


def _moment_format_of(value: torch.Tensor) -> int:
    if value.dtype == torch.uint8:
        return sf.BLOCKWISE_8BIT
    return sf.BFLOAT16 if value.dtype == torch.bfloat16 else sf.FLOAT32


def blocks_of(p: torch.Tensor, block_size: int) -> int:
    """The 8-bit blocks of p's local shard."""
    return -(-local_shard(p).numel() // block_size)


def _new_absmax(p: torch.Tensor, block_size: int) -> torch.Tensor:
    """A zero absmax for p's 8-bit blocks. For a DTensor parameter (FSDP2: Shard(0) on a 1-D mesh) a DTensor of
    shape [ranks, most blocks of a rank], one row per rank (its blocks first, zeros after), so that
    torch.distributed.checkpoint saves and loads every rank's own scales (a plain tensor would count as
    replicated and keep rank 0's only)."""
    if not is_dtensor(p):
        return torch.zeros(blocks_of(p, block_size), dtype=torch.float32, device=p.device)
    from torch.distributed.tensor import DTensor, Shard

    mesh = p.device_mesh
    if mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise ValueError("8-bit states of a DTensor parameter need it sharded on dim 0 of a 1-D mesh (FSDP2's "
                         f"fully_shard), got placements {p.placements} on a {mesh.ndim}-D mesh")
    ranks = mesh.size()
    rest = p.numel() // p.shape[0] if p.dim() and p.shape[0] else 0
    most = -(-(-(-p.shape[0] // ranks) * rest) // block_size) if p.dim() else 1
    local = torch.zeros(1, max(most, 1), dtype=torch.float32, device=local_shard(p).device)
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=(ranks, max(most, 1)),
                              stride=(max(most, 1), 1))


def absmax_view(absmax: torch.Tensor, p: torch.Tensor, block_size: int) -> torch.Tensor:
    """The float32 scales of p's local blocks, as the kernels read them (contiguous)."""
    return local_shard(absmax).reshape(-1)[: blocks_of(p, block_size)]


def _absmax_fits(absmax, p, block_size) -> bool:
    if absmax is None or is_dtensor(absmax) != is_dtensor(p):
        return False
    local = local_shard(absmax)
    return local.dtype == torch.float32 and local.is_contiguous() and (
        local.numel() >= blocks_of(p, block_size) if is_dtensor(p) else local.numel() == blocks_of(p, block_size))


class StateFormatMixin:
    """FusedOptimizer's choice and upkeep of state formats; the plan calls ``_format_states``."""

    def _moment_format(self, group: dict, p: torch.Tensor) -> int:
        """The format of p's moments: 8-bit for a group with optim_bits 8 whose tensor has at least min_8bit_size
        elements (the global size: a DTensor shard is quantized when its whole parameter is), else the group's
        state_dtype."""
        if group.get("optim_bits", 32) == 8 and p.numel() >= group.get("min_8bit_size", 4096):
            return sf.BLOCKWISE_8BIT
        return sf.BFLOAT16 if group.get("state_dtype", torch.float32) == torch.bfloat16 else sf.FLOAT32

    def _block_size(self) -> int:
        """The 8-bit block size, one per optimizer (every kernel launch uses one); checked equal in every group."""
        sizes = {g.get("block_size", self.defaults.get("block_size", 256)) for g in self.param_groups}
        if len(sizes) != 1:
            raise ValueError(f"every param group of an optimizer must use one block_size, got {sorted(sizes)}")
        return sizes.pop()

    def _format_states(self, p: torch.Tensor, group: dict, needs: tuple[bool, ...], moment_format: int,
                       block_size: int) -> bool:
        """Creates p's missing moments in `moment_format` (as torch creates them: zeros) and converts those held in
        another format; returns True when the first moment was created now (SGD's fresh buffer)."""
        state = self.state[p]
        created = False
        for k, (key, needed) in enumerate(zip(self._state_keys, needs, strict=True)):
            absmax_key = key + sf.ABSMAX_SUFFIX
            if not needed:
                continue
            signed = k == 0
            value = state.get(key)
            if value is None:
                created = created or k == 0
                wide = None
            elif (_moment_format_of(value) == moment_format and (moment_format != sf.BLOCKWISE_8BIT
                                                                  or _absmax_fits(state.get(absmax_key), p, block_size))
                    and value.dtype == _MOMENT_DTYPES[moment_format]):
                continue
            else:
                wide = self._widened(p, value, state.get(absmax_key), signed, block_size)
            self._store_moment(p, state, key, wide, moment_format, signed, block_size)
        return created

    def _widened(self, p, value, absmax, signed, block_size) -> torch.Tensor:
        """A moment held in any format as a float32 local tensor laid out like p's local shard."""
        local = local_shard(value)
        if local.dtype == torch.uint8:
            if not _absmax_fits(absmax, p, block_size):
                raise ValueError(f"an 8-bit state of {local.numel()} elements needs the absmax of its "
                                 f"{blocks_of(p, block_size)} blocks of {block_size}")
            wide = sf.dequantize_blockwise(local.contiguous(), absmax_view(absmax, p, block_size), signed,
                                           block_size)
            return _local_like(p, torch.float32).copy_(wide.reshape(local.shape))
        return _local_like(p, torch.float32).copy_(local)

    def _store_moment(self, p, state, key, wide, moment_format, signed, block_size) -> None:
        absmax_key = key + sf.ABSMAX_SUFFIX
        if moment_format == sf.BLOCKWISE_8BIT:
            source = wide if wide is not None else torch.zeros(local_shard(p).shape, device=p.device)
            codes, absmax = sf.quantize_blockwise(source.contiguous(), signed, block_size)
            local = _local_like(p, torch.uint8).copy_(codes.reshape(source.shape))
            state[key] = _wrap_like(p, local)
            scales = _new_absmax(p, block_size)
            absmax_view(scales, p, block_size).copy_(absmax)
            state[absmax_key] = scales
            return
        state.pop(absmax_key, None)
        local = _local_like(p, _MOMENT_DTYPES[moment_format])
        if wide is None:
            local.zero_()
        else:
            local.copy_(wide)  # to bfloat16: rounded to nearest even
        state[key] = _wrap_like(p, local)

    def _format_master(self, p: torch.Tensor, group: dict) -> str | None:
        """Creates or converts p's master (a float32 copy or int16 remainders) as the group asks; returns the mode."""
        state = self.state[p]
        mode = master_mode(group, p)
        if mode == "remainder":
            if p.dtype != torch.bfloat16:
                raise ValueError("master_weights='remainder' keeps the low 16 bits of bfloat16 parameters; a "
                                 f"{p.dtype} parameter needs master_weights=True")
            if sf.REMAINDER_KEY not in state:
                remainder = _local_like(p, torch.int16)
                master = state.pop(MASTER_KEY, None)
                if master is None:
                    remainder.zero_()  # the master is the parameter itself
                else:
                    param, low = sf.split_remainder(local_shard(master))
                    local_shard(p).copy_(param)
                    remainder.copy_(low)
                state[sf.REMAINDER_KEY] = _wrap_like(p, remainder)
        elif mode == "copy":
            if MASTER_KEY not in state:
                remainder = state.pop(sf.REMAINDER_KEY, None)
                master = _local_like(p, torch.float32)
                if remainder is None:
                    master.copy_(local_shard(p))
                else:
                    master.copy_(sf.join_remainder(local_shard(p), local_shard(remainder)))
                state[MASTER_KEY] = _wrap_like(p, master)
            state.pop(sf.REMAINDER_KEY, None)
        else:
            # master_weights turned off: the parameter is the value from now on; a copy kept would be stale if the
            # option were turned on again.
            state.pop(MASTER_KEY, None)
            state.pop(sf.REMAINDER_KEY, None)
        return mode

    def _uses_state_formats(self) -> bool:
        """Whether a group asks for a low-memory format (the compiled step then runs eagerly: its list ops take
        float32 states only)."""
        # A plain loop: torch.compile traces this check, and a generator expression would break its graph.
        for g in self.param_groups:
            if (g.get("optim_bits", 32) == 8 or g.get("state_dtype", torch.float32) == torch.bfloat16
                    or g.get("master_weights") == "remainder"):
                return True
        return False


def validate_state_options(group: dict, name: str) -> None:
    """The checks of the state-format options of a param group (before anything is written)."""
    master = group.get("master_weights", False)
    if not (isinstance(master, bool) or master == "remainder"):
        raise ValueError(f"master_weights must be a bool or 'remainder', got {master!r}")
    state_dtype = group.get("state_dtype", torch.float32)
    if state_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype!r}")
    rounding = group.get("state_rounding", "stochastic")
    if rounding not in ("stochastic", "nearest"):
        raise ValueError(f"state_rounding must be 'stochastic' or 'nearest', got {rounding!r}")
    bits = group.get("optim_bits", 32)
    if bits not in (8, 32) or isinstance(bits, bool):
        raise ValueError(f"optim_bits must be 8 (8-bit states) or 32 (the group keeps float32 states), got {bits!r}")
    if "block_size" in group and group["block_size"] not in sf.BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {sf.BLOCK_SIZES}, got {group['block_size']!r}")
    size = group.get("min_8bit_size", 4096)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"min_8bit_size must be an int >= 0, got {size!r}")
    if bits == 8 and group.get("amsgrad"):
        raise ValueError(f"{name} does not keep amsgrad's max_exp_avg_sq in 8 bits: set amsgrad=False, or "
                         "optim_bits=32 for the group")


def state_flags(group: dict) -> int:
    """The hyper row's flags of a group's state formats: the kernels read STATE_ROUND_NEAREST; the others make a
    change of format change the row, which rebuilds the plan (the states are converted then)."""
    flags = 0
    if group.get("state_rounding", "stochastic") == "nearest":
        flags |= _hyper.STATE_ROUND_NEAREST
    if group.get("state_dtype", torch.float32) == torch.bfloat16:
        flags |= _hyper.BFLOAT16_STATES
    if group.get("optim_bits", 32) == 8:
        flags |= _hyper.EIGHT_BIT_STATES
    if group.get("master_weights") == "remainder":
        flags |= _hyper.MASTER_REMAINDER
    return flags
