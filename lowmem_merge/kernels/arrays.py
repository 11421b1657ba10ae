"""Array kernels over raw (undecoded) tensor data.

Experts arrive as a 2-D stack of raw bits, one row per expert, sharing one
encoding. Every reduction is split into fixed blocks aligned to the tensor's
global element index and summed in block order, so results are bit-identical
whatever the chunk size or thread count.
"""

import numpy as np
from numba import njit, prange

from .scalars import decode, encode, narrow_f32

# Elements per reduction block. Chunk starts must be multiples of this.
REDUCTION_BLOCK = 8192


@njit(parallel=True, nogil=True, cache=True)
def gram_blocks(stack, encoding, base, base_encoding, subtract_base, partials):
    """Per-block Gram matrices of the rows of ``stack`` (minus ``base`` if asked).

    partials has shape (n_blocks, N, N); block b covers elements
    [b * REDUCTION_BLOCK, (b + 1) * REDUCTION_BLOCK) of this chunk.
    """
    n_experts, n = stack.shape
    n_blocks = partials.shape[0]
    for block in prange(n_blocks):
        lo = block * REDUCTION_BLOCK
        hi = min(n, lo + REDUCTION_BLOCK)
        width = hi - lo
        values = np.empty((n_experts, width))
        for i in range(n_experts):
            for j in range(width):
                v = np.float64(decode(stack[i, lo + j], encoding))
                if subtract_base:
                    v -= np.float64(decode(base[lo + j], base_encoding))
                values[i, j] = v
        for i in range(n_experts):
            for k in range(i, n_experts):
                total = 0.0
                for j in range(width):
                    total += values[i, j] * values[k, j]
                partials[block, i, k] = total
                partials[block, k, i] = total


@njit(parallel=True, nogil=True, cache=True)
def weighted_sum(stack, encoding, coefficients, base, base_encoding, base_coefficient,
                 around_base, out, out_encoding):
    """out = sum_i c_i x_i, or around a base: base_coefficient * b + sum_i c_i (x_i - b).

    Deltas from a base are exact in float64, so task-vector merges of nearly
    identical models lose nothing to cancellation.
    """
    n_experts, n = stack.shape
    for j in prange(n):
        total = 0.0
        if around_base:
            b = np.float64(decode(base[j], base_encoding))
            for i in range(n_experts):
                total += coefficients[i] * (np.float64(decode(stack[i, j], encoding)) - b)
            total += base_coefficient * b
        else:
            for i in range(n_experts):
                total += coefficients[i] * np.float64(decode(stack[i, j], encoding))
        out[j] = encode(total, out_encoding)


@njit(parallel=True, nogil=True, cache=True)
def decode_array(raw, encoding, out):
    for j in prange(raw.shape[0]):
        out[j] = decode(raw[j], encoding)


@njit(parallel=True, nogil=True, cache=True)
def encode_array(values, out, out_encoding):
    """float64 values -> stored bits of out_encoding, one RNE rounding each."""
    for j in prange(values.shape[0]):
        out[j] = encode(np.float64(values[j]), out_encoding)


@njit(parallel=True, nogil=True, cache=True)
def transcode(raw, encoding, out, out_encoding):
    """Re-encode stored bits (exact when widening, RNE when narrowing)."""
    for j in prange(raw.shape[0]):
        out[j] = narrow_f32(decode(raw[j], encoding), out_encoding)
