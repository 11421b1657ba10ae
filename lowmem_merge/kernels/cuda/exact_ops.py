"""Device arithmetic for the sparse-merge and quantizer kernels that scalars.py lacks.

Each helper has a twin for Numba's CUDA simulator, which runs kernels as Python on NumPy
scalars (libdevice is only stubs there):

* ``mul32``: a float32 product that is never fused into an FMA. NVVM contracts
  ``a * b + c`` by default, which can change the last bit against the CPU's two roundings
  (see scalars.mul_rn, its float64 sibling); libdevice's ``__nv_fmul_rn`` is not contracted;
* ``floor32``, ``sqrt32``: numba-cuda lowers neither np.floor nor np.sqrt on scalars, and
  math.floor returns an integer; libdevice's are exact (sqrtf is correctly rounded under
  NVVM's default -prec-sqrt=1);
* ``wrap_add64``, ``wrap_mul64``: uint64 arithmetic modulo 2**64, natural on a device; NumPy
  scalars warn on overflow, so the simulator wraps Python integers.
"""

from collections.abc import Callable

import numpy as np
from numba import config, cuda

SIMULATED = bool(config.ENABLE_CUDASIM)
_MASK64 = (1 << 64) - 1


def device_function(fn: Callable) -> Callable:
    """cuda.jit(device=True); in the simulator, the plain Python function.

    The simulator's device-function wrapper swaps the module's ``cuda`` for its fake on every
    call, which dominates its run time. A kernel swaps its own module's ``cuda`` for the
    whole launch, so a function that uses ``cuda.*`` only from a kernel's module, or not at
    all, needs no wrapper there."""
    return fn if SIMULATED else cuda.jit(device=True)(fn)


if SIMULATED:

    @device_function
    def mul32(a, b):
        return np.float32(a) * np.float32(b)

    @device_function
    def floor32(value):
        return np.floor(np.float32(value))

    @device_function
    def sqrt32(value):
        return np.sqrt(np.float32(value))

    @device_function
    def wrap_add64(a, b):
        return np.uint64((int(a) + int(b)) & _MASK64)

    @device_function
    def wrap_mul64(a, b):
        return np.uint64((int(a) * int(b)) & _MASK64)

else:
    from numba.cuda import libdevice

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
