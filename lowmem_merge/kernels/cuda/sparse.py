"""CUDA kernels of the sparsifying task-vector merges, bit-identical to kernels/sparse.py.

The launchers take the CPU launchers' arguments in the same order, with ``stack`` a 2-D
array (experts x elements) and a keyword ``stream``; arrays may be device or host arrays.

What makes each result equal to the CPU's:

* histograms and tie counts are integer sums (atomics in any order give the same totals);
  the high and low histograms are all added into ``parts[0]``, so the sum over parts that
  the caller takes is the CPU's;
* the keep rules see the same keys, the same ``uniform(seed, index)`` at the same global
  index and, for ties at a threshold, the same rank in index order: a block of threads
  walks its merge block tile by tile, in order, and ranks a tile's ties with a prefix sum;
* DELLA's rank in a row is the position in a stable sort of |delta| (NaN last), counted
  element by element against the row;
* per element, the float64 operations of the merge are the CPU's in the same order (each
  product rounded on its own, never fused: see primitives.mul_rn), and the L1 sums of a block
  are added by one thread in index order, as the CPU does.

NaN payloads are not carried through arithmetic: a device's float operations give canonical
NaNs where x86 keeps payloads, so a NaN delta may get another magnitude key (still above
every finite key, so the ranks of finite deltas do not change) and a NaN output other NaN
bits. Everything else is exact.
"""

from typing import Any

import numpy as np
from numba import cuda

from .. import sparse
from ..arrays import REDUCTION_BLOCK
from ..shared_code import retarget
from ..sparse import KEEP_AT_RANDOM, KEEP_BY_ROW_RANK
from .primitives import DEVICE_PRIMITIVES, SIMULATED, device_function, mul_rn
from .scalars import decode, encode
from .scalars import twins as scalar_twins

# Threads per block. The simulator runs each thread as a Python thread: fewer keep it quick.
THREADS = 32 if SIMULATED else 128
# Experts a merge or L1 launch can take: per-thread scratch (kept deltas, tie counters).
MAX_EXPERTS = 64
_MAX_GRID = 1 << 16  # blocks of an element-wise launch, which then strides over the rest
_LOW32 = np.int64(0xFFFFFFFF)
Array = Any  # a numba device array, or a host numpy array (copied in and out per launch)


# ---------------------------------------------------------------- element helpers


# The key and the random draw are kernels/sparse.py's own code: masks cannot drift apart.
_rules = retarget(sparse, DEVICE_PRIMITIVES, device_function, f"{__name__}.rules",
                  links=(scalar_twins,))
magnitude_key = _rules.magnitude_key
uniform = _rules.uniform


@device_function
def delta_at(stack, i, base, j, encoding, base_encoding):
    """Expert i's delta from the base at element j, exact in float64."""
    return (np.float64(decode(stack[i, j], encoding))
            - np.float64(decode(base[j], base_encoding)))


# ---------------------------------------------------------------- selection passes


@cuda.jit
def _histogram_high(stack, encoding, base, base_encoding, parts):
    """parts[0, i, bin] += keys of expert i whose high 16 bits are bin."""
    for j in range(cuda.grid(1), base.shape[0], cuda.gridsize(1)):
        for i in range(stack.shape[0]):
            key = magnitude_key(delta_at(stack, i, base, j, encoding, base_encoding))
            cuda.atomic.add(parts, (0, i, key >> 16), 1)


@cuda.jit
def _histogram_low(stack, encoding, base, base_encoding, buckets, parts):
    """parts[0, i, q, bin] += keys in high bucket buckets[i, q] whose low 16 bits are bin."""
    for j in range(cuda.grid(1), base.shape[0], cuda.gridsize(1)):
        for i in range(stack.shape[0]):
            key = magnitude_key(delta_at(stack, i, base, j, encoding, base_encoding))
            high = key >> 16
            if high == buckets[i, 0]:
                cuda.atomic.add(parts, (0, i, 0, key & 0xFFFF), 1)
            if high == buckets[i, 1]:
                cuda.atomic.add(parts, (0, i, 1, key & 0xFFFF), 1)


@cuda.jit
def _tie_counts(stack, encoding, base, base_encoding, thresholds, counts):
    """counts[block, i, q] = elements of the reduction block whose key is thresholds[i, q]."""
    totals = cuda.shared.array(2, np.int64)
    block = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    lo = block * REDUCTION_BLOCK
    hi = min(base.shape[0], lo + REDUCTION_BLOCK)
    for i in range(stack.shape[0]):
        if tid == 0:
            totals[0] = 0
            totals[1] = 0
        cuda.syncthreads()
        low = thresholds[i, 0]
        high = thresholds[i, 1]
        at_low = 0
        at_high = 0
        for j in range(lo + tid, hi, cuda.blockDim.x):
            key = magnitude_key(delta_at(stack, i, base, j, encoding, base_encoding))
            if key == low:
                at_low += 1
            if key == high:
                at_high += 1
        # One atomic per thread and threshold: ties are few, and counts are exact anyway.
        if at_low:
            cuda.atomic.add(totals, 0, at_low)
        if at_high:
            cuda.atomic.add(totals, 1, at_high)
        cuda.syncthreads()
        if tid == 0:
            counts[block, i, 0] = totals[0]
            counts[block, i, 1] = totals[1]
        cuda.syncthreads()  # totals are reset for the next expert


def _element_grid(n: int) -> int:
    return max(1, min(_MAX_GRID, -(-n // THREADS)))


def magnitude_histogram(stack: Array, encoding: int, base: Array, base_encoding: int,
                        buckets: Array | None, parts: Array, *, stream: Any = 0) -> None:
    """High-bit histogram (buckets None, parts (P, N, BINS)) or low-bit histogram
    (parts (P, N, 2, BINS)): counts are added into parts[0], which the caller sums over P."""
    n = base.shape[0]
    if n == 0:
        return
    if buckets is None:
        _histogram_high[_element_grid(n), THREADS, stream](stack, encoding, base,
                                                          base_encoding, parts)
    else:
        _histogram_low[_element_grid(n), THREADS, stream](stack, encoding, base,
                                                         base_encoding, buckets, parts)


def threshold_ties(stack: Array, encoding: int, base: Array, base_encoding: int,
                   thresholds: Array, counts: Array, *, stream: Any = 0) -> None:
    """counts[block, i, q] = keys equal to thresholds[i, q] in each REDUCTION_BLOCK."""
    if counts.shape[0] == 0:
        return
    _tie_counts[counts.shape[0], THREADS, stream](stack, encoding, base, base_encoding,
                                                  thresholds, counts)


# ---------------------------------------------------------------- keep rules, per tile


@device_function
def _tie_ranks(flags, scan):
    """Exclusive prefix sum of this tile's packed tie flags, and the tile's total.

    flags = (key == low) + ((key == high) << 32). Every thread of the block must call it."""
    if not cuda.syncthreads_or(np.int32(flags != 0)):
        return np.int64(0), np.int64(0)  # the usual case: no tie in this tile
    tid = cuda.threadIdx.x
    scan[tid] = flags
    cuda.syncthreads()
    offset = 1
    while offset < cuda.blockDim.x:  # Hillis-Steele inclusive scan
        other = scan[tid - offset] if tid >= offset else np.int64(0)
        cuda.syncthreads()
        scan[tid] += other
        cuda.syncthreads()
        offset *= 2
    before = scan[tid] - flags
    total = scan[cuda.blockDim.x - 1]
    cuda.syncthreads()  # scan is reused by the next call
    return before, total


@device_function
def _threshold_kept(delta, i, active, thresholds, quotas, seen, scan):
    """sparse.kept_deltas' threshold rule: ties at a threshold ranked in index order.

    seen[i, q] counts the ties met before this tile in the merge block; updated here."""
    key = magnitude_key(delta)
    low = thresholds[i, 0]
    high = thresholds[i, 1]
    flags = np.int64(0)
    if active:
        flags = np.int64(key == low) + (np.int64(key == high) << 32)
    before, total = _tie_ranks(flags, scan)
    seen_low = seen[i, 0] + (before & _LOW32)
    seen_high = seen[i, 1] + (before >> 32)
    seen[i, 0] += total & _LOW32
    seen[i, 1] += total >> 32
    in_high = key > high or (key == high and seen_high < quotas[i, 1])
    in_low = key > low or (key == low and seen_low < quotas[i, 0])
    return delta if in_high and not in_low else 0.0


@device_function
def _sorts_before(a, b):
    """numpy's float order for sorting: NaN after everything (numba's lt_floats)."""
    return a < b or (b != b and a == a)


@device_function
def _row_rank(stack, i, base, j, lo, hi, active, magnitude, encoding, base_encoding, other):
    """Position of element j in a stable ascending sort of |delta_i| over [lo, hi).

    Counts smaller magnitudes and equal ones at lower indices, a tile of the row at a time
    through shared memory. Every thread of the block must call it."""
    tid = cuda.threadIdx.x
    rank = 0
    for tile in range(lo, hi, cuda.blockDim.x):
        if tile + tid < hi:
            other[tid] = abs(delta_at(stack, i, base, tile + tid, encoding, base_encoding))
        cuda.syncthreads()
        if active:
            for m in range(min(cuda.blockDim.x, hi - tile)):
                value = other[m]
                if _sorts_before(value, magnitude) or (
                        tile + m < j and not _sorts_before(magnitude, value)):
                    rank += 1
        cuda.syncthreads()
    return rank


@device_function
def _rank_kept(delta, stack, i, base, j, lo, hi, active, start, seeds, densities, epsilons,
               encoding, base_encoding, other):
    """DELLA: keep with a probability rising linearly with the magnitude's rank in the row."""
    rank = _row_rank(stack, i, base, j, lo, hi, active, abs(delta), encoding, base_encoding,
                     other)
    span = max(hi - lo - 1, 1)
    # The CPU's order: (d - e) + ((2 e) rank) / span.
    spread = mul_rn(mul_rn(2.0, epsilons[i]), np.float64(rank)) / np.float64(span)
    chance = densities[i] - epsilons[i] + spread
    return delta if uniform(seeds[i], start + j) < chance else 0.0


@device_function
def _kept_delta(delta, stack, i, base, j, lo, hi, active, start, keep_kind, encoding,
                base_encoding, thresholds, quotas, seen, seeds, densities, epsilons, scan,
                other):
    """Expert i's delta at element j if its keep rule keeps it, else 0.0.

    Called by every thread of the block for the same i (the rules that rank need all)."""
    if keep_kind == KEEP_AT_RANDOM:
        return delta if uniform(seeds[i], start + j) < densities[i] else 0.0
    if keep_kind == KEEP_BY_ROW_RANK:
        return _rank_kept(delta, stack, i, base, j, lo, hi, active, start, seeds, densities,
                          epsilons, encoding, base_encoding, other)
    return _threshold_kept(delta, i, active, thresholds, quotas, seen, scan)


@device_function
def _start_ties(seen, ties, lo, hi, n_experts):
    """The block's first tie ranks, as the CPU's selection[2][lo // REDUCTION_BLOCK].

    An empty block (partials longer than the data) reads nothing: no out-of-bounds load."""
    for i in range(n_experts):
        seen[i, 0] = ties[lo // REDUCTION_BLOCK, i, 0] if lo < hi else 0
        seen[i, 1] = ties[lo // REDUCTION_BLOCK, i, 1] if lo < hi else 0


# ---------------------------------------------------------------- L1 norms


@cuda.jit
def _l1_sums(stack, encoding, base, base_encoding, keep_kind, start, block, thresholds,
             quotas, ties, seeds, densities, epsilons, partials):
    """partials[b, i] = (sum |delta_i|, sum |kept delta_i|) over block b, in index order."""
    scan = cuda.shared.array(THREADS, np.int64)
    other = cuda.shared.array(THREADS, np.float64)
    magnitudes = cuda.shared.array(THREADS, np.float64)
    kept_magnitudes = cuda.shared.array(THREADS, np.float64)
    seen = cuda.local.array((MAX_EXPERTS, 2), np.int64)
    sums = cuda.local.array((MAX_EXPERTS, 2), np.float64)
    b = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    n_experts = stack.shape[0]
    lo = b * block
    hi = min(base.shape[0], lo + block)
    _start_ties(seen, ties, lo, hi, n_experts)
    for i in range(n_experts):
        sums[i, 0] = 0.0
        sums[i, 1] = 0.0
    for tile in range(lo, hi, THREADS):
        j = tile + tid
        active = j < hi
        for i in range(n_experts):
            delta = delta_at(stack, i, base, j, encoding, base_encoding) if active else 0.0
            kept = _kept_delta(delta, stack, i, base, j, lo, hi, active, start, keep_kind,
                               encoding, base_encoding, thresholds, quotas, seen, seeds,
                               densities, epsilons, scan, other)
            magnitudes[tid] = abs(delta)
            kept_magnitudes[tid] = abs(kept)
            cuda.syncthreads()
            if tid == 0:  # one thread adds in index order: the CPU's sums, bit for bit
                for m in range(min(THREADS, hi - tile)):
                    sums[i, 0] += magnitudes[m]
                    sums[i, 1] += kept_magnitudes[m]
            cuda.syncthreads()
    if tid == 0:
        for i in range(n_experts):
            partials[b, i, 0] = sums[i, 0]
            partials[b, i, 1] = sums[i, 1]


def _check_experts(stack: Array) -> None:
    if len(stack.shape) != 2:
        raise ValueError("stack must be a 2-D array (experts x elements)")
    if stack.shape[0] > MAX_EXPERTS:
        raise ValueError(f"the CUDA sparse merge takes at most {MAX_EXPERTS} experts, "
                         f"not {stack.shape[0]}")


def task_vector_l1(stack: Array, encoding: int, base: Array, base_encoding: int,
                   keep_kind: int, start: int, block: int, selection: tuple, partials: Array, *,
                   stream: Any = 0) -> None:
    """Per block: the L1 norm of each task vector, all of it and its kept part."""
    _check_experts(stack)
    if partials.shape[0] == 0:
        return
    thresholds, quotas, ties, seeds, densities, epsilons = selection
    _l1_sums[partials.shape[0], THREADS, stream](
        stack, encoding, base, base_encoding, keep_kind, start, block, thresholds, quotas,
        ties, seeds, densities, epsilons, partials)


# ---------------------------------------------------------------- merge


@device_function
def _weight_sum(weights):
    """weights.sum() as numba computes it (in order), 1.0 if about zero."""
    total = 0.0
    for i in range(weights.shape[0]):
        total += weights[i]
    return 1.0 if abs(total) < 1e-8 else total


@device_function
def _consensus(kept, weights, scales, n_experts, votes):
    """TIES sign election: the weighted kept values, and weights, that agree with the sum."""
    sign = 1.0 if votes >= 0.0 else -1.0
    mixed = 0.0
    divisor = 0.0
    for i in range(n_experts):
        weighted = mul_rn(mul_rn(weights[i], scales[i]), kept[i])
        agrees = mul_rn(weighted, sign) > 0.0
        mixed += weighted if agrees else 0.0
        divisor += weights[i] if agrees else 0.0
    return mixed, 1.0 if divisor == 0.0 else divisor


@cuda.jit
def _merge(stack, encoding, base, base_encoding, keep_kind, consensus, start, block,
           thresholds, quotas, ties, seeds, densities, epsilons, weights, scales, normalize,
           scale_out, out, out_encoding):
    scan = cuda.shared.array(THREADS, np.int64)
    other = cuda.shared.array(THREADS, np.float64)
    seen = cuda.local.array((MAX_EXPERTS, 2), np.int64)
    kept = cuda.local.array(MAX_EXPERTS, np.float64)
    tid = cuda.threadIdx.x
    n_experts = stack.shape[0]
    lo = cuda.blockIdx.x * block
    hi = min(base.shape[0], lo + block)
    weight_sum = _weight_sum(weights)
    _start_ties(seen, ties, lo, hi, n_experts)
    for tile in range(lo, hi, THREADS):
        j = tile + tid
        active = j < hi
        votes = 0.0
        for i in range(n_experts):
            delta = delta_at(stack, i, base, j, encoding, base_encoding) if active else 0.0
            kept[i] = _kept_delta(delta, stack, i, base, j, lo, hi, active, start, keep_kind,
                                  encoding, base_encoding, thresholds, quotas, seen, seeds,
                                  densities, epsilons, scan, other)
            votes += mul_rn(mul_rn(weights[i], scales[i]), kept[i])
        if not active:
            continue
        if consensus:
            mixed, divisor = _consensus(kept, weights, scales, n_experts, votes)
        else:
            mixed, divisor = votes, weight_sum
        merged = mixed / divisor if normalize else mixed
        value = np.float64(decode(base[j], base_encoding)) + mul_rn(scale_out, merged)
        out[j] = encode(value, out_encoding)


def task_vector_merge(stack: Array, encoding: int, base: Array, base_encoding: int,
                      keep_kind: int, consensus: bool, start: int, block: int, selection: tuple,
                      weights: Array, scales: Array, normalize: bool, scale_out: float,
                      out: Array, out_encoding: int, *, stream: Any = 0) -> None:
    """out = base + scale_out * (sum of kept, rescaled, weighted deltas [/ divisor])."""
    _check_experts(stack)
    n = base.shape[0]
    if n == 0:
        return
    thresholds, quotas, ties, seeds, densities, epsilons = selection
    _merge[-(-n // block), THREADS, stream](
        stack, encoding, base, base_encoding, keep_kind, bool(consensus), start, block,
        thresholds, quotas, ties, seeds, densities, epsilons, weights, scales,
        bool(normalize), float(scale_out), out, out_encoding)
