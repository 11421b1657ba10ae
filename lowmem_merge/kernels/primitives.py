"""The CPU's spelling of the operations that shared kernel code may not write out itself.

Code written once for the CPU and the GPU (see shared_code.py) calls these by name; each
device supplies its own functions under the same names, the GPU's in cuda/primitives.py.
They exist because the two Numba targets spell these operations differently, or give them
other results where written plainly:

* bit casts between floats and their stored integers, and the float64 -> float32
  narrowing of a NaN;
* ``mul32``: a float32 product (a GPU compiler would fuse a plain one into a sum);
* ``floor32``, ``sqrt32``: numba-cuda lowers neither np.floor nor np.sqrt on scalars;
* ``to_int64``: float-to-integer truncation as x86 does it, where a GPU saturates;
* ``wrap_add64``, ``wrap_mul64``: uint64 arithmetic modulo 2**64 (NumPy scalars in the
  CUDA simulator warn on overflow).
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

__all__ = ["bits_from_f32", "f32_bits_from_f64", "f32_from_bits", "floor32", "mul32",
           "sqrt32", "to_int64", "wrap_add64", "wrap_mul64"]


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


@njit(inline="always", cache=True, error_model="numpy")
def f32_bits_from_f64(value):
    """float64 -> float32 bits, rounded to nearest even; a NaN is quieted and keeps its sign
    and the top of its payload (x86 and Arm hardware do this; a GPU gives a canonical NaN)."""
    return bits_from_f32(np.float32(value))


@njit(cache=True, error_model="numpy")
def mul32(a, b):
    return np.float32(a) * np.float32(b)


@njit(cache=True, error_model="numpy")
def floor32(value):
    return np.floor(np.float32(value))


@njit(cache=True, error_model="numpy")
def sqrt32(value):
    return np.sqrt(np.float32(value))


@njit(cache=True, error_model="numpy")
def to_int64(value):
    """Truncation as x86 does it: 0x8000000000000000 for NaN or out of range."""
    return np.int64(value)


@njit(cache=True, error_model="numpy")
def wrap_add64(a, b):
    return np.uint64(a) + np.uint64(b)


@njit(cache=True, error_model="numpy")
def wrap_mul64(a, b):
    return np.uint64(a) * np.uint64(b)
