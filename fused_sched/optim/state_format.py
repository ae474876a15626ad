"""Low-memory optimizer state formats: what each format stores, and the exact conversions in plain torch.

Every kernel (csrc/include/fused_sched/state_format_math.h for CPU and CUDA, backends/triton/state_format.py)
implements the same rules; the functions here are their torch mirror, used to convert states on load, by the
state_dict helpers, and by the tests as the bit-exact model of a kernel (docs/state_formats.md is the contract).

Formats of the moments (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, SGD's ``momentum_buffer``):

* ``FLOAT32``: float32 tensors laid out like the parameter (torch.optim's).
* ``BFLOAT16``: bfloat16 tensors laid out like the parameter; the arithmetic stays float32 and the results are
  written with stochastic rounding (or to nearest even where the group asks ``state_rounding="nearest"``).
* ``BLOCKWISE_8BIT`` (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", 2022): a uint8 code per
  element, laid out like the parameter, and one float32 ``absmax`` per block of ``block_size`` consecutive elements
  of the flat (local) tensor: the value is ``code_map[code] * absmax``. ``exp_avg`` and the momentum use the signed
  dynamic map, ``exp_avg_sq`` the unsigned one (bitsandbytes' ``create_dynamic_map``, 7 exponent bits).

Master weights of bfloat16 parameters: ``master_weights=True`` keeps a float32 copy (4 bytes per parameter);
``master_weights="remainder"`` keeps the 16 low bits of that float32 master (int16, ``master_remainder``): the
bfloat16 parameter holds the high half rounded half up (away from zero), so ``param`` and ``remainder`` together
are the float32 master exactly (``join_remainder``).
"""

from __future__ import annotations

import functools

import torch

FLOAT32, BFLOAT16, BLOCKWISE_8BIT = 0, 1, 2
#: Bits of the address table's format column (optim_math.h TableColumn kColFormat).
MOMENT_FORMAT_MASK = 3
MASTER_REMAINDER = 4
BLOCK_SHIFT = 8  # log2(block_size) sits in bits 8-15
BLOCK_SIZES = (32, 64, 128, 256)
#: The codes of the signed and the unsigned map, and the thresholds between neighbouring codes (qmap rows).
QMAP_SIGNED_CODES, QMAP_SIGNED_THRESHOLDS, QMAP_UNSIGNED_CODES, QMAP_UNSIGNED_THRESHOLDS = range(4)

#: State keys of the 8-bit blocks' scales: the key of the state they scale + this suffix.
ABSMAX_SUFFIX = "_absmax"
#: State key of the int16 low halves of float32 masters (master_weights="remainder").
REMAINDER_KEY = "master_remainder"


def dynamic_map(signed: bool) -> torch.Tensor:
    """bitsandbytes' dynamic (tree) quantization map with 7 exponent bits: 256 float32 values in [-1, 1] (signed)
    or [0, 1] (unsigned), sorted. For each exponent i = 0..6 the decade 10^(i-6) holds 2^i (signed, and as many
    negatives) or 2^(i+1) (unsigned) values: the midpoints of an even split of [0.1, 1] scaled by it; then 0 and
    1. Computed in float32 as bitsandbytes computes it, so the values are its values."""
    data: list[float] = []
    for i in range(7):
        count = 2 ** i if signed else 2 ** (i + 1)
        boundaries = torch.linspace(0.1, 1, count + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-6 + i)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 256
    return torch.tensor(sorted(data), dtype=torch.float32)


@functools.cache
def _qmap_cpu() -> torch.Tensor:
    rows = []
    for signed in (True, False):
        codes = dynamic_map(signed)
        c64 = codes.double()
        thresholds = torch.full((256,), float("inf"), dtype=torch.float32)
        thresholds[:255] = ((c64[:-1] + c64[1:]) / 2).float()
        rows += [codes, thresholds]
    return torch.stack(rows)


_QMAPS: dict = {}


def qmap(device: torch.device) -> torch.Tensor:
    """float32 [4, 256] on `device`: signed codes, signed thresholds, unsigned codes, unsigned thresholds
    (QMAP_*). threshold[j] is the float32 rounding of the float64 midpoint of codes j and j+1 (j < 255;
    threshold[255] = inf, never read). One tensor per device, made once: every kernel reads its address."""
    device = torch.device(device)
    table = _QMAPS.get(device)
    if table is None:
        table = _QMAPS[device] = _qmap_cpu().to(device)
    return table


def quantize_blockwise(x: torch.Tensor, signed: bool, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 shaped like x, absmax float32 [ceil(numel / block_size)]) of float32 values `x`, as the kernels
    compute them: absmax = max |x| over each block of the flat tensor (NaN if the block holds one); y = x / absmax
    in float32 (0 where absmax is 0); code = the number of thresholds t[j] (j < 255) with t[j] < y."""
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // block_size)
    padded = torch.zeros(blocks * block_size, dtype=torch.float32, device=flat.device)
    padded[:n] = flat
    absmax = padded.abs().reshape(blocks, block_size).amax(dim=1)  # amax propagates NaN
    nan = flat.reshape(-1).isnan()
    if nan.any():
        block_nan = torch.zeros(blocks * block_size, dtype=torch.bool, device=flat.device)
        block_nan[:n] = nan
        absmax = torch.where(block_nan.reshape(blocks, block_size).any(dim=1), float("nan"), absmax)
    scale = absmax.repeat_interleave(block_size)[:n]
    y = torch.where(scale == 0, torch.zeros_like(flat), flat / scale)
    table = qmap(flat.device)
    thresholds = table[QMAP_SIGNED_THRESHOLDS if signed else QMAP_UNSIGNED_THRESHOLDS, :255].contiguous()
    codes = torch.searchsorted(thresholds, y.contiguous(), right=False)  # count of t[j] < y
    codes = torch.where(y.isnan(), torch.zeros_like(codes), codes)
    return codes.to(torch.uint8).reshape(x.shape), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, signed: bool, block_size: int) -> torch.Tensor:
    """float32 values of 8-bit blockwise `codes`: code_map[code] * absmax of its block (float32 multiply)."""
    table = qmap(codes.device)
    values = table[QMAP_SIGNED_CODES if signed else QMAP_UNSIGNED_CODES][codes.reshape(-1).long()]
    n = values.numel()
    scale = absmax.float().repeat_interleave(block_size)[:n]
    return (values * scale).reshape(codes.shape)


def bf16_nearest(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16, to nearest even (torch's cast)."""
    return x.to(torch.bfloat16)


def split_remainder(master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bfloat16 param, int16 remainder) of float32 masters: the high 16 bits, plus one where the low half is
    0x8000 or more (round half up in magnitude), and the low 16 bits as a signed int16, so that
    join_remainder gives the master back exactly. A NaN master becomes the quiet NaN 0x7FC0 (keeping its sign)
    with remainder 0."""
    bits = master.detach().float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    low = bits & 0xFFFF
    high = bits >> 16
    up = low >= 0x8000
    high = (high + up.to(torch.int64)) & 0xFFFF
    rem = torch.where(up, low - 0x10000, low)
    nan = master.isnan()
    high = torch.where(nan, (bits >> 16 & 0x8000) | 0x7FC0, high)
    rem = torch.where(nan, torch.zeros_like(rem), rem)
    param = _u16_to_bf16(high)
    return param.reshape(master.shape), rem.to(torch.int16).reshape(master.shape)


def _u16_to_bf16(u: torch.Tensor) -> torch.Tensor:
    signed = torch.where(u >= 0x8000, u - 0x10000, u)
    return signed.to(torch.int16).view(torch.bfloat16)


def join_remainder(param: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    """The float32 masters of bfloat16 params and their int16 remainders: (param bits << 16) + remainder, in 32-bit
    two's complement."""
    high = param.detach().contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    bits = ((high << 16) + remainder.to(torch.int64)) & 0xFFFFFFFF
    bits = torch.where(bits >= 0x80000000, bits - 0x100000000, bits)
    return bits.to(torch.int32).view(torch.float32).reshape(param.shape)


def format_column(moment_format: int, remainder: bool, block_size: int) -> int:
    """The address table's kColFormat entry of one tensor."""
    value = moment_format | (MASTER_REMAINDER if remainder else 0)
    if moment_format == BLOCKWISE_8BIT:
        value |= block_size.bit_length() - 1 << BLOCK_SHIFT
    return value


# -- stochastic rounding of bfloat16 moments: optim_math.h's counter-based bits, in int64 torch arithmetic --

_M32 = 0xFFFFFFFF


def _mix32(x):
    """optim_math.h mix32 (lowbias32) on Python ints or int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def rounding_key(seed: int, step: int, param_id: int) -> int:
    """optim_math.h rounding_key: the per-tensor key of one step (step: the count after the increment)."""
    k = _mix32((seed & _M32) ^ _mix32((seed >> 32) & _M32))
    k = _mix32(k ^ (step & _M32))
    return _mix32(k ^ (param_id & _M32))


def state_key(param_key: int, k: int) -> int:
    """The key of moment k (0 exp_avg, 1 exp_avg_sq, 2 max_exp_avg_sq) of a tensor whose step key is param_key."""
    return _mix32(param_key ^ ((0x9E3779B9 * (k + 1)) & _M32))


def rounding_bits(key: int, numel: int, device=None) -> torch.Tensor:
    """optim_math.h rounding_bits(key, i) for i in [0, numel): int64 tensor of 16-bit values."""
    i = torch.arange(numel, dtype=torch.int64, device=device)
    return _mix32(_mix32(key ^ (i >> 32)) ^ (i & _M32)) & 0xFFFF


def bf16_stochastic(x: torch.Tensor, key: int) -> torch.Tensor:
    """optim_math.h bf16_bits_stochastic(x, rounding_bits(key, index)) over the flat float32 tensor x."""
    flat = x.detach().float().reshape(-1).contiguous()
    bits = flat.view(torch.int32).to(torch.int64) & _M32
    rounded = ((bits + rounding_bits(key, flat.numel(), flat.device)) & _M32) >> 16
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = torch.where(nan, (bits >> 16) | 0x40, rounded)
    return _u16_to_bf16(rounded).reshape(x.shape)


# -- state_dict conversion --

_SIGNED_KEYS = {"exp_avg": True, "momentum_buffer": True, "exp_avg_sq": False, "max_exp_avg_sq": False}


def to_torch_state_dict(state_dict: dict) -> dict:
    """A state_dict of any fused_sched optimizer, in any state format, as its torch.optim counterpart
    (torch.optim.AdamW, Adam, SGD) loads it: 8-bit moments dequantized and bfloat16 moments widened to float32
    tensors, the absmax entries dropped, SGD's step dropped, and the master weights, which torch.optim does not
    keep, dropped (a master_remainder is folded into nothing: load the parameters from a model state_dict saved
    alongside, which holds the bfloat16 values; master_weights=True's float32 ``master_param`` is dropped as
    well). The param groups
    keep their values (torch.optim ignores fused_sched's own options). Needs the block size of 8-bit states: each
    group's ``block_size``. Works on plain tensors (a DCP or FSDP2 state_dict must be gathered first: absmax is
    kept per local shard)."""
    groups = state_dict["param_groups"]
    block_of = {}
    for group in groups:
        for pid in group["params"]:
            block_of[pid] = group.get("block_size", 256)
    state = {}
    for pid, entries in state_dict["state"].items():
        out = {}
        # SGD's step (kept for the stochastic rounding of a bfloat16 momentum buffer): torch.optim.SGD has none.
        sgd = "momentum_buffer" in entries and "exp_avg" not in entries
        for key, value in entries.items():
            if key.endswith(ABSMAX_SUFFIX) or key in (REMAINDER_KEY, "master_param") or (sgd and key == "step"):
                continue
            if isinstance(value, torch.Tensor) and key in _SIGNED_KEYS:
                if value.dtype == torch.uint8:
                    absmax = entries[key + ABSMAX_SUFFIX]
                    value = dequantize_blockwise(value, absmax, _SIGNED_KEYS[key], block_of.get(pid, 256))
                else:
                    value = value.float()
            out[key] = value
        state[pid] = out
    return {"state": state, "param_groups": [dict(g) for g in groups]}
