"""Kernels of the sparsifying task-vector merges (TIES, DARE, breadcrumbs, DELLA).

Selection by magnitude is exact out of core: the key of an element is the
float32 bit pattern of |delta|, monotone in the magnitude, and a two-pass
radix select (65,536-bin histograms of the high, then the low 16 bits) finds
the key of the K-th largest. Elements are ranked by (key descending, index
ascending), so ties at the threshold are taken in index order; a per-block
count of ties lets every block know its first tie's rank.

Random drops draw from a counter-based generator (splitmix64 of a per
tensor-and-expert seed and the element's global index): the same mask
whatever the chunking, the thread count or the device.
"""

from functools import cache

import numpy as np
from numba import njit, prange

from .arrays import REDUCTION_BLOCK
from .scalars import bits_from_f32, decode, encode

KEEP_BY_THRESHOLD = 0
KEEP_AT_RANDOM = 1
KEEP_BY_ROW_RANK = 2
BINS = 65536
# Threshold meaning "every element is in the top K" (keys are never negative).
ALL = -1
# Threshold meaning "no element is": larger than any 32-bit key.
NONE = 1 << 32


@njit(inline="always", cache=True)
def magnitude_key(delta):
    return np.int64(bits_from_f32(np.float32(abs(delta))))


@njit(inline="always", cache=True)
def uniform(seed, index):
    """splitmix64 of (seed, index) as a float in [0, 1) with 53 random bits."""
    z = seed + np.uint64(index) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.float64(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@cache
def _selection_kernels(encoding: int, base_encoding: int):
    @njit(inline="always")
    def delta(rows, i, base, j):
        return (np.float64(decode(rows[i][j], encoding))
                - np.float64(decode(base[j], base_encoding)))

    @njit(parallel=True, nogil=True, cache=True)
    def histogram(rows, base, buckets, parts):
        """parts[p, i, q, bin] += count of keys in part p; with buckets[i, q] < 0 the bin
        is the key's high 16 bits, else the low 16 bits of keys in that high bucket."""
        n = base.shape[0]
        n_parts, n_experts, n_queries = parts.shape[0], len(rows), buckets.shape[1]
        for part in prange(n_parts):
            for j in range(n * part // n_parts, n * (part + 1) // n_parts):
                for i in range(n_experts):
                    key = magnitude_key(delta(rows, i, base, j))
                    for q in range(n_queries):
                        bucket = buckets[i, q]
                        if bucket < 0:
                            parts[part, i, q, key >> 16] += 1
                        elif key >> 16 == bucket:
                            parts[part, i, q, key & 0xFFFF] += 1

    @njit(parallel=True, nogil=True, cache=True)
    def tie_counts(rows, base, thresholds, counts):
        """counts[block, i, q] = elements of the block whose key equals thresholds[i, q]."""
        n = base.shape[0]
        n_experts, n_queries = len(rows), thresholds.shape[1]
        for block in prange(counts.shape[0]):
            for j in range(block * REDUCTION_BLOCK, min(n, (block + 1) * REDUCTION_BLOCK)):
                for i in range(n_experts):
                    key = magnitude_key(delta(rows, i, base, j))
                    for q in range(n_queries):
                        if key == thresholds[i, q]:
                            counts[block, i, q] += 1

    return histogram, tie_counts


def magnitude_histogram(stack, encoding, base, base_encoding, buckets, parts) -> None:
    _selection_kernels(encoding, base_encoding)[0](tuple(stack), base, buckets, parts)


def threshold_ties(stack, encoding, base, base_encoding, thresholds, counts) -> None:
    _selection_kernels(encoding, base_encoding)[1](tuple(stack), base, thresholds, counts)


@cache
def _keep_mask(encoding: int, base_encoding: int, keep_kind: int):
    @njit(inline="always")
    def keep_mask(rows, base, lo, width, start, selection, keep, deltas):
        """Fill deltas[i, :width] and keep[i, :width] for elements [lo, lo + width)."""
        thresholds, quotas, tie_start, seeds, densities, epsilons = selection
        n_experts = len(rows)
        for i in range(n_experts):
            for j in range(width):
                deltas[i, j] = (np.float64(decode(rows[i][lo + j], encoding))
                                - np.float64(decode(base[lo + j], base_encoding)))
        if keep_kind == KEEP_BY_THRESHOLD:
            block = lo // REDUCTION_BLOCK
            for i in range(n_experts):
                seen_low = tie_start[block, i, 0]
                seen_high = tie_start[block, i, 1]
                for j in range(width):
                    key = magnitude_key(deltas[i, j])
                    in_low = key > thresholds[i, 0]
                    if key == thresholds[i, 0]:
                        in_low = seen_low < quotas[i, 0]
                        seen_low += 1
                    in_high = key > thresholds[i, 1]
                    if key == thresholds[i, 1]:
                        in_high = seen_high < quotas[i, 1]
                        seen_high += 1
                    keep[i, j] = in_high and not in_low
        elif keep_kind == KEEP_AT_RANDOM:
            for i in range(n_experts):
                for j in range(width):
                    keep[i, j] = uniform(seeds[i], start + lo + j) < densities[i]
        else:
            # DELLA: keep probability rises linearly with the magnitude's rank in the row.
            for i in range(n_experts):
                order = np.argsort(np.abs(deltas[i, :width]), kind="mergesort")
                span = max(width - 1, 1)
                for rank in range(width):
                    j = order[rank]
                    chance = densities[i] - epsilons[i] + 2.0 * epsilons[i] * rank / span
                    keep[i, j] = uniform(seeds[i], start + lo + j) < chance

    return keep_mask


@cache
def _l1_kernel(encoding: int, base_encoding: int, keep_kind: int):
    keep_mask = _keep_mask(encoding, base_encoding, keep_kind)

    @njit(parallel=True, nogil=True, cache=True)
    def l1_sums(rows, base, start, block, selection, partials):
        """partials[b, i] = (sum |delta_i|, sum |delta_i| over kept elements) per block."""
        n = base.shape[0]
        n_experts = len(rows)
        for b in prange(partials.shape[0]):
            lo = b * block
            width = min(n, lo + block) - lo
            deltas = np.empty((n_experts, width))
            keep = np.empty((n_experts, width), np.bool_)
            keep_mask(rows, base, lo, width, start, selection, keep, deltas)
            for i in range(n_experts):
                total = 0.0
                kept = 0.0
                for j in range(width):
                    magnitude = abs(deltas[i, j])
                    total += magnitude
                    if keep[i, j]:
                        kept += magnitude
                partials[b, i, 0] = total
                partials[b, i, 1] = kept

    return l1_sums


@cache
def _merge_kernel(encoding: int, base_encoding: int, keep_kind: int, consensus: bool,
                  out_encoding: int):
    keep_mask = _keep_mask(encoding, base_encoding, keep_kind)

    @njit(parallel=True, nogil=True, cache=True)
    def apply(rows, base, start, block, selection, weights, scales, normalize, scale_out, out):
        n = base.shape[0]
        n_experts = len(rows)
        weight_sum = 0.0
        for i in range(n_experts):
            weight_sum += weights[i]
        if abs(weight_sum) < 1e-8:
            weight_sum = 1.0
        for b in prange((n + block - 1) // block):
            lo = b * block
            width = min(n, lo + block) - lo
            deltas = np.empty((n_experts, width))
            keep = np.empty((n_experts, width), np.bool_)
            keep_mask(rows, base, lo, width, start, selection, keep, deltas)
            for j in range(width):
                mixed = 0.0
                divisor = weight_sum
                if consensus:
                    # TIES sign election on the weighted, sparsified deltas.
                    votes = 0.0
                    for i in range(n_experts):
                        if keep[i, j]:
                            votes += weights[i] * scales[i] * deltas[i, j]
                    divisor = 0.0
                    for i in range(n_experts):
                        if keep[i, j]:
                            weighted = weights[i] * scales[i] * deltas[i, j]
                            if (weighted > 0.0 and votes >= 0.0) or (weighted < 0.0
                                                                    and votes < 0.0):
                                mixed += weighted
                                divisor += weights[i]
                    if divisor == 0.0:
                        divisor = 1.0
                else:
                    for i in range(n_experts):
                        if keep[i, j]:
                            mixed += weights[i] * scales[i] * deltas[i, j]
                if normalize:
                    mixed /= divisor
                value = np.float64(decode(base[lo + j], base_encoding)) + scale_out * mixed
                out[lo + j] = encode(value, out_encoding)

    return apply


def task_vector_l1(stack, encoding, base, base_encoding, keep_kind, start, block, selection,
                   partials) -> None:
    _l1_kernel(encoding, base_encoding, keep_kind)(tuple(stack), base, start, block, selection,
                                                   partials)


def task_vector_merge(stack, encoding, base, base_encoding, keep_kind, consensus, start, block,
                      selection, weights, scales, normalize, scale_out, out,
                      out_encoding) -> None:
    """out = base + scale_out * (sum of kept, rescaled, weighted deltas [/ divisor])."""
    kernel = _merge_kernel(encoding, base_encoding, keep_kind, consensus, out_encoding)
    kernel(tuple(stack), base, start, block, selection, weights, scales, normalize, scale_out,
           out)
