"""The simulator the CUDA tests run on is itself tested: its shared arrays must be shared.

See cudasim_shared.py: numba-cuda's simulator can give threads of one block different
"shared" arrays. conftest.py patches it; these tests show why, and that the patch holds.
"""

import sys
import threading

import numpy as np
import pytest
from cudasim_shared import make_shared_arrays_atomic
from numba import config as numba_config

cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (CUDA path)")
pytestmark = pytest.mark.skipif(not numba_config.ENABLE_CUDASIM,
                                reason="tests numba-cuda's simulator, which is off")
THREADS = 32


def blocks_split(shared_class, trials: int) -> int:
    """Trials in which THREADS threads asking at once got more than one shared array."""
    split = 0
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # as many thread switches as Python allows
    try:
        for _ in range(trials):
            shared = shared_class(0)
            barrier = threading.Barrier(THREADS)
            got = [0] * THREADS

            def ask(k, shared=shared, barrier=barrier, got=got):
                barrier.wait()
                got[k] = id(shared.array(THREADS, np.float64))

            threads = [threading.Thread(target=ask, args=(k,)) for k in range(THREADS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            split += len(set(got)) > 1
    finally:
        sys.setswitchinterval(previous)
    return split


def test_patched_shared_arrays_are_one_per_block():
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    make_shared_arrays_atomic()
    assert getattr(FakeCUDAShared.array, "atomic", False)
    assert blocks_split(FakeCUDAShared, 300) == 0


def test_patched_shared_arrays_are_keyed_by_line_as_before():
    make_shared_arrays_atomic()

    @cuda.jit
    def two_arrays(out):
        first = cuda.shared.array(THREADS, np.float64)
        second = cuda.shared.array(THREADS, np.int64)
        t = cuda.threadIdx.x
        first[t] = t + 0.5
        second[t] = 3 * t
        cuda.syncthreads()
        if t == 0:
            total = 0.0
            for k in range(THREADS):
                total += first[k] + second[k]
            out[cuda.blockIdx.x] = total

    out = np.zeros(3)
    two_arrays[3, THREADS](out)
    expected = sum(k + 0.5 + 3 * k for k in range(THREADS))
    np.testing.assert_array_equal(out, np.full(3, expected))
