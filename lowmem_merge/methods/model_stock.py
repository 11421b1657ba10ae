"""Model Stock (Jang et al.): move from the base towards the experts' average by an
amount set by the average angle between their task vectors."""

from __future__ import annotations

import numpy as np

from .base import MergeMethod, Param, TensorContext, TensorMerge
from .common import GramThenWeightedSum, LineGramThenWeightedSum


def model_stock_ratio(grams: np.ndarray) -> np.ndarray:
    """t per Gram matrix of task vectors (..., N, N): N cos / (1 + (N - 1) cos), mergekit's."""
    n = grams.shape[-1]
    norms = np.sqrt(np.maximum(np.diagonal(grams, axis1=-2, axis2=-1), 0.0))
    pairs = [(i, k) for i in range(n) for k in range(i + 1, n)]
    cosines = [np.clip(grams[..., i, k] / np.maximum(norms[..., i] * norms[..., k], 1e-6),
                       -1.0, 1.0) for i, k in pairs]
    cosine = np.mean(cosines, axis=0)
    denominator = 1 + (n - 1) * cosine
    singular = np.abs(denominator) < 1e-6  # no finite estimate: keep the base
    return np.where(singular, 0.0, n * cosine / np.where(singular, 1.0, denominator))


class _TensorWise(GramThenWeightedSum):
    def solve(self, gram: np.ndarray) -> tuple[np.ndarray, float]:
        t = float(model_stock_ratio(gram))
        return np.full(len(gram), t / len(gram)), 1.0  # base + t * mean(delta)


class _FilterWise(LineGramThenWeightedSum):
    def solve_lines(self, grams: np.ndarray) -> np.ndarray:
        t = model_stock_ratio(grams)
        return np.repeat((t / grams.shape[-1])[:, None], grams.shape[-1], axis=1)


class ModelStock(MergeMethod):
    name = "model_stock"
    summary = "base moved towards the experts' mean by their task vectors' average angle"
    reference = "https://arxiv.org/abs/2403.19522"
    base_model = "required"
    min_experts = 2
    params = (Param("filter_wise", bool, False, "one ratio per row instead of per tensor"),)

    def for_tensor(self, context: TensorContext) -> TensorMerge:
        if context.params["filter_wise"]:
            return _FilterWise(context, of_deltas=True, by_row=True)
        return _TensorWise(context.n_experts, of_deltas=True)
