"""The generalized task-arithmetic core shared by TIES, DARE, breadcrumbs and DELLA.

Per expert: delta = expert - base, sparsified (by magnitude, at random, or by
rank within each row), optionally rescaled to keep its L1 norm, weighted; then
optionally a TIES sign election; summed, optionally normalised by the weights
that voted, scaled by lambda and added to the base. Parameters and defaults
follow mergekit's generalized task arithmetic.
"""

from __future__ import annotations

import hashlib

import numba
import numpy as np

from .. import kernels
from ..errors import MergeError
from ..kernels import sparse
from .base import Chunk, MergeMethod, OutChunk, Param, TensorContext, TensorMerge
from .common import WEIGHT

DENSITY = Param("density", float, 1.0, "fraction of each task vector's elements to keep")
GAMMA = Param("gamma", float, 0.01, "fraction of the largest-magnitude elements to drop")
EPSILON = Param("epsilon", float, 0.15,
                "DELLA: keep probabilities spread over density +/- epsilon by magnitude rank")
SEED = Param("seed", int, 0, "seed of the random drop mask (same mask whatever the chunking)")
MAX_PARTS = 4  # per-thread histograms in one pass


def common_params(normalize: bool, rescale: bool) -> tuple[Param, ...]:
    return (
        Param("lambda", float, 1.0, "scale of the merged task vector"),
        Param("normalize", bool, normalize, "divide by the sum of the weights that contributed"),
        Param("rescale", bool, rescale, "rescale each sparsified task vector to its L1 norm"),
        Param("int8_mask", bool, False, "accepted for mergekit configs; masks are bits here"),
    )


def expert_seed(seed: int, tensor: str, expert: int) -> np.uint64:
    digest = hashlib.blake2b(f"{seed}\0{tensor}\0{expert}".encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def locate(histogram: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest key (1-based) and the count in higher bins."""
    from_top = np.cumsum(histogram[::-1])
    rank = int(np.searchsorted(from_top, k))
    bin_index = len(histogram) - 1 - rank
    return bin_index, int(from_top[rank] - histogram[bin_index])


def top_counts(kind: str, numel: int, density: float, gamma: float) -> tuple[int, int]:
    """(K_low, K_high): keep elements ranked in [K_low, K_high) by magnitude, as mergekit."""
    if density >= 1:
        return 0, numel
    if kind == "magnitude":
        return 0, int(density * numel)
    keep = int(density * numel)  # breadcrumbs: drop gamma from the top, the rest from below
    top = int(gamma * numel)
    bottom = numel - keep - top
    if bottom < 0:
        top, bottom = top + bottom, 0
    return top, numel - bottom


class SparseTaskVectors(TensorMerge):
    uses_base = True

    def __init__(self, context: TensorContext, sparsification: str, consensus: bool) -> None:
        self.context = context
        self.kind = sparsification
        self.consensus = consensus
        n = context.n_experts
        params, models = context.params, context.model_params
        self.numel = int(np.prod(context.shape))
        self.weights = np.array([m["weight"] for m in models], np.float64)
        self.scales = np.ones(n)
        self.rescale = bool(params["rescale"]) and self.kind != "none"
        densities = np.array([m.get("density", 1.0) for m in models], np.float64)
        epsilons = np.array([m.get("epsilon", 0.0) for m in models], np.float64)
        seed = int(params.get("seed", 0))
        seeds = np.array([expert_seed(seed, context.name, i) for i in range(n)], np.uint64)
        self.thresholds = np.full((n, 2), sparse.NONE, np.int64)
        self.thresholds[:, 1] = sparse.ALL
        self.quotas = np.zeros((n, 2), np.int64)
        self.k_queries = np.zeros((n, 2), np.int64)
        if self.kind in ("magnitude", "outliers"):
            gammas = [m.get("gamma", 0.0) for m in models]
            for i in range(n):
                self.k_queries[i] = top_counts(self.kind, self.numel, densities[i], gammas[i])
                self._set_threshold(i, 0, self.k_queries[i, 0], None)
                self._set_threshold(i, 1, self.k_queries[i, 1], None)
        if self.kind == "rank":
            densities, epsilons = _della_probabilities(densities, epsilons, context.name)
        self.densities, self.epsilons, self.seeds = densities, epsilons, seeds
        self.block = kernels.REDUCTION_BLOCK
        if self.kind == "rank":
            self.block = context.shape[-1] if len(context.shape) > 1 else max(self.numel, 1)
            self.chunk_unit = self.block
        self.passes = (["high", "low"] if self._needs_select() else []) \
            + (["l1"] if self.rescale else [])
        if self._needs_select():  # the low pass's histograms, at most
            self.working_bytes = MAX_PARTS * n * 2 * sparse.BINS * 8
        self.stat_passes = len(self.passes)
        self._running = None

    # -- selection ------------------------------------------------------------

    def _needs_select(self) -> bool:
        return bool(((self.k_queries > 0) & (self.k_queries < self.numel)).any())

    def _set_threshold(self, i: int, q: int, k: int, found: tuple[int, int] | None) -> None:
        if k <= 0:
            self.thresholds[i, q] = sparse.NONE
        elif k >= self.numel:
            self.thresholds[i, q] = sparse.ALL
        elif found is not None:
            self.thresholds[i, q], self.quotas[i, q] = found

    def observe(self, pass_index: int, chunk: Chunk) -> None:
        kind = self.passes[pass_index]
        n = len(self.weights)
        if chunk.start == 0:  # a pass begins
            parts = min(MAX_PARTS, numba.get_num_threads())
            shape = (parts, n, sparse.BINS) if kind == "high" else (parts, n, 2, sparse.BINS)
            self._parts = np.zeros(shape, np.int64) if kind != "l1" else None
            self._l1 = np.zeros((n, 2))
        if kind == "l1":
            partials = np.zeros((-(-chunk.size // self.block), n, 2))
            kernels.task_vector_l1(chunk.experts, chunk.encoding, chunk.base, chunk.base_encoding,
                                  self._keep_kind(), chunk.start, self.block,
                                  self._selection(chunk), partials)
            for block in partials:  # in order: the sums do not depend on chunking
                self._l1 += block
            return
        buckets = None if kind == "high" else self._buckets
        kernels.magnitude_histogram(chunk.experts, chunk.encoding, chunk.base,
                                   chunk.base_encoding, buckets, self._parts)

    def end_pass(self, pass_index: int) -> None:
        kind = self.passes[pass_index]
        if kind == "high":
            counts = self._parts.sum(axis=0)
            self._buckets = np.full((len(self.weights), 2), -1, np.int64)
            self._above = np.zeros((len(self.weights), 2), np.int64)
            for (i, q), k in np.ndenumerate(self.k_queries):
                if 0 < k < self.numel:
                    self._buckets[i, q], self._above[i, q] = locate(counts[i], k)
        elif kind == "low":
            counts = self._parts.sum(axis=0)
            for (i, q), k in np.ndenumerate(self.k_queries):
                if 0 < k < self.numel:
                    low, above = locate(counts[i, q], k - self._above[i, q])
                    key = (int(self._buckets[i, q]) << 16) | low
                    self._set_threshold(i, q, k, (key, k - self._above[i, q] - above))
            self._parts = None
        else:
            total, kept = self._l1[:, 0], self._l1[:, 1]
            ok = (total >= 1e-7) & (kept >= 1e-7)
            self.scales = np.where(ok, total / np.where(ok, kept, 1.0), 1.0)

    def _keep_kind(self) -> int:
        return {"random": sparse.KEEP_AT_RANDOM, "rank": sparse.KEEP_BY_ROW_RANK}.get(
            self.kind, sparse.KEEP_BY_THRESHOLD)

    def _selection(self, chunk: Chunk) -> tuple:
        """Kernel arguments of the keep rule, with each block's first tie rank."""
        n_blocks = -(-chunk.size // kernels.REDUCTION_BLOCK)
        ties = np.zeros((n_blocks, len(self.weights), 2), np.int64)
        if self._keep_kind() == sparse.KEEP_BY_THRESHOLD:
            if chunk.start == 0:
                self._running = np.zeros((len(self.weights), 2), np.int64)
            kernels.threshold_ties(chunk.experts, chunk.encoding, chunk.base, chunk.base_encoding,
                                  self.thresholds, ties)
            starts = np.cumsum(ties, axis=0) - ties + self._running
            self._running = self._running + ties.sum(axis=0)
            ties = starts
        return (self.thresholds, self.quotas, ties, self.seeds, self.densities, self.epsilons)

    # -- output ---------------------------------------------------------------

    def apply(self, chunk: Chunk, out: OutChunk) -> None:
        params = self.context.params
        kernels.task_vector_merge(
            chunk.experts, chunk.encoding, chunk.base, chunk.base_encoding, self._keep_kind(),
            self.consensus, chunk.start, self.block, self._selection(chunk), self.weights,
            self.scales, bool(params["normalize"]), float(params["lambda"]), out.data,
            out.encoding)


def _della_probabilities(densities: np.ndarray, epsilons: np.ndarray, tensor: str):
    """Validate density +/- epsilon; experts kept whole or dropped whole need no spread."""
    densities, epsilons = densities.copy(), epsilons.copy()
    for i, (density, epsilon) in enumerate(zip(densities, epsilons)):
        if density >= 1 or density <= 0:
            densities[i], epsilons[i] = (1.0 if density >= 1 else 0.0), 0.0
        elif density + epsilon >= 1 or density - epsilon <= 0:
            raise MergeError(f"tensor {tensor}: model {i + 1}: density {density} +/- epsilon"
                             f" {epsilon} must stay inside (0, 1)")
    return densities, epsilons


class SparseTaskVectorMethod(MergeMethod):
    """A method of the family: its sparsification, consensus and default flags."""

    base_model = "required"
    # How elements are kept: "magnitude" (top-k), "outliers" (breadcrumbs), "random" (DARE),
    # "rank" (DELLA's MagPrune) or "none".
    sparsification: str = "none"
    consensus: bool = False

    def for_tensor(self, context: TensorContext) -> TensorMerge:
        return SparseTaskVectors(context, self.sparsification, self.consensus)


__all__ = ["DENSITY", "EPSILON", "GAMMA", "SEED", "WEIGHT", "SparseTaskVectorMethod",
           "common_params"]
