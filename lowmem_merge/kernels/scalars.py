"""Scalar bit-level codecs for bf16, f16 and f32: one source for the CPU and CUDA kernels.

Raw tensor data is held as unsigned integers (uint16 for bf16/f16, uint32 for
f32) so one kernel serves every input dtype; ``decode`` widens to float32 and
``encode`` narrows a float64 result with a single correct rounding.

The CPU kernels inline these; cuda/scalars.py compiles the same code for the GPU with the
device's primitives (see shared_code.py). The codecs that must keep a NaN's payload work on
bits, never on a float register: a GPU quiets or replaces NaNs that pass through float
instructions, and narrows a float64 NaN to a canonical one unless told otherwise
(``f32_bits_from_f64``). Most results are cast to uint32, since Numba widens uint32
arithmetic to 64 bits, which costs a GPU two instructions per operation.
"""

import numpy as np

from .primitives import bits_from_f32, f32_bits_from_f64, f32_from_bits
from .shared_code import shared

BF16 = 0
F16 = 1
F32 = 2


@shared
def half_bits_to_f32_bits(h):
    """float32 bits of an f16 (exact; a NaN keeps its sign and payload)."""
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    exponent = (h >> np.uint32(10)) & np.uint32(0x1F)
    mantissa = h & np.uint32(0x3FF)
    if exponent == 0:
        # Subnormal or zero: value = mantissa * 2**-24, exact in float32.
        magnitude = np.float32(mantissa) * np.float32(5.9604644775390625e-08)
        return np.uint32(sign | bits_from_f32(magnitude))
    if exponent == 31:
        return np.uint32(sign | np.uint32(0x7F800000) | (mantissa << np.uint32(13)))
    return np.uint32(sign | ((exponent + np.uint32(112)) << np.uint32(23))
                     | (mantissa << np.uint32(13)))


@shared
def half_bits_to_f32(h):
    return f32_from_bits(half_bits_to_f32_bits(np.uint32(h)))


@shared
def decode_bits(raw, encoding):
    """float32 bits of one stored element (exact for all three encodings)."""
    if encoding == BF16:
        return np.uint32(np.uint32(raw) << np.uint32(16))
    if encoding == F16:
        return half_bits_to_f32_bits(np.uint32(raw))
    return np.uint32(raw)


@shared
def decode(raw, encoding):
    """Widen one stored element to float32 (exact for all three encodings)."""
    return f32_from_bits(decode_bits(raw, encoding))


@shared
def decode64(raw, encoding):
    return np.float64(decode(raw, encoding))


@shared
def f32_round_to_odd_bits(value):
    """float64 -> float32 bits rounded to odd.

    Rounding to odd first and then to nearest-even in the narrower format is
    a correct single rounding whenever the intermediate keeps two more bits
    than the target, which float32 does for bf16 and f16.
    """
    bits = f32_bits_from_f64(value)
    widened = np.float64(f32_from_bits(bits))
    if widened != value and value == value:
        # In place, so Numba types bits as uint64: casting back to uint32 each time made
        # the CPU's encode loops a third slower.
        if abs(widened) > abs(value):
            bits -= np.uint32(1)
        bits |= np.uint32(1)
    return bits


@shared
def f32_bits_to_bf16(bits):
    if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        # NaN: keep sign and payload; only a payload lost to truncation needs a bit.
        truncated = bits >> np.uint32(16)
        if (truncated & np.uint32(0x7F)) == 0:
            truncated |= np.uint32(0x40)
        return np.uint32(truncated)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return np.uint32((bits + rounding) >> np.uint32(16))


@shared
def f32_bits_to_half(bits):
    sign = (bits >> np.uint32(16)) & np.uint32(0x8000)
    magnitude = bits & np.uint32(0x7FFFFFFF)
    if magnitude >= np.uint32(0x7F800000):
        if magnitude > np.uint32(0x7F800000):
            return np.uint32(sign | np.uint32(0x7E00)
                             | ((magnitude >> np.uint32(13)) & np.uint32(0x3FF)))
        return np.uint32(sign | np.uint32(0x7C00))
    if magnitude >= np.uint32(0x477FF000):  # >= 65520 rounds to infinity
        return np.uint32(sign | np.uint32(0x7C00))
    if magnitude < np.uint32(0x38800000):  # below 2**-14: half subnormal or zero
        if magnitude < np.uint32(0x33000000):  # below 2**-25: rounds to zero
            return np.uint32(sign)
        exponent = magnitude >> np.uint32(23)
        mantissa = (magnitude & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
        shift = np.uint32(126) - exponent
        quotient = mantissa >> shift
        remainder = mantissa & ((np.uint32(1) << shift) - np.uint32(1))
        half = np.uint32(1) << (shift - np.uint32(1))
        if remainder > half or (remainder == half and (quotient & np.uint32(1))):
            quotient += np.uint32(1)
        return np.uint32(sign | quotient)
    rebased = (magnitude >> np.uint32(13)) - np.uint32(112 << 10)
    remainder = magnitude & np.uint32(0x1FFF)
    if remainder > np.uint32(0x1000) or (remainder == np.uint32(0x1000)
                                         and (rebased & np.uint32(1))):
        rebased += np.uint32(1)
    return np.uint32(sign | rebased)


@shared
def narrow_f32_bits(bits, encoding):
    """float32 bits -> stored bits of ``encoding`` (RNE; a NaN keeps its payload's top)."""
    if encoding == F32:
        return np.uint32(bits)
    if encoding == BF16:
        return f32_bits_to_bf16(bits)
    return f32_bits_to_half(bits)


@shared
def encode(value, encoding):
    """Narrow a float64 to the stored bits of ``encoding`` with one RNE rounding."""
    if encoding == F32:
        return f32_bits_from_f64(value)
    odd = f32_round_to_odd_bits(value)
    if encoding == BF16:
        return f32_bits_to_bf16(odd)
    return f32_bits_to_half(odd)
