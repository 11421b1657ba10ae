"""Bit-exact dtype conversions: bf16/f16/f32 decode, and RNE encode from float64."""

from fractions import Fraction

import numpy as np
import pytest
from helpers import bf16_bits

from lowmem_merge import kernels

ALL_16 = np.arange(65536, dtype=np.uint16)


def test_bf16_to_f32_all_patterns():
    out = np.empty(65536, np.uint32)
    kernels.transcode(ALL_16, kernels.BF16, out, kernels.F32)
    assert np.array_equal(out, ALL_16.astype(np.uint32) << 16)


def test_f32_to_bf16_round_trips_all_patterns_including_nan_payloads():
    widened = ALL_16.astype(np.uint32) << 16
    out = np.empty(65536, np.uint16)
    kernels.transcode(widened, kernels.F32, out, kernels.BF16)
    assert np.array_equal(out, ALL_16)


def test_f32_to_bf16_rounds_to_nearest_even():
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    # Exact ties (low half 0x8000) with both parities, and their neighbours.
    ties = (rng.integers(0, 2**16, 2000, dtype=np.uint32) << 16) | 0x8000
    bits = np.concatenate([bits, ties, ties - 1, ties + 1])
    finite = (bits & 0x7F800000) != 0x7F800000
    bits = bits[finite]
    out = np.empty(bits.size, np.uint16)
    kernels.transcode(bits, kernels.F32, out, kernels.BF16)
    assert np.array_equal(out, bf16_bits(bits.view(np.float32)))


def test_f32_nan_with_payload_only_in_low_bits_stays_nan():
    bits = np.array([0x7F800001, 0xFF800001, 0x7FC00000], np.uint32)
    out = np.empty(3, np.uint16)
    kernels.transcode(bits, kernels.F32, out, kernels.BF16)
    decoded = (out.astype(np.uint32) << 16).view(np.float32)
    assert np.isnan(decoded).all()
    assert list(out >> 15) == [0, 1, 0]


def test_f16_decode_all_patterns():
    out = np.empty(65536, np.float32)
    kernels.decode_array(ALL_16, kernels.F16, out)
    reference = ALL_16.view(np.float16).astype(np.float32)
    nan = np.isnan(reference)
    assert np.array_equal(out[~nan].view(np.uint32), reference[~nan].view(np.uint32))
    assert np.isnan(out[nan]).all()


def _nearest_bf16(value: float) -> float:
    """Exact rational reference: nearest bf16 to a float64, ties to even mantissa."""
    if value == 0:
        return value
    exact = Fraction(value)
    exponent = max(abs(exact).numerator.bit_length() - abs(exact).denominator.bit_length(), -133)
    while Fraction(2) ** exponent > abs(exact):
        exponent -= 1
    while Fraction(2) ** (exponent + 1) <= abs(exact):
        exponent += 1
    step = Fraction(2) ** (max(exponent, -126) - 7)
    quotient = exact / step
    low = quotient.numerator // quotient.denominator
    remainder = quotient - low
    if remainder > Fraction(1, 2) or (remainder == Fraction(1, 2) and low % 2):
        low += 1
    return float(low * step)


def test_float64_to_bf16_is_one_correct_rounding():
    rng = np.random.default_rng(2)
    base = bf16_bits(rng.standard_normal(3000).astype(np.float32) * 8)
    low = (base.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    high = ((base.astype(np.uint32) + 1) << 16).view(np.float32).astype(np.float64)
    middle = (low + high) / 2
    # Midpoints and values a hair off them: a float32 detour would round twice here.
    values = np.concatenate([middle, np.nextafter(middle, np.inf), np.nextafter(middle, -np.inf),
                             middle + (high - low) * 2.0**-30, rng.standard_normal(3000)])
    out = np.empty(values.size, np.uint16)
    kernels.encode_array(values, out, kernels.BF16)
    got = (out.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    expected = np.array([_nearest_bf16(v) for v in values])
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("scale", [1e-7, 1e-5, 1e-3, 1.0, 300.0, 6e4, 1e5])
def test_float64_to_f16_matches_numpy(scale):
    rng = np.random.default_rng(3)
    values = rng.standard_normal(100_000) * scale
    halves = ALL_16.view(np.float16)
    finite = halves[np.isfinite(halves)].astype(np.float64)
    with np.errstate(over="ignore"):
        neighbours = np.nextafter(finite.astype(np.float16), np.float16(np.inf))
    neighbours = neighbours.astype(np.float64)
    values = np.concatenate([values, finite, (finite + neighbours) / 2])
    values = values[np.isfinite(values)]
    out = np.empty(values.size, np.uint16)
    kernels.encode_array(values, out, kernels.F16)
    with np.errstate(over="ignore"):
        assert np.array_equal(out, values.astype(np.float16).view(np.uint16))


def test_float64_to_f32_matches_numpy():
    values = np.random.default_rng(4).standard_normal(100_000) * 1e3
    out = np.empty(values.size, np.uint32)
    kernels.encode_array(values, out, kernels.F32)
    assert np.array_equal(out, values.astype(np.float32).view(np.uint32))
