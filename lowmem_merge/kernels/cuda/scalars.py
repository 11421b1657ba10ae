"""kernels/scalars.py compiled for the GPU: the same codecs, bit for bit, from one source.

The twins are made by shared_code.retarget with the device's primitives; the names here are
the CPU's, so device kernels import them as the CPU kernels do.
"""

from .. import scalars
from ..scalars import BF16, F16, F32
from ..shared_code import retarget
from .primitives import DEVICE_PRIMITIVES, device_function

twins = retarget(scalars, DEVICE_PRIMITIVES, device_function, f"{__name__}.twins")

decode = twins.decode
decode64 = twins.decode64
decode_bits = twins.decode_bits
encode = twins.encode
half_bits_to_f32 = twins.half_bits_to_f32
narrow_f32_bits = twins.narrow_f32_bits

__all__ = ["BF16", "F16", "F32", "decode", "decode64", "decode_bits", "encode",
           "half_bits_to_f32", "narrow_f32_bits", "twins"]
