"""Device twins of kernels/arrays.py: same names, arguments and results.

``stack`` is a 2-D array (experts x elements) of raw bits instead of a tuple of
rows. Array arguments are numba device arrays; host numpy arrays work too (inputs
are copied in, outputs in and back out, synchronously). Every launcher takes
``stream`` (0: the default stream) and returns without waiting for the kernel,
except count_nonfinite, which must read its count back.

Numerics equal the CPU kernels bit for bit: each output is computed by one thread
in the CPU's float64 operation order, with no fused multiply-add (see mul_rn in
cuda/primitives.py). The one exception is a NaN made by float64 arithmetic (inf - inf,
or a NaN input to a sum): GPUs return a canonical NaN where CPUs propagate an
operand's sign and payload, so such outputs are NaN on both but may differ in bits.
The Gram partials keep the CPU's four interleaved sums per block: one thread per
(block, lane), all N x N products in registers. Line Grams sum each line in one
thread, as the CPU does, so their parallelism is the number of lines in the chunk.
"""

from functools import cache
from typing import Any

import numpy as np
from numba import config, cuda

from ..arrays import REDUCTION_BLOCK
from .primitives import mul_rn
from .scalars import decode, decode64, decode_bits, encode, narrow_f32_bits

# Threads per block of the element-wise kernels, and a grid cap past which
# threads loop over the elements (a grid-stride loop).
THREADS = 256
MAX_BLOCKS = 65536
# The CPU Gram sums each block in four interleaved lanes; one thread per lane.
LANES = 4
GRAM_THREADS = 128  # a multiple of LANES, so a block's lanes share a thread block
WARP = 32
# A numba device array (or anything with __cuda_array_interface__), or a host numpy array.
Array = Any
Stream = Any  # a numba CUDA stream, or 0 for the default stream
if config.ENABLE_CUDASIM:
    # The simulator runs every CUDA thread as a Python thread and polls them all, which
    # costs far more than the kernels' own work: a few threads looping over the elements
    # run some 40 times faster, and still exercise the grid-stride loop.
    THREADS, MAX_BLOCKS = 32, 4


def _geometry(n_threads: int, block_size: int, strided: bool = True) -> tuple[int, int]:
    """(blocks, threads per block) for n_threads (> 0), trimmed for tiny launches.

    Only kernels with a grid-stride loop (strided) may get fewer threads than asked.
    """
    threads = min(block_size, -(-n_threads // WARP) * WARP)
    blocks = -(-n_threads // threads)
    return (min(blocks, MAX_BLOCKS) if strided else blocks), threads


def _to_device(array: Array, stream: Stream, dtype: type | None = None) -> Array:
    """Host inputs are copied in once (as a kernel argument they would be copied back too)."""
    if isinstance(array, (np.ndarray, list, tuple)):
        return cuda.to_device(np.ascontiguousarray(array, dtype=dtype), stream=stream)
    return array


@cache
def _pair_products(encoding: int, base_encoding: int, subtract_base: bool, n_experts: int):
    """A device function adding x_i * x_k of element j to sums[pair], pairs i <= k in order.

    N is a compile-time constant, so the loops unroll and values and sums live in registers.
    """
    @cuda.jit(device=True, inline="always")
    def add_products(stack, base, j, values, sums):
        shift = decode64(base[j], base_encoding) if subtract_base else 0.0
        for i in range(n_experts):
            value = decode64(stack[i, j], encoding)
            if subtract_base:
                value -= shift
            values[i] = value
        pair = 0
        for i in range(n_experts):
            for k in range(i, n_experts):
                sums[pair] += mul_rn(values[i], values[k])
                pair += 1

    return add_products


@cache
def _gram_kernel(encoding: int, base_encoding: int, subtract_base: bool, n_experts: int):
    n_pairs = n_experts * (n_experts + 1) // 2
    add_products = _pair_products(encoding, base_encoding, subtract_base, n_experts)

    @cuda.jit(device=True, inline="always")
    def sum_lane(stack, base, block, lane, values, sums):
        """The CPU's order: lane l sums j = l, l + 4, ... over whole quads; lane 0 the tail."""
        lo = block * REDUCTION_BLOCK
        width = min(stack.shape[1], lo + REDUCTION_BLOCK) - lo
        quads = width // LANES
        for step in range(quads):
            add_products(stack, base, lo + step * LANES + lane, values, sums)
        if lane == 0:
            for j in range(lo + quads * LANES, lo + width):
                add_products(stack, base, j, values, sums)

    @cuda.jit(device=True, inline="always")
    def combine_lanes(lanes, sums, partials, block, lane, active):
        """(s0 + s1) + (s2 + s3) per pair, through shared memory one pair at a time. Every
        thread of the block must reach each syncthreads, so inactive threads come too."""
        me = cuda.threadIdx.x
        pair = 0
        for i in range(n_experts):
            for k in range(i, n_experts):
                lanes[me] = sums[pair]
                cuda.syncthreads()
                if active and lane == 0:
                    total = (lanes[me] + lanes[me + 1]) + (lanes[me + 2] + lanes[me + 3])
                    partials[block, i, k] = total
                    partials[block, k, i] = total
                cuda.syncthreads()
                pair += 1

    @cuda.jit
    def gram(stack, base, partials):
        thread = cuda.grid(1)
        block, lane = thread // LANES, thread % LANES
        active = block < partials.shape[0]
        values = cuda.local.array(n_experts, np.float64)
        sums = cuda.local.array(n_pairs, np.float64)
        for pair in range(n_pairs):
            sums[pair] = 0.0
        if active:
            sum_lane(stack, base, block, lane, values, sums)
        lanes = cuda.shared.array(GRAM_THREADS, np.float64)
        combine_lanes(lanes, sums, partials, block, lane, active)

    return gram


def gram_blocks(stack: Array, encoding: int, base: Array, base_encoding: int,
                subtract_base: bool, partials: Array, stream: Stream = 0) -> None:
    """Per-block Gram matrices of the rows of ``stack`` (minus ``base`` if asked).

    partials has shape (n_blocks, N, N); block b covers elements
    [b * REDUCTION_BLOCK, (b + 1) * REDUCTION_BLOCK) of this chunk.
    """
    if partials.shape[0] == 0:
        return
    stack = _to_device(stack, stream)
    base = _to_device(base, stream) if subtract_base else stack[0]
    kernel = _gram_kernel(encoding, base_encoding, subtract_base, stack.shape[0])
    blocks, threads = _geometry(partials.shape[0] * LANES, GRAM_THREADS, strided=False)
    kernel[blocks, threads, stream](stack, base, partials)


@cache
def _weighted_sum_kernel(encoding: int, base_encoding: int, around_base: bool,
                         out_encoding: int):
    @cuda.jit
    def weighted(stack, coefficients, base, base_coefficient, out):
        for j in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
            total = 0.0
            if around_base:
                b = decode64(base[j], base_encoding)
                for i in range(stack.shape[0]):
                    total += mul_rn(coefficients[i], decode64(stack[i, j], encoding) - b)
                total += mul_rn(base_coefficient, b)
            else:
                for i in range(stack.shape[0]):
                    total += mul_rn(coefficients[i], decode64(stack[i, j], encoding))
            out[j] = encode(total, out_encoding)

    return weighted


def weighted_sum(stack: Array, encoding: int, coefficients: Array, base: Array,
                 base_encoding: int, base_coefficient: float, around_base: bool, out: Array,
                 out_encoding: int, stream: Stream = 0) -> None:
    """out = sum_i c_i x_i, or around a base: base_coefficient * b + sum_i c_i (x_i - b)."""
    if out.shape[0] == 0:
        return
    stack = _to_device(stack, stream)
    base = _to_device(base, stream) if around_base else stack[0]
    coefficients = _to_device(coefficients, stream, np.float64)
    kernel = _weighted_sum_kernel(encoding, base_encoding, around_base, out_encoding)
    blocks, threads = _geometry(out.shape[0], THREADS)
    kernel[blocks, threads, stream](stack, coefficients, base, float(base_coefficient), out)


@cuda.jit
def _count_nonfinite_kernel(raw, encoding, count):
    mine = 0
    for j in range(cuda.grid(1), raw.shape[0], cuda.gridsize(1)):
        # All-ones exponent: NaN or infinity, the same test as not isfinite.
        if (decode_bits(raw[j], encoding) & np.uint32(0x7F800000)) == np.uint32(0x7F800000):
            mine += 1
    if mine:  # non-finite values are rare: almost no thread reaches the atomic
        cuda.atomic.add(count, 0, mine)


def count_nonfinite(raw: Array, encoding: int, stream: Stream = 0) -> int:
    """How many of the stored values are NaN or infinite (waits for the stream)."""
    if raw.shape[0] == 0:
        return 0
    raw = _to_device(raw, stream)
    count = cuda.to_device(np.zeros(1, dtype=np.int64), stream=stream)
    blocks, threads = _geometry(raw.shape[0], THREADS)
    _count_nonfinite_kernel[blocks, threads, stream](raw, encoding, count)
    host = count.copy_to_host(stream=stream)
    if stream:  # a stream object (always truthy): its copy may still be in flight; 0 waits
        stream.synchronize()
    return int(host[0])


@cuda.jit
def _decode_kernel(raw, encoding, out):
    for j in range(cuda.grid(1), raw.shape[0], cuda.gridsize(1)):
        out[j] = decode(raw[j], encoding)


def decode_array(raw: Array, encoding: int, out: Array, stream: Stream = 0) -> None:
    """Stored bits -> values in out (float32 or float64; exact)."""
    if raw.shape[0] == 0:
        return
    blocks, threads = _geometry(raw.shape[0], THREADS)
    _decode_kernel[blocks, threads, stream](_to_device(raw, stream), encoding, out)


@cuda.jit
def _encode_kernel(values, out, out_encoding):
    for j in range(cuda.grid(1), values.shape[0], cuda.gridsize(1)):
        out[j] = encode(np.float64(values[j]), out_encoding)


def encode_array(values: Array, out: Array, out_encoding: int, stream: Stream = 0) -> None:
    """float64 values -> stored bits of out_encoding, one RNE rounding each."""
    if values.shape[0] == 0:
        return
    blocks, threads = _geometry(values.shape[0], THREADS)
    _encode_kernel[blocks, threads, stream](_to_device(values, stream), out, out_encoding)


@cuda.jit
def _transcode_kernel(raw, encoding, out, out_encoding):
    for j in range(cuda.grid(1), raw.shape[0], cuda.gridsize(1)):
        # Bits all the way: a float register could quiet a signalling NaN.
        out[j] = narrow_f32_bits(decode_bits(raw[j], encoding), out_encoding)


def transcode(raw: Array, encoding: int, out: Array, out_encoding: int,
              stream: Stream = 0) -> None:
    """Re-encode stored bits (exact when widening, RNE when narrowing)."""
    if raw.shape[0] == 0:
        return
    blocks, threads = _geometry(raw.shape[0], THREADS)
    _transcode_kernel[blocks, threads, stream](_to_device(raw, stream), encoding, out,
                                               out_encoding)


@cache
def _line_gram_kernel(encoding: int, base_encoding: int, subtract_base: bool, by_row: bool,
                      n_experts: int):
    n_pairs = n_experts * (n_experts + 1) // 2
    add_products = _pair_products(encoding, base_encoding, subtract_base, n_experts)

    @cuda.jit
    def gram(stack, base, row_length, out):
        line = cuda.grid(1)
        if line >= out.shape[0]:
            return
        count = row_length if by_row else stack.shape[1] // row_length
        values = cuda.local.array(n_experts, np.float64)
        sums = cuda.local.array(n_pairs, np.float64)
        for pair in range(n_pairs):
            sums[pair] = 0.0
        for step in range(count):
            add_products(stack, base, line * row_length + step if by_row
                         else step * row_length + line, values, sums)
        pair = 0
        for i in range(n_experts):
            for k in range(i, n_experts):
                # by_row overwrites: the CPU adds to zeros, and 0.0 + s == s because a
                # sum that starts at +0.0 is never -0.0.
                total = sums[pair] if by_row else out[line, i, k] + sums[pair]
                out[line, i, k] = total
                out[line, k, i] = total
                pair += 1

    return gram


def line_gram(stack: Array, encoding: int, base: Array, base_encoding: int,
              subtract_base: bool, row_length: int, by_row: bool, out: Array,
              stream: Stream = 0) -> None:
    """Gram matrices per row (out: rows of the chunk x N x N, overwritten) or per column
    (out: row_length x N x N, accumulated in row order across chunks) of a row-aligned chunk."""
    if out.shape[0] == 0:
        return
    stack = _to_device(stack, stream)
    base = _to_device(base, stream) if subtract_base else stack[0]
    kernel = _line_gram_kernel(encoding, base_encoding, subtract_base, by_row, stack.shape[0])
    blocks, threads = _geometry(out.shape[0], GRAM_THREADS, strided=False)
    kernel[blocks, threads, stream](stack, base, row_length, out)


@cache
def _line_sum_kernel(encoding: int, base_encoding: int, around_base: bool, by_row: bool,
                     out_encoding: int):
    @cuda.jit
    def weighted(stack, coefficients, base, base_coefficient, row_length, first_row, out):
        whole_rows = out.shape[0] // row_length * row_length
        for j in range(cuda.grid(1), whole_rows, cuda.gridsize(1)):
            line = first_row + j // row_length if by_row else j % row_length
            b = decode64(base[j], base_encoding) if around_base else 0.0
            total = 0.0
            for i in range(stack.shape[0]):
                value = decode64(stack[i, j], encoding)
                if around_base:
                    value -= b
                total += mul_rn(coefficients[line, i], value)
            # Added even without a base, as the CPU does (then a no-op: a sum that starts
            # at +0.0 is never -0.0, so adding 0.0 changes nothing finite).
            out[j] = encode(total + mul_rn(base_coefficient, b), out_encoding)

    return weighted


def line_weighted_sum(stack: Array, encoding: int, coefficients: Array, base: Array,
                      base_encoding: int, base_coefficient: float, around_base: bool,
                      row_length: int, by_row: bool, first_row: int, out: Array,
                      out_encoding: int, stream: Stream = 0) -> None:
    """weighted_sum with coefficients per row (indexed from first_row) or per column."""
    if out.shape[0] == 0:
        return
    stack = _to_device(stack, stream)
    base = _to_device(base, stream) if around_base else stack[0]
    coefficients = _to_device(coefficients, stream, np.float64)
    kernel = _line_sum_kernel(encoding, base_encoding, around_base, by_row, out_encoding)
    blocks, threads = _geometry(out.shape[0], THREADS)
    kernel[blocks, threads, stream](stack, coefficients, base, float(base_coefficient),
                                    row_length, first_row, out)
