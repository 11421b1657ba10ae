"""Scalar bit-level codecs for bf16, f16 and f32, inlined into the array kernels.

Raw tensor data is held as unsigned integers (uint16 for bf16/f16, uint32 for
f32) so one kernel serves every input dtype; ``decode`` widens to float32 and
``encode`` narrows a float64 result with a single correct rounding.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

BF16 = 0
F16 = 1
F32 = 2


@intrinsic
def f32_from_bits(typingctx, bits):
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        as_u32 = context.cast(builder, args[0], signature.args[0], types.uint32)
        return builder.bitcast(as_u32, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def bits_from_f32(typingctx, value):
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(value), codegen


@njit(inline="always", cache=True)
def half_bits_to_f32(h):
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    exponent = (h >> np.uint32(10)) & np.uint32(0x1F)
    mantissa = h & np.uint32(0x3FF)
    if exponent == 0:
        # Subnormal or zero: value = mantissa * 2**-24, exact in float32.
        magnitude = np.float32(mantissa) * np.float32(5.9604644775390625e-08)
        return -magnitude if sign else magnitude
    if exponent == 31:
        return f32_from_bits(sign | np.uint32(0x7F800000) | (mantissa << np.uint32(13)))
    return f32_from_bits(sign | ((exponent + np.uint32(112)) << np.uint32(23))
                         | (mantissa << np.uint32(13)))


@njit(inline="always", cache=True)
def decode(raw, encoding):
    """Widen one stored element to float32 (exact for all three encodings)."""
    if encoding == BF16:
        return f32_from_bits(np.uint32(raw) << np.uint32(16))
    if encoding == F16:
        return half_bits_to_f32(np.uint32(raw))
    return f32_from_bits(np.uint32(raw))


@njit(inline="always", cache=True)
def f32_round_to_odd_bits(value):
    """float64 -> float32 bits rounded to odd.

    Rounding to odd first and then to nearest-even in the narrower format is
    a correct single rounding whenever the intermediate keeps two more bits
    than the target, which float32 does for bf16 and f16.
    """
    narrowed = np.float32(value)
    bits = bits_from_f32(narrowed)
    widened = np.float64(narrowed)
    if widened != value and value == value:
        if abs(widened) > abs(value):
            bits -= np.uint32(1)
        bits |= np.uint32(1)
    return bits


@njit(inline="always", cache=True)
def f32_bits_to_bf16(bits):
    if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        # NaN: keep sign and payload; only a payload lost to truncation needs a bit.
        truncated = bits >> np.uint32(16)
        if (truncated & np.uint32(0x7F)) == 0:
            truncated |= np.uint32(0x40)
        return truncated
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (bits + rounding) >> np.uint32(16)


@njit(inline="always", cache=True)
def f32_bits_to_half(bits):
    sign = (bits >> np.uint32(16)) & np.uint32(0x8000)
    magnitude = bits & np.uint32(0x7FFFFFFF)
    if magnitude >= np.uint32(0x7F800000):
        if magnitude > np.uint32(0x7F800000):
            return sign | np.uint32(0x7E00) | ((magnitude >> np.uint32(13)) & np.uint32(0x3FF))
        return sign | np.uint32(0x7C00)
    if magnitude >= np.uint32(0x477FF000):  # >= 65520 rounds to infinity
        return sign | np.uint32(0x7C00)
    if magnitude < np.uint32(0x38800000):  # below 2**-14: half subnormal or zero
        if magnitude < np.uint32(0x33000000):  # below 2**-25: rounds to zero
            return sign
        exponent = magnitude >> np.uint32(23)
        mantissa = (magnitude & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
        shift = np.uint32(126) - exponent
        quotient = mantissa >> shift
        remainder = mantissa & ((np.uint32(1) << shift) - np.uint32(1))
        half = np.uint32(1) << (shift - np.uint32(1))
        if remainder > half or (remainder == half and (quotient & np.uint32(1))):
            quotient += np.uint32(1)
        return sign | quotient
    rebased = (magnitude >> np.uint32(13)) - np.uint32(112 << 10)
    remainder = magnitude & np.uint32(0x1FFF)
    if remainder > np.uint32(0x1000) or (remainder == np.uint32(0x1000)
                                         and (rebased & np.uint32(1))):
        rebased += np.uint32(1)
    return sign | rebased


@njit(inline="always", cache=True)
def narrow_f32(value, encoding):
    """Narrow a float32 to the stored bits of ``encoding`` without a float64 detour,
    so signalling NaN payloads survive (x86 quiets them on widening)."""
    bits = bits_from_f32(value)
    if encoding == F32:
        return bits
    if encoding == BF16:
        return f32_bits_to_bf16(bits)
    return f32_bits_to_half(bits)


@njit(inline="always", cache=True)
def encode(value, encoding):
    """Narrow a float64 to the stored bits of ``encoding`` with one RNE rounding."""
    if encoding == F32:
        return bits_from_f32(np.float32(value))
    odd = f32_round_to_odd_bits(value)
    if encoding == BF16:
        return f32_bits_to_bf16(odd)
    return f32_bits_to_half(odd)
