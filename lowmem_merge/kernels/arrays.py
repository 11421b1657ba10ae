"""Array kernels over raw (undecoded) tensor data.

Experts arrive as rows of raw bits (one row per expert) sharing one encoding.
The hot kernels are specialised per encoding by small factories, so decode
and encode compile to straight-line code that LLVM vectorises, and take the
rows as a tuple, so the number of experts is a compile-time constant too.
Numba caches each variant on disk (closure values are part of its key).

Every reduction is split into fixed blocks aligned to the tensor's global
element index, with a fixed summation order inside a block, and the blocks
are summed in order by the caller: results are bit-identical whatever the
chunk size, thread count or machine.
"""

from functools import cache

import numpy as np
from numba import njit, prange

from .scalars import decode, decode_bits, encode, narrow_f32_bits

# Elements per reduction block. Chunk starts must be multiples of this.
REDUCTION_BLOCK = 8192


@cache
def _gram_kernel(encoding: int, base_encoding: int, subtract_base: bool):
    @njit(parallel=True, nogil=True, cache=True)
    def gram(rows, base, partials):
        n_experts = len(rows)
        n = rows[0].shape[0]
        for block in prange(partials.shape[0]):
            lo = block * REDUCTION_BLOCK
            width = min(n, lo + REDUCTION_BLOCK) - lo
            values = np.empty((n_experts, width))
            for i in range(n_experts):
                row = rows[i]
                for j in range(width):
                    value = np.float64(decode(row[lo + j], encoding))
                    if subtract_base:
                        value -= np.float64(decode(base[lo + j], base_encoding))
                    values[i, j] = value
            for i in range(n_experts):
                for k in range(i, n_experts):
                    # Four interleaved sums in a fixed order: vectorisable, still deterministic.
                    s0 = s1 = s2 = s3 = 0.0
                    j = 0
                    while j + 4 <= width:
                        s0 += values[i, j] * values[k, j]
                        s1 += values[i, j + 1] * values[k, j + 1]
                        s2 += values[i, j + 2] * values[k, j + 2]
                        s3 += values[i, j + 3] * values[k, j + 3]
                        j += 4
                    while j < width:
                        s0 += values[i, j] * values[k, j]
                        j += 1
                    total = (s0 + s1) + (s2 + s3)
                    partials[block, i, k] = total
                    partials[block, k, i] = total
    return gram


def gram_blocks(stack: np.ndarray, encoding: int, base: np.ndarray, base_encoding: int,
                subtract_base: bool, partials: np.ndarray) -> None:
    """Per-block Gram matrices of the rows of ``stack`` (minus ``base`` if asked).

    partials has shape (n_blocks, N, N); block b covers elements
    [b * REDUCTION_BLOCK, (b + 1) * REDUCTION_BLOCK) of this chunk.
    """
    _gram_kernel(encoding, base_encoding, subtract_base)(tuple(stack), base, partials)


@cache
def _weighted_sum_kernel(encoding: int, base_encoding: int, around_base: bool,
                         out_encoding: int):
    @njit(parallel=True, nogil=True, cache=True)
    def weighted(rows, coefficients, base, base_coefficient, out):
        n_experts = len(rows)
        for j in prange(out.shape[0]):
            total = 0.0
            if around_base:
                b = np.float64(decode(base[j], base_encoding))
                for i in range(n_experts):
                    total += coefficients[i] * (np.float64(decode(rows[i][j], encoding)) - b)
                total += base_coefficient * b
            else:
                for i in range(n_experts):
                    total += coefficients[i] * np.float64(decode(rows[i][j], encoding))
            out[j] = encode(total, out_encoding)
    return weighted


def weighted_sum(stack: np.ndarray, encoding: int, coefficients: np.ndarray, base: np.ndarray,
                 base_encoding: int, base_coefficient: float, around_base: bool,
                 out: np.ndarray, out_encoding: int) -> None:
    """out = sum_i c_i x_i, or around a base: base_coefficient * b + sum_i c_i (x_i - b).

    Sums are float64 and each output is rounded once. Deltas from a base are
    exact in float64, so task-vector merges of nearly identical models lose
    nothing to cancellation.
    """
    kernel = _weighted_sum_kernel(encoding, base_encoding, around_base, out_encoding)
    kernel(tuple(stack), coefficients, base, base_coefficient, out)


@njit(parallel=True, nogil=True, cache=True)
def count_nonfinite(raw, encoding):
    """How many of the stored values are NaN or infinite."""
    count = 0
    for j in prange(raw.shape[0]):
        if not np.isfinite(decode(raw[j], encoding)):
            count += 1
    return count


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
    """Re-encode stored bits (exact when widening, RNE when narrowing).

    Bits all the way: a signalling NaN in a float register would be quieted on a GPU."""
    for j in prange(raw.shape[0]):
        out[j] = narrow_f32_bits(decode_bits(raw[j], encoding), out_encoding)


@cache
def _line_gram_kernel(encoding: int, base_encoding: int, subtract_base: bool, by_row: bool):
    @njit(parallel=True, nogil=True, cache=True)
    def gram(rows, base, row_length, out):
        """by_row: out[r] = Gram of row r of this chunk; else out[c] += Gram of column c."""
        n_experts = len(rows)
        n_rows = rows[0].shape[0] // row_length
        count = row_length if by_row else n_rows
        for line in prange(out.shape[0]):
            values = np.empty((n_experts, count))
            for i in range(n_experts):
                row = rows[i]  # hoisted: indexing the tuple inside the loop is slow
                for step in range(count):
                    j = line * row_length + step if by_row else step * row_length + line
                    value = np.float64(decode(row[j], encoding))
                    if subtract_base:
                        value -= np.float64(decode(base[j], base_encoding))
                    values[i, step] = value
            for i in range(n_experts):
                for k in range(i, n_experts):
                    total = 0.0
                    for step in range(count):
                        total += values[i, step] * values[k, step]
                    out[line, i, k] += total
                    out[line, k, i] = out[line, i, k]
    return gram


def line_gram(stack: np.ndarray, encoding: int, base: np.ndarray, base_encoding: int,
              subtract_base: bool, row_length: int, by_row: bool, out: np.ndarray) -> None:
    """Gram matrices per row (out: rows of the chunk x N x N, overwritten) or per column
    (out: row_length x N x N, accumulated in row order across chunks) of a row-aligned chunk."""
    if by_row:
        out[:] = 0.0
    kernel = _line_gram_kernel(encoding, base_encoding, subtract_base, by_row)
    kernel(tuple(stack), base, row_length, out)


@cache
def _line_sum_kernel(encoding: int, base_encoding: int, around_base: bool, by_row: bool,
                     out_encoding: int):
    @njit(parallel=True, nogil=True, cache=True)
    def weighted(rows, coefficients, base, base_coefficient, row_length, first_row, out):
        n_experts = len(rows)
        n_rows = out.shape[0] // row_length
        for r in prange(n_rows):
            lo = r * row_length
            totals = np.zeros(row_length)
            for i in range(n_experts):
                row = rows[i]  # hoisted: indexing the tuple inside the loop is slow
                for step in range(row_length):
                    line = first_row + r if by_row else step
                    value = np.float64(decode(row[lo + step], encoding))
                    if around_base:
                        value -= np.float64(decode(base[lo + step], base_encoding))
                    totals[step] += coefficients[line, i] * value
            for step in range(row_length):
                b = np.float64(decode(base[lo + step], base_encoding)) if around_base else 0.0
                out[lo + step] = encode(totals[step] + base_coefficient * b, out_encoding)
    return weighted


def line_weighted_sum(stack: np.ndarray, encoding: int, coefficients: np.ndarray,
                      base: np.ndarray, base_encoding: int, base_coefficient: float,
                      around_base: bool, row_length: int, by_row: bool, first_row: int,
                      out: np.ndarray, out_encoding: int) -> None:
    """weighted_sum with coefficients per row (indexed from first_row) or per column."""
    kernel = _line_sum_kernel(encoding, base_encoding, around_base, by_row, out_encoding)
    kernel(tuple(stack), coefficients, base, base_coefficient, row_length, first_row, out)
