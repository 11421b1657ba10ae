"""Numba kernels: pure functions on arrays of raw tensor bits.

The kernels whose work grows with the tensor are dispatched (see dispatch.py): they run on
the backend the engine chose for the tensor, the CPU or a CUDA device.
"""

from .compile_cache import install as _stamp_cache_entries

_stamp_cache_entries()  # before any kernel is decorated: see compile_cache.py

from .arrays import (  # noqa: E402
    REDUCTION_BLOCK,
    count_nonfinite,
    decode_array,
    encode_array,
    transcode,
)
from .dispatch import dispatched  # noqa: E402
from .scalars import BF16, F16, F32  # noqa: E402

gram_blocks = dispatched("gram_blocks")
weighted_sum = dispatched("weighted_sum")
line_gram = dispatched("line_gram")
line_weighted_sum = dispatched("line_weighted_sum")
magnitude_histogram = dispatched("magnitude_histogram")
threshold_ties = dispatched("threshold_ties")
task_vector_l1 = dispatched("task_vector_l1")
task_vector_merge = dispatched("task_vector_merge")
quantize_into = dispatched("quantize_into")

__all__ = [
    "BF16",
    "F16",
    "F32",
    "REDUCTION_BLOCK",
    "count_nonfinite",
    "decode_array",
    "encode_array",
    "gram_blocks",
    "line_gram",
    "line_weighted_sum",
    "magnitude_histogram",
    "quantize_into",
    "task_vector_l1",
    "task_vector_merge",
    "threshold_ties",
    "transcode",
    "weighted_sum",
]
