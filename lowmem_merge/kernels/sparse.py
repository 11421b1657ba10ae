"""Kernels of the sparsifying task-vector merges (TIES, DARE, breadcrumbs, DELLA).

Selection by magnitude is exact out of core: the key of an element is the
float32 bit pattern of |delta|, monotone in the magnitude, and a two-pass
radix select (65,536-bin histograms of the high, then the low 16 bits) finds
the key of the K-th largest. Elements are ranked by (key descending, index
ascending), so ties at the threshold are taken in index order; a per-block
count of ties lets every block know its first tie's rank.

Random drops draw from a counter-based generator (splitmix64 of a per
tensor-and-expert seed and the element's global index): the same mask
whatever the chunking, the thread count or the device. cuda/sparse.py compiles
``magnitude_key`` and ``uniform`` from this source (see shared_code.py).

Kernels are specialised per encoding and rule by factories that capture only
integers, so Numba can cache them on disk.
"""

from functools import cache

import numpy as np
from numba import njit, prange

from .arrays import REDUCTION_BLOCK
from .primitives import bits_from_f32, wrap_add64, wrap_mul64
from .scalars import decode, encode
from .shared_code import shared

KEEP_BY_THRESHOLD = 0
KEEP_AT_RANDOM = 1
KEEP_BY_ROW_RANK = 2
BINS = 65536
# Elements decoded at a time inside a block: small scratch that stays in cache.
SUB_BLOCK = 1024
# Threshold meaning "every element is in the top K" (keys are never negative).
ALL = -1
# Threshold meaning "no element is": larger than any 32-bit key.
NONE = 1 << 32


@shared
def magnitude_key(delta):
    """float32 bits of |delta|: monotone in the magnitude."""
    return np.int64(bits_from_f32(np.float32(abs(delta))))


@shared
def uniform(seed, index):
    """splitmix64 of (seed, index) as a float in [0, 1) with 53 random bits."""
    z = wrap_add64(seed, wrap_mul64(np.uint64(index), np.uint64(0x9E3779B97F4A7C15)))
    z = wrap_mul64(z ^ (z >> np.uint64(30)), np.uint64(0xBF58476D1CE4E5B9))
    z = wrap_mul64(z ^ (z >> np.uint64(27)), np.uint64(0x94D049BB133111EB))
    z = z ^ (z >> np.uint64(31))
    return np.float64(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(inline="always", cache=True)
def delta_at(row, base, j, encoding, base_encoding):
    """An expert's delta from the base at element j, exact in float64.

    Kernels take row = rows[i] outside their inner loops: indexing the tuple
    of rows inside a loop defeats vectorisation (about 10x slower)."""
    return (np.float64(decode(row[j], encoding))
            - np.float64(decode(base[j], base_encoding)))


@cache
def _selection_kernels(encoding: int, base_encoding: int):
    @njit(parallel=True, nogil=True, cache=True)
    def histogram_high(rows, base, parts):
        """parts[p, i, bin] += keys of expert i in part p whose high 16 bits are bin."""
        n = base.shape[0]
        n_parts, n_experts = parts.shape[0], len(rows)
        for part in prange(n_parts):
            lo, hi = n * part // n_parts, n * (part + 1) // n_parts
            for i in range(n_experts):
                row, bins = rows[i], parts[part, i]  # hoisted: tuple indexing is slow
                for j in range(lo, hi):
                    key = magnitude_key(delta_at(row, base, j, encoding, base_encoding))
                    bins[key >> 16] += 1

    @njit(parallel=True, nogil=True, cache=True)
    def histogram_low(rows, base, buckets, parts):
        """parts[p, i, q, bin] += keys in high bucket buckets[i, q] with low 16 bits bin."""
        n = base.shape[0]
        n_parts, n_experts = parts.shape[0], len(rows)
        for part in prange(n_parts):
            lo, hi = n * part // n_parts, n * (part + 1) // n_parts
            for i in range(n_experts):
                row, first, second = rows[i], buckets[i, 0], buckets[i, 1]
                for j in range(lo, hi):
                    key = magnitude_key(delta_at(row, base, j, encoding, base_encoding))
                    high = key >> 16
                    if high == first:
                        parts[part, i, 0, key & 0xFFFF] += 1
                    if high == second:
                        parts[part, i, 1, key & 0xFFFF] += 1

    @njit(parallel=True, nogil=True, cache=True)
    def tie_counts(rows, base, thresholds, counts):
        """counts[block, i, q] = elements of the block whose key equals thresholds[i, q]."""
        n = base.shape[0]
        n_experts = len(rows)
        for block in prange(counts.shape[0]):
            lo, hi = block * REDUCTION_BLOCK, min(n, (block + 1) * REDUCTION_BLOCK)
            for i in range(n_experts):
                row, low, high = rows[i], thresholds[i, 0], thresholds[i, 1]
                at_low = 0
                at_high = 0
                for j in range(lo, hi):
                    key = magnitude_key(delta_at(row, base, j, encoding, base_encoding))
                    at_low += key == low
                    at_high += key == high
                counts[block, i, 0] = at_low
                counts[block, i, 1] = at_high

    return histogram_high, histogram_low, tie_counts


def magnitude_histogram(stack, encoding, base, base_encoding, buckets, parts) -> None:
    """High-bit histogram (buckets None, parts (P, N, BINS)) or low-bit histogram."""
    kernels = _selection_kernels(encoding, base_encoding)
    if buckets is None:
        kernels[0](tuple(stack), base, parts)
    else:
        kernels[1](tuple(stack), base, buckets, parts)


def threshold_ties(stack, encoding, base, base_encoding, thresholds, counts) -> None:
    _selection_kernels(encoding, base_encoding)[2](tuple(stack), base, thresholds, counts)


@njit(inline="always", cache=True)
def row_rank_keep(rows, base, lo, width, start, selection, encoding, base_encoding, keep,
                  deltas):
    """DELLA: keep probability rises linearly with the magnitude's rank in the row."""
    _, _, _, seeds, densities, epsilons = selection
    for i in range(len(rows)):
        row = rows[i]
        for j in range(width):
            deltas[i, j] = delta_at(row, base, lo + j, encoding, base_encoding)
        order = np.argsort(np.abs(deltas[i, :width]), kind="mergesort")
        span = max(width - 1, 1)
        for rank in range(width):
            j = order[rank]
            chance = densities[i] - epsilons[i] + 2.0 * epsilons[i] * rank / span
            keep[i, j] = uniform(seeds[i], start + lo + j) < chance


@njit(inline="always", cache=True)
def kept_deltas(rows, base, lo, width, start, selection, keep_kind, encoding, base_encoding,
                kept, seen):
    """kept[i, j]: expert i's delta at element lo + j if the rule keeps it, else 0.

    seen[i] counts the ties at expert i's two thresholds met so far in this block."""
    if keep_kind == KEEP_BY_ROW_RANK:
        keep = np.empty(kept.shape, np.bool_)
        row_rank_keep(rows, base, lo, width, start, selection, encoding, base_encoding, keep,
                      kept)
        for i in range(len(rows)):
            for j in range(width):
                if not keep[i, j]:
                    kept[i, j] = 0.0
        return
    if keep_kind == KEEP_AT_RANDOM:
        _, _, _, seeds, densities, _ = selection
        for i in range(len(rows)):
            row, out, seed, density = rows[i], kept[i], seeds[i], densities[i]
            for j in range(width):
                delta = delta_at(row, base, lo + j, encoding, base_encoding)
                out[j] = delta if uniform(seed, start + lo + j) < density else 0.0
        return
    thresholds, quotas, _, _, _, _ = selection
    for i in range(len(rows)):
        # Row views hoisted out of the loop: indexing the tuple inside it is slow.
        row, out, low, high = rows[i], kept[i], thresholds[i, 0], thresholds[i, 1]
        ties = 0
        # Fast, branch-free pass: ranked in [K_low, K_high) unless the key is a tie.
        for j in range(width):
            delta = delta_at(row, base, lo + j, encoding, base_encoding)
            key = magnitude_key(delta)
            out[j] = delta if (key > high) & (key < low) else 0.0
            ties += (key == high) | (key == low)
        if ties:
            # Ties at a threshold are ranked in index order from the block's first rank.
            for j in range(width):
                delta = delta_at(row, base, lo + j, encoding, base_encoding)
                key = magnitude_key(delta)
                if key != low and key != high:
                    continue
                in_high = key > high or (key == high and seen[i, 1] < quotas[i, 1])
                in_low = key > low or (key == low and seen[i, 0] < quotas[i, 0])
                seen[i, 1] += key == high
                seen[i, 0] += key == low
                kept[i, j] = delta if in_high and not in_low else 0.0


@cache
def _l1_kernel(encoding: int, base_encoding: int, keep_kind: int):
    @njit(parallel=True, nogil=True, cache=True)
    def l1_sums(rows, base, start, block, selection, partials):
        """partials[b, i] = (sum |delta_i|, sum |delta_i| over kept elements) per block."""
        n = base.shape[0]
        n_experts = len(rows)
        for b in prange(partials.shape[0]):
            lo = b * block
            hi = min(n, lo + block)
            step = hi - lo if keep_kind == KEEP_BY_ROW_RANK else SUB_BLOCK
            kept = np.empty((n_experts, step))
            seen = selection[2][lo // REDUCTION_BLOCK].copy()
            totals = np.zeros((n_experts, 2))
            for sub in range(lo, hi, step):
                width = min(hi, sub + step) - sub
                kept_deltas(rows, base, sub, width, start, selection, keep_kind, encoding,
                            base_encoding, kept, seen)
                for i in range(n_experts):
                    row = rows[i]
                    for j in range(width):
                        totals[i, 0] += abs(delta_at(row, base, sub + j, encoding,
                                                     base_encoding))
                        totals[i, 1] += abs(kept[i, j])
            partials[b] = totals
    return l1_sums


@cache
def _merge_kernel(encoding: int, base_encoding: int, keep_kind: int, consensus: bool,
                  out_encoding: int):
    @njit(parallel=True, nogil=True, cache=True)
    def apply(rows, base, start, block, selection, weights, scales, normalize, scale_out, out):
        n = base.shape[0]
        n_experts = len(rows)
        weight_sum = weights.sum()
        if abs(weight_sum) < 1e-8:
            weight_sum = 1.0
        factors = weights * scales
        for b in prange((n + block - 1) // block):
            lo = b * block
            hi = min(n, lo + block)
            step = hi - lo if keep_kind == KEEP_BY_ROW_RANK else SUB_BLOCK
            kept = np.empty((n_experts, step))
            votes, mixed, divisor = np.empty(step), np.empty(step), np.empty(step)
            seen = selection[2][lo // REDUCTION_BLOCK].copy()
            for sub in range(lo, hi, step):
                width = min(hi, sub + step) - sub
                kept_deltas(rows, base, sub, width, start, selection, keep_kind, encoding,
                            base_encoding, kept, seen)
                # Expert by expert over the block's elements: vectorisable loops.
                votes[:width] = 0.0
                for i in range(n_experts):
                    factor = factors[i]
                    for j in range(width):
                        votes[j] += factor * kept[i, j]
                if consensus:
                    # TIES sign election: only values with the sign of the sum count.
                    mixed[:width] = 0.0
                    divisor[:width] = 0.0
                    for j in range(width):
                        votes[j] = 1.0 if votes[j] >= 0.0 else -1.0  # the elected sign
                    for i in range(n_experts):
                        factor, weight = factors[i], weights[i]
                        for j in range(width):
                            weighted = factor * kept[i, j]
                            agrees = weighted * votes[j] > 0.0
                            mixed[j] += weighted if agrees else 0.0
                            divisor[j] += weight if agrees else 0.0
                    for j in range(width):
                        if divisor[j] == 0.0:
                            divisor[j] = 1.0
                else:
                    mixed[:width] = votes[:width]
                    divisor[:width] = weight_sum
                for j in range(width):
                    merged = mixed[j] / divisor[j] if normalize else mixed[j]
                    value = np.float64(decode(base[sub + j], base_encoding)) + scale_out * merged
                    out[sub + j] = encode(value, out_encoding)
    return apply


def task_vector_l1(stack, encoding, base, base_encoding, keep_kind, start, block, selection,
                   partials) -> None:
    """Per block: the L1 norm of each task vector, all of it and its kept part."""
    kernel = _l1_kernel(encoding, base_encoding, keep_kind)
    kernel(tuple(stack), base, start, block, selection, partials)


def task_vector_merge(stack, encoding, base, base_encoding, keep_kind, consensus, start, block,
                      selection, weights, scales, normalize, scale_out, out,
                      out_encoding) -> None:
    """out = base + scale_out * (sum of kept, rescaled, weighted deltas [/ divisor])."""
    kernel = _merge_kernel(encoding, base_encoding, keep_kind, consensus, out_encoding)
    kernel(tuple(stack), base, start, block, selection, weights, scales, normalize, scale_out,
           out)
