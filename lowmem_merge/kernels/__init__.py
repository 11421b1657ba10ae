"""Numba kernels: pure functions on arrays of raw tensor bits."""

from .arrays import (
    REDUCTION_BLOCK,
    count_nonfinite,
    decode_array,
    encode_array,
    gram_blocks,
    line_gram,
    line_weighted_sum,
    transcode,
    weighted_sum,
)
from .scalars import BF16, F16, F32

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
    "transcode",
    "weighted_sum",
]
