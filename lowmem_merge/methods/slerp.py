"""SLERP between two models, from the first (t=0) to the second (t=1), as mergekit does."""

from __future__ import annotations

import numpy as np

from .base import REQUIRED, MergeMethod, Param, TensorContext, TensorMerge
from .common import GramThenWeightedSum

COLINEAR = 0.9995  # above this |cos|, interpolate linearly (mergekit's DOT_THRESHOLD)
ZERO_NORM = 1e-8  # mergekit's eps: vectors this short are used unnormalised


def slerp_coefficients(gram: np.ndarray, t: float) -> np.ndarray:
    """Coefficients (s0, s1) with slerp(t; v0, v1) = s0 v0 + s1 v1, from the 2x2 Gram."""
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    scale = np.where(norms > ZERO_NORM, norms, 1.0)
    dot = gram[0, 1] / (scale[0] * scale[1])
    if abs(dot) > COLINEAR:
        return np.array([1.0 - t, t])
    theta = np.arccos(dot)
    return np.array([np.sin(theta - theta * t), np.sin(theta * t)]) / np.sin(theta)


class _SlerpTensor(GramThenWeightedSum):
    def __init__(self, t: float) -> None:
        super().__init__(2, of_deltas=False)
        self.t = t

    def solve(self, gram: np.ndarray) -> tuple[np.ndarray, None]:
        return slerp_coefficients(gram, self.t), None


class Slerp(MergeMethod):
    name = "slerp"
    summary = "spherical interpolation between two models"
    reference = "https://en.wikipedia.org/wiki/Slerp"
    base_model = "unused"
    min_experts = 2
    max_experts = 2
    params = (Param("t", float, REQUIRED,
                    "0 gives the first model (or --base), 1 the second; a list is a"
                    " gradient over layers"),)
    notes = "With --base, the base is the first model (t=0) and one other model is allowed."
    base_goes_first = True

    def for_tensor(self, context: TensorContext) -> TensorMerge:
        return _SlerpTensor(float(context.params["t"]))
