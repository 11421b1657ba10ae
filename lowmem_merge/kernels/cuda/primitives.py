"""The GPU's spelling of the primitives of kernels/primitives.py, and its float64 product.

Shared kernel code (kernels/shared_code.py) calls these under the CPU's names;
``DEVICE_PRIMITIVES`` maps each name to the device's function. Each has a twin for Numba's
CUDA simulator, which runs kernels as Python on NumPy scalars (libdevice is only stubs
there):

* bit casts go through a one-element local array view, which NVVM lowers to a register
  move (no local memory); libdevice's float_as_int and friends would be as cheap but are
  stubs returning None in the simulator, where NumPy scalar views do the same;
* ``f32_bits_from_f64`` narrows a NaN as x86 and Arm do (quieted, with its sign and the top
  of its payload), where the device's conversion gives a canonical NaN;
* ``mul32``: a float32 product that is never fused into an FMA. NVVM contracts
  ``a * b + c`` by default, which can change the last bit against the CPU's two roundings
  (see mul_rn, its float64 sibling); libdevice's ``__nv_fmul_rn`` is not contracted;
* ``floor32``, ``sqrt32``: numba-cuda lowers neither np.floor nor np.sqrt on scalars, and
  math.floor returns an integer; libdevice's are exact (sqrtf is correctly rounded under
  NVVM's default -prec-sqrt=1);
* ``to_int64``: a device's float-to-integer conversion saturates, x86's truncation gives
  0x8000000000000000 for NaN or out of range;
* ``wrap_add64``, ``wrap_mul64``: uint64 arithmetic modulo 2**64, natural on a device; NumPy
  scalars warn on overflow, so the simulator wraps Python integers.
"""

from collections.abc import Callable

import numpy as np
from numba import config, cuda

from ..shared_code import PRIMITIVES

SIMULATED = bool(config.ENABLE_CUDASIM)
_MASK64 = (1 << 64) - 1
_TWO_63 = np.float32(2.0**63)
_INT64_MIN = np.int64(-(2**63))


def device_function(fn: Callable) -> Callable:
    """cuda.jit(device=True); in the simulator, the plain Python function.

    The simulator's device-function wrapper swaps the module's ``cuda`` for its fake on every
    call, which dominates its run time. A kernel swaps its own module's ``cuda`` for the
    whole launch, so a function that uses ``cuda.*`` only from a kernel's module, or not at
    all, needs no wrapper there."""
    return fn if SIMULATED else cuda.jit(device=True)(fn)


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
if SIMULATED:

    def mul_rn(a: float, b: float) -> float:
        """Python and NumPy floats never fuse: a plain product is the CPU's."""
        return a * b

    def f32_from_bits(bits):
        return np.uint32(bits).view(np.float32)

    def bits_from_f32(value):
        return np.float32(value).view(np.uint32)

    def _bits_from_f64(value):
        return np.float64(value).view(np.uint64)

    def mul32(a, b):
        return np.float32(a) * np.float32(b)

    def floor32(value):
        return np.floor(np.float32(value))

    def sqrt32(value):
        return np.sqrt(np.float32(value))

    def wrap_add64(a, b):
        return np.uint64((int(a) + int(b)) & _MASK64)

    def wrap_mul64(a, b):
        return np.uint64((int(a) * int(b)) & _MASK64)

else:
    from numba.cuda import libdevice

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
    def _bits_from_f64(value):
        cell = cuda.local.array(1, np.float64)
        cell[0] = value
        return cell.view(np.uint64)[0]

    @device_function
    def mul32(a, b):
        return libdevice.fmul_rn(np.float32(a), np.float32(b))

    @device_function
    def floor32(value):
        return libdevice.floorf(np.float32(value))

    @device_function
    def sqrt32(value):
        return libdevice.sqrtf(np.float32(value))

    @device_function
    def wrap_add64(a, b):
        return np.uint64(a) + np.uint64(b)

    @device_function
    def wrap_mul64(a, b):
        return np.uint64(a) * np.uint64(b)


@device_function
def f32_bits_from_f64(value):
    """The CPU's narrowing: cvt.rn.f32.f64 would give a NaN the canonical payload. (The
    simulator takes this path too, so its tests check the NaN bits against the CPU's.)"""
    if value != value:
        bits = _bits_from_f64(value)
        return np.uint32(((bits >> np.uint64(32)) & np.uint64(0x80000000))
                         | np.uint64(0x7FC00000) | ((bits >> np.uint64(29)) & np.uint64(0x3FFFFF)))
    return bits_from_f32(np.float32(value))


@device_function
def to_int64(value):
    """np.int64(value) as x86 truncates (0x8000000000000000 for NaN or out of range), where a
    device's conversion saturates."""
    if value >= -_TWO_63 and value < _TWO_63:
        return np.int64(value)
    return _INT64_MIN


DEVICE_PRIMITIVES = {name: globals()[name] for name in PRIMITIVES}
