"""NuSLERP: SLERP of two models (or task vectors from a base) with t from their weights,
over the whole tensor or row by row, as mergekit's nuslerp."""

from __future__ import annotations

import numpy as np

from .base import MergeMethod, Param, TensorContext, TensorMerge
from .common import WEIGHT, GramThenWeightedSum, LineGramThenWeightedSum, expert_weights

COLINEAR_SIN = 1e-8
MIN_NORM = 1e-7


def nuslerp_coefficients(grams: np.ndarray, t: float) -> np.ndarray:
    """(..., 2, 2) Gram matrices -> (..., 2) coefficients of the two vectors."""
    norms = np.maximum(np.sqrt(np.maximum(np.diagonal(grams, axis1=-2, axis2=-1), 0.0)),
                       MIN_NORM)
    cosine = np.clip(grams[..., 0, 1] / (norms[..., 0] * norms[..., 1]), -1.0, 1.0)
    theta = np.arccos(cosine)
    sine = np.sin(theta)
    colinear = np.abs(sine) < COLINEAR_SIN
    safe = np.where(colinear, 1.0, sine)
    first = np.where(colinear, 1 - t, np.sin((1 - t) * theta) / safe)
    second = np.where(colinear, t, np.sin(t * theta) / safe)
    return np.stack([first, second], axis=-1)


def _t(context: TensorContext) -> float:
    weights = expert_weights(context)
    return 0.5 if abs(weights.sum()) < 1e-6 else float(weights[1] / weights.sum())


class _Whole(GramThenWeightedSum):
    def __init__(self, context: TensorContext) -> None:
        super().__init__(2, of_deltas=context.has_base)
        self.t = _t(context)

    def solve(self, gram: np.ndarray) -> tuple[np.ndarray, float | None]:
        return nuslerp_coefficients(gram, self.t), self.base_coefficient


class _Lines(LineGramThenWeightedSum):
    def __init__(self, context: TensorContext, by_row: bool) -> None:
        super().__init__(context, of_deltas=context.has_base, by_row=by_row)
        self.t = _t(context)

    def solve_lines(self, grams: np.ndarray) -> np.ndarray:
        return nuslerp_coefficients(grams, self.t)


class NuSlerp(MergeMethod):
    name = "nuslerp"
    summary = "SLERP of two models with t = w2 / (w1 + w2), whole tensor or per row/column"
    reference = "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md"
    base_model = "optional"
    min_experts = 2
    max_experts = 2
    params = (
        Param("nuslerp_flatten", bool, True, "interpolate the whole tensor as one vector"),
        Param("nuslerp_row_wise", bool, False,
              "without flatten: interpolate columns (dim 0) instead of rows"),
    )
    model_params = (WEIGHT,)

    def for_tensor(self, context: TensorContext) -> TensorMerge:
        if context.params["nuslerp_flatten"]:
            return _Whole(context)
        return _Lines(context, by_row=not context.params["nuslerp_row_wise"])
