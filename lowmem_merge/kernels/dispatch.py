"""Which device runs the heavy kernels of the tensor being merged.

Methods call the functions of ``lowmem_merge.kernels``; the engine chooses, per tensor, the
backend that serves them (the CPU, or the CUDA backend for large tensors) with
``running_on``. Methods never know the device, and a backend only has to provide the
functions in DISPATCHED, with the CPU kernels' signatures and results.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from . import arrays, gguf_quants, sparse

# The kernels whose work grows with the tensor; everything else stays on the host.
DISPATCHED = ("gram_blocks", "weighted_sum", "line_gram", "line_weighted_sum",
              "magnitude_histogram", "threshold_ties", "task_vector_l1", "task_vector_merge",
              "quantize_into")


class CpuKernels:
    """The Numba CPU kernels, and plain host memory for the engine's buffers."""

    name = "cpu"
    gram_blocks = staticmethod(arrays.gram_blocks)
    weighted_sum = staticmethod(arrays.weighted_sum)
    line_gram = staticmethod(arrays.line_gram)
    line_weighted_sum = staticmethod(arrays.line_weighted_sum)
    magnitude_histogram = staticmethod(sparse.magnitude_histogram)
    threshold_ties = staticmethod(sparse.threshold_ties)
    task_vector_l1 = staticmethod(sparse.task_vector_l1)
    task_vector_merge = staticmethod(sparse.task_vector_merge)
    quantize_into = staticmethod(gguf_quants.quantize_into)

    @staticmethod
    def host_buffer(nbytes: int) -> np.ndarray:
        return np.empty(nbytes, np.uint8)


CPU = CpuKernels()
_local = threading.local()


def active() -> Any:
    """The backend serving this thread's kernel calls (the CPU unless told otherwise)."""
    return getattr(_local, "backend", CPU)


@contextmanager
def running_on(backend: Any) -> Iterator[None]:
    """Serve this thread's kernel calls from ``backend`` inside the block."""
    previous = active()
    _local.backend = backend
    try:
        yield
    finally:
        _local.backend = previous


def dispatched(name: str) -> Callable[..., Any]:
    """A function that forwards to the active backend's kernel ``name``."""
    cpu_kernel = getattr(CPU, name)

    def call(*args: Any) -> Any:
        return getattr(active(), name)(*args)

    call.__name__ = name
    call.__doc__ = cpu_kernel.__doc__
    return call
