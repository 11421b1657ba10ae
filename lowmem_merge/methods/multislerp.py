"""Multi-SLERP: barycentric interpolation of N models on the sphere (mergekit's multislerp).

mergekit projects onto the tangent space at the normalised weighted mean of
the unit vectors and interpolates there; that tangent sum is exactly zero,
so the result is the mean direction scaled by the weighted mean norm. This
module computes that result directly, in float64 from the Gram matrix.
"""

from __future__ import annotations

import numpy as np

from ..errors import MergeError
from .base import MergeMethod, Param, TensorContext, TensorMerge
from .common import WEIGHT, GramThenWeightedSum, expert_weights

EPS = 1e-8


class _MultiSlerpTensor(GramThenWeightedSum):
    def __init__(self, context: TensorContext) -> None:
        super().__init__(context.n_experts, of_deltas=context.has_base)
        self.context = context

    def solve(self, gram: np.ndarray) -> tuple[np.ndarray, float | None]:
        weights = expert_weights(self.context)
        if self.context.params["normalize_weights"]:
            weights = weights / weights.sum()
        base = 1.0 if self.context.has_base else None
        if len(weights) == 1:
            return np.ones(1), base
        norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
        if not norms.any():
            return np.zeros(len(weights)), base  # all zero: nothing to interpolate
        unit = weights / (norms + EPS)  # mean direction = sum_i unit_i x_i
        mean_norm = float(np.sqrt(max(unit @ gram @ unit, 0.0)))
        if mean_norm < EPS:
            if len(weights) == 2:
                return weights, base  # mergekit falls back to the linear mix
            raise MergeError(f"tensor {self.context.name}: the weighted mean of the experts'"
                             " directions is zero (antipodal experts); change the weights")
        return unit * float(weights @ norms) / mean_norm, base


class MultiSlerp(MergeMethod):
    name = "multislerp"
    summary = "spherical barycentre of N models (or task vectors with a base)"
    reference = "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"
    base_model = "optional"
    min_experts = 1
    params = (Param("normalize_weights", bool, True, "divide the weights by their sum"),)
    model_params = (WEIGHT,)

    def for_tensor(self, context: TensorContext) -> TensorMerge:
        return _MultiSlerpTensor(context)
