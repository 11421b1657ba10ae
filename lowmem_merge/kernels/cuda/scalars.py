"""Device twins of kernels/scalars.py, equal bit for bit.

Each function mirrors its CPU namesake, so a difference in one is easy to spot in
the other; decoding returns float32 bits rather than a float, so that transcode
never holds a signalling NaN in a float register. Bit casts go through a
one-element local array view: NVVM lowers it to a register move (no local memory)
and the simulator runs it as a numpy view, so one source serves both. libdevice's
float_as_int and friends would be as cheap on a GPU but are stubs returning None
in the simulator.
"""

import numpy as np
from numba import config, cuda
from numba.cuda import libdevice

from ..scalars import BF16, F16, F32

# FMA contraction. NVVM contracts a multiply feeding an add into one fused
# multiply-add by default (-fma=1), and numba-cuda only passes -fma=1 (with ftz
# and fast division) when fastmath=True; with fastmath=False it passes no fma
# option at all, and cuda.jit has no way to pass -fma=0 (checked in numba-cuda
# 0.30.4: cudadrv/nvvm.py compile_ir, dispatcher.py _Kernel). A plain
# `total += c * x` does compile to fma.rn.f64. The CPU kernels never fuse, so
# products that feed a sum go through mul_rn: libdevice __nv_dmul_rn, which is
# PTX mul.rn.f64, an explicitly rounded multiply that neither NVVM nor ptxas
# fuses (PTX ISA: only mul/add without a rounding modifier may be fused). It costs
# one extra FP64 instruction per product: nothing on data-centre GPUs, where these
# kernels are memory bound, and up to a factor 1.5-2 where FP64 is the bottleneck,
# on consumer GPUs with 1/64-rate FP64. tests/test_ptx.py compiles every kernel
# with NVVM and checks its PTX (no GPU needed).
if config.ENABLE_CUDASIM:

    def mul_rn(a: float, b: float) -> float:
        """Python and NumPy floats never fuse: a plain product is the CPU's."""
        return a * b

else:
    mul_rn = libdevice.dmul_rn


@cuda.jit(device=True, inline="always")
def f32_from_bits(bits):
    cell = cuda.local.array(1, np.uint32)
    cell[0] = np.uint32(bits)
    return cell.view(np.float32)[0]


@cuda.jit(device=True, inline="always")
def bits_from_f32(value):
    cell = cuda.local.array(1, np.float32)
    cell[0] = value
    return cell.view(np.uint32)[0]


@cuda.jit(device=True, inline="always")
def bits_from_f64(value):
    cell = cuda.local.array(1, np.float64)
    cell[0] = value
    return cell.view(np.uint64)[0]


@cuda.jit(device=True, inline="always")
def f32_nan_bits(value):
    """float32 bits of a float64 NaN narrowed as x86 and Arm CPUs do: quieted, with its sign
    and the top of its payload. A GPU's conversion may give a canonical NaN instead."""
    bits = bits_from_f64(value)
    return np.uint32(((bits >> np.uint64(32)) & np.uint64(0x80000000)) | np.uint64(0x7FC00000)
                     | ((bits >> np.uint64(29)) & np.uint64(0x3FFFFF)))


@cuda.jit(device=True, inline="always")
def half_bits_to_f32_bits(h):
    """float32 bits of an f16 (bits, not a value, so NaN payloads cannot be quieted)."""
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


@cuda.jit(device=True, inline="always")
def decode_bits(raw, encoding):
    """float32 bits of one stored element (exact for all three encodings)."""
    if encoding == BF16:
        return np.uint32(np.uint32(raw) << np.uint32(16))
    if encoding == F16:
        return half_bits_to_f32_bits(np.uint32(raw))
    return np.uint32(raw)


@cuda.jit(device=True, inline="always")
def decode(raw, encoding):
    """Widen one stored element to float32 (exact for all three encodings)."""
    return f32_from_bits(decode_bits(raw, encoding))


@cuda.jit(device=True, inline="always")
def decode64(raw, encoding):
    return np.float64(decode(raw, encoding))


@cuda.jit(device=True, inline="always")
def f32_round_to_odd_bits(value):
    """float64 -> float32 bits rounded to odd (see kernels/scalars.py)."""
    narrowed = np.float32(value)
    bits = bits_from_f32(narrowed)
    widened = np.float64(narrowed)
    if widened != value and value == value:
        if abs(widened) > abs(value):
            bits = np.uint32(bits - np.uint32(1))
        bits = np.uint32(bits | np.uint32(1))
    return bits


@cuda.jit(device=True, inline="always")
def f32_bits_to_bf16(bits):
    if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        # NaN: keep sign and payload; only a payload lost to truncation needs a bit.
        truncated = bits >> np.uint32(16)
        if (truncated & np.uint32(0x7F)) == 0:
            truncated |= np.uint32(0x40)
        return np.uint32(truncated)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return np.uint32((bits + rounding) >> np.uint32(16))


@cuda.jit(device=True, inline="always")
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


@cuda.jit(device=True, inline="always")
def narrow_f32_bits(bits, encoding):
    """float32 bits -> stored bits of ``encoding`` (the CPU narrow_f32, minus the float)."""
    if encoding == F32:
        return np.uint32(bits)
    if encoding == BF16:
        return f32_bits_to_bf16(bits)
    return f32_bits_to_half(bits)


@cuda.jit(device=True, inline="always")
def encode(value, encoding):
    """Narrow a float64 to the stored bits of ``encoding`` with one RNE rounding."""
    if value != value:
        return narrow_f32_bits(f32_nan_bits(value), encoding)
    if encoding == F32:
        return bits_from_f32(np.float32(value))
    odd = f32_round_to_odd_bits(value)
    if encoding == BF16:
        return f32_bits_to_bf16(odd)
    return f32_bits_to_half(odd)
