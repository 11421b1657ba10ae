"""A fix for a race in numba-cuda's simulator (0.30.4, the newest on the registry).

The simulator runs each CUDA thread of a block as a Python thread. Its
``FakeCUDAShared.array`` finds a block's shared array by the calling source line with a
plain dict lookup, and creates and stores the array when the lookup misses. Two threads
that reach the line together can both miss, so threads of one block end up with different
"shared" arrays and a kernel that is right on a GPU computes garbage. A short GIL switch
interval, or a loaded machine, makes it happen often enough to fail a test run: with a
1 us interval, 32 threads asking at once got more than one array in 5, 26 and 37 of 300
trials (three runs). tests/test_cuda_simulator.py runs that experiment against the patch.

``make_shared_arrays_atomic`` does the lookup and creation under one lock, keyed exactly
as the simulator keys it.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

_lock = threading.Lock()


def make_shared_arrays_atomic() -> None:
    """Patch the simulator's shared-array allocator (a no-op if already patched)."""
    from numba.cuda.simulator import kernelapi

    shared_class = kernelapi.FakeCUDAShared
    if getattr(shared_class.array, "atomic", False):
        return
    unpatched = shared_class.array

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory, or an error
            return unpatched(self, shape, dtype, alignment)
        dtype = kernelapi.numpy_support.as_dtype(dtype) \
            if isinstance(dtype, kernelapi.types.Type) else dtype
        frame = sys._getframe(1)
        caller = (frame.f_code.co_filename, frame.f_lineno)  # the simulator's key
        with _lock:
            found = self._allocations.get(caller)
            if found is None:
                found = self._allocations[caller] = np.empty(shape, dtype)
        return found

    array.atomic = True
    shared_class.array = array
