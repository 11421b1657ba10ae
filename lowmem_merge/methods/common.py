"""Shared pieces of methods: weights, the Gram statistic, weighted-sum output."""

from __future__ import annotations

import numpy as np

from .. import kernels
from ..errors import MergeError
from .base import Chunk, OutChunk, Param, TensorContext, TensorMerge

WEIGHT = Param("weight", float, 1.0, "relative weight of this model")


def expert_weights(context: TensorContext) -> np.ndarray:
    return np.array([p["weight"] for p in context.model_params], dtype=np.float64)


def normalized(weights: np.ndarray, tensor: str) -> np.ndarray:
    total = weights.sum()
    if abs(total) < 1e-12:
        raise MergeError(f"tensor {tensor}: model weights sum to zero; cannot normalize")
    return weights / total


class GramStatistic:
    """N x N Gram matrix of the experts (or of their deltas from the base), in float64.

    Kernel partials are per fixed block of the tensor and summed here in block
    order, so the matrix does not depend on chunking or threads.
    """

    def __init__(self, n_experts: int, of_deltas: bool) -> None:
        self.matrix = np.zeros((n_experts, n_experts))
        self.of_deltas = of_deltas

    def observe(self, chunk: Chunk) -> None:
        n_blocks = -(-chunk.size // kernels.REDUCTION_BLOCK)
        partials = np.empty((n_blocks, *self.matrix.shape))
        base = chunk.base if self.of_deltas else chunk.experts[0]
        kernels.gram_blocks(chunk.experts, chunk.encoding, base, chunk.base_encoding,
                            self.of_deltas, partials)
        for block in partials:
            self.matrix += block


def write_weighted_sum(chunk: Chunk, coefficients: np.ndarray, base_coefficient: float | None,
                       out: OutChunk) -> None:
    """out = sum_i c_i x_i, or with a base_coefficient: beta * base + sum_i c_i (x_i - base)."""
    around_base = base_coefficient is not None
    base = chunk.base if around_base else chunk.experts[0]
    kernels.weighted_sum(chunk.experts, chunk.encoding, coefficients, base, chunk.base_encoding,
                         float(base_coefficient or 0.0), around_base, out.data, out.encoding)


class WeightedSumMerge(TensorMerge):
    """A fixed combination of the inputs (no statistics); see write_weighted_sum."""

    def __init__(self, coefficients: np.ndarray, base_coefficient: float | None = None) -> None:
        self.coefficients = coefficients
        self.base_coefficient = base_coefficient
        self.uses_base = base_coefficient is not None

    def apply(self, chunk: Chunk, out: OutChunk) -> None:
        write_weighted_sum(chunk, self.coefficients, self.base_coefficient, out)


class GramThenWeightedSum(TensorMerge):
    """One Gram pass, a small solve in N dimensions, then a weighted sum."""

    stat_passes = 1

    def __init__(self, n_experts: int, of_deltas: bool) -> None:
        self.gram = GramStatistic(n_experts, of_deltas)
        self.uses_base = of_deltas
        self.coefficients = np.zeros(n_experts)
        self.base_coefficient: float | None = 1.0 if of_deltas else None

    def observe(self, pass_index: int, chunk: Chunk) -> None:
        self.gram.observe(chunk)

    def end_pass(self, pass_index: int) -> None:
        self.coefficients, self.base_coefficient = self.solve(self.gram.matrix)

    def solve(self, gram: np.ndarray) -> tuple[np.ndarray, float | None]:
        """Coefficients of the experts (and of the base, see write_weighted_sum)."""
        raise NotImplementedError

    def apply(self, chunk: Chunk, out: OutChunk) -> None:
        write_weighted_sum(chunk, self.coefficients, self.base_coefficient, out)


class LineGramThenWeightedSum(TensorMerge):
    """Gram matrices per row (or per column) of a 2-D tensor, solved line by line.

    Rows must arrive whole, so chunks hold whole rows; a 1-D tensor is one line.
    solve_lines maps grams (lines, N, N) to coefficients (lines, N).
    """

    stat_passes = 1

    def __init__(self, context: TensorContext, of_deltas: bool, by_row: bool) -> None:
        shape = context.shape
        self.row_length = shape[-1] if len(shape) > 1 else max(int(np.prod(shape)), 1)
        n_rows = int(np.prod(shape)) // self.row_length if self.row_length else 0
        self.by_row = by_row or len(shape) < 2
        lines = n_rows if self.by_row else self.row_length
        self.grams = np.zeros((max(lines, 1), context.n_experts, context.n_experts))
        self.of_deltas = of_deltas
        self.uses_base = of_deltas
        self.chunk_unit = self.row_length
        self.base_coefficient: float | None = 1.0 if of_deltas else None

    def observe(self, pass_index: int, chunk: Chunk) -> None:
        base = chunk.base if self.of_deltas else chunk.experts[0]
        first = chunk.start // self.row_length
        target = self.grams[first:first + chunk.size // self.row_length] if self.by_row \
            else self.grams
        kernels.line_gram(chunk.experts, chunk.encoding, base, chunk.base_encoding,
                          self.of_deltas, self.row_length, self.by_row, target)

    def end_pass(self, pass_index: int) -> None:
        self.coefficients = self.solve_lines(self.grams)

    def solve_lines(self, grams: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def apply(self, chunk: Chunk, out: OutChunk) -> None:
        around_base = self.base_coefficient is not None
        base = chunk.base if around_base else chunk.experts[0]
        kernels.line_weighted_sum(
            chunk.experts, chunk.encoding, self.coefficients, base, chunk.base_encoding,
            float(self.base_coefficient or 0.0), around_base, self.row_length, self.by_row,
            chunk.start // self.row_length, out.data, out.encoding)
