"""The CPU kernels' 8-bit codes themselves (docs/state_formats.md, csrc/cpu/quantize_kernels.h): quantization equals
the count-of-thresholds rule for every float prefix boundary, every threshold +-2 ulp and random magnitudes, and
dequantization equals code_map[code] * absmax for every code, in every CPU capability build."""

from __future__ import annotations

import pytest
import torch

import state_format_cases as C
from fused_sched._extension import load_extension
from fused_sched.optim import state_format as sf

Q8 = sf.BLOCKWISE_8BIT


def _boundary_values(thresholds):
    """|y| <= 1 values where a code can change: each float prefix (bits >> 16: the kernels' buckets) at and next
    to its boundaries, each threshold and its 2 neighbours on each side, zeros, denormals, random bits."""
    prefixes = torch.arange(0, 0x3F81, dtype=torch.int64) << 16
    bits = torch.cat([prefixes + d for d in (-1, 0, 1, 0x7FFF, 0xFFFF)])
    t = thresholds.view(torch.int32).to(torch.int64)
    bits = torch.cat([bits, *(t + d for d in range(-2, 3)), *(-t + d for d in range(-2, 3)),
                      torch.randint(0, 0x3F800001, (100000,), generator=torch.Generator().manual_seed(1))])
    bits = bits.abs().clamp(0, 0x3F800000).to(torch.int32).view(torch.float32)
    return torch.cat([bits, -bits, torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1.0, -1.0])])


def _sgd_codes(values, qmap):
    """Codes and absmax of a fresh 8-bit SGD buffer (= the gradient `values`; block 256; qmap's signed rows)."""
    native = load_extension()
    n = values.numel()
    p = torch.zeros(n)
    p.grad = values.clone()
    codes, absmax = torch.zeros(n, dtype=torch.uint8), torch.zeros(-(-n // 256))
    bucket = native.OptimBucket([p], [[codes]], [], [0], [], [0], [sf.format_column(Q8, False, 256)],
                                [[absmax], []], qmap)
    assert bucket.refresh_grads() == ""
    bucket.sgd_step(C.hyper("sgd", weight_decay=0.0), [1])
    return codes, absmax


def _expected_codes(values, thresholds):  # codes and absmax by the contract's rules
    blocks = -(-values.numel() // 256)
    padded = torch.zeros(blocks * 256)
    padded[:values.numel()] = values
    a = padded.view(blocks, 256).abs().amax(1)
    absmax = torch.where(padded.view(blocks, 256).isnan().any(1), float("nan"), a)
    a = absmax.repeat_interleave(256)[:values.numel()]
    y = torch.where(a == 0, torch.zeros_like(values), values / a)
    return torch.where(y.isnan(), 0, torch.searchsorted(thresholds, y)).to(torch.uint8), absmax


def _code_tables():
    """(name, qmap whose signed rows the SGD momentum uses, its thresholds): both dynamic maps, and made-up maps
    for the search fallback (a threshold at 0) and random sorted thresholds (bucketed or not)."""
    q = sf.qmap("cpu")
    unsigned = q.clone()
    unsigned[0:2] = q[2:4]
    fallback = q.clone()
    fallback[1, :255] = torch.linspace(-1, 1, 255)
    rand = q.clone()
    rand[1, :255] = (torch.randn(255, generator=torch.Generator().manual_seed(2)) * 0.3).clamp(-1, 1).sort().values
    return [("signed", q), ("unsigned", unsigned), ("fallback", fallback), ("random", rand)]


def test_dynamic_maps_take_the_bucket_table():
    # quantize_kernels.h's condition for its table (else it searches): per sign, no two thresholds share a float
    # prefix (bits >> 16), none is +-0, denormal-adjacent (prefix < 2) or >= 1 in magnitude
    for row in (sf.QMAP_SIGNED_THRESHOLDS, sf.QMAP_UNSIGNED_THRESHOLDS):
        bits = sf.qmap("cpu")[row, :255].contiguous().view(torch.int32).to(torch.int64)
        prefixes = (bits & 0xFFFFFFFF) >> 16
        assert prefixes.unique().numel() == 255
        magnitude = prefixes & 0x7FFF
        assert magnitude.min() >= 2 and magnitude.max() < 0x3F80


@pytest.mark.parametrize("name,qmap", _code_tables(), ids=[c[0] for c in _code_tables()])
def test_codes_equal_the_count_rule(name, qmap):
    thresholds = qmap[1, :255].contiguous()
    values = _boundary_values(thresholds)
    ones = torch.ones(-(-values.numel() // 255))  # each block of 256 starts with 1: absmax 1, y = value exactly
    y = torch.cat([torch.cat([o.view(1), c]) for o, c in zip(ones, values.split(255), strict=True)])
    y = torch.cat([y, torch.zeros((-y.numel()) % 256)])
    for part in ([float("nan"), 0.5], [float("inf"), 3.0, -2.0, 0.0], [0.0, -0.0], [1e-30, -3e-38], [3e-45, -1e-45]):
        part = torch.tensor(part)  # blocks of their own: NaN, inf, zeros, tiny and denormal absmax
        y = torch.cat([y, part, torch.zeros(256 - part.numel())])
    expected, absmax = _expected_codes(y, thresholds)
    assert name != "signed" or torch.equal(sf.quantize_blockwise(y, True, 256)[0], expected)  # the mirror agrees
    for cap in _capabilities():
        got, got_absmax = _sgd_codes(y, qmap)
        torch.testing.assert_close(got_absmax, absmax, rtol=0, atol=0, equal_nan=True)
        bad = (got != expected).nonzero().flatten()[:5].tolist()
        assert not bad, (cap, [(y[i].item(), got[i].item(), expected[i].item()) for i in bad])


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("block_size", [32, 256])
def test_dequantized_values_of_every_code(signed, block_size):
    # an SGD step with momentum 1, no gradient, lr 1 and zero params leaves param = -buffer = -code_map[code] *
    # absmax: every code in shuffled orders, blocks of random scales, a tail shorter than a vector
    q = sf.qmap("cpu").clone()
    if not signed:
        q[0:2] = q[2:4].clone()
    gen = torch.Generator().manual_seed(3)
    n = 256 * 40 + 19
    codes = torch.cat([torch.randperm(256, generator=gen) for _ in range(41)])[:n].to(torch.uint8)
    absmax = torch.rand(-(-n // block_size), generator=gen) * 10.0 ** torch.randint(-30, 30, (1,), generator=gen)
    expected = 0.0 - q[0][codes.long()] * absmax.repeat_interleave(block_size)[:n]  # fma(buf, -1, +0)
    native = load_extension()
    for _ in _capabilities():
        p = torch.zeros(n)
        p.grad = torch.zeros(n)
        bucket = native.OptimBucket([p], [[codes.clone()]], [], [0], [], [0], [sf.format_column(Q8, False, block_size)],
                                    [[absmax.clone()], []], q)
        assert bucket.refresh_grads() == ""
        bucket.sgd_step(C.hyper("sgd", lr=1.0, momentum=1.0, weight_decay=0.0), [0])
        assert torch.equal(p.view(torch.int32), expected.view(torch.int32))


def _capabilities():
    """Runs the loop body under each CPU capability build this CPU has, then restores the best one."""
    native = load_extension()
    best = native.cpu_capability()
    try:
        for cap in ("default", "avx2", "avx512"):
            try:
                native.set_cpu_capability(cap)
            except RuntimeError:
                continue
            yield cap
    finally:
        native.set_cpu_capability(best)
