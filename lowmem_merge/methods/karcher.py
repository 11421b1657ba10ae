"""Fisher-Rao weighted Karcher mean (arXiv:2603.04972), solved in Gram space.

The Karcher flow on the unit sphere never leaves the span of the experts'
directions u_i, so the iterate is m = sum_j c_j u_j and every step needs only
the Gram matrix U of the u_i: <m, u_i> = (U c)_i and |m|^2 = c^T U c. The
tangent T = sum_i w_i (u_i - d_i m) has coefficients w - (w . d) c, and the
exponential map is c <- cos|T| c + sin|T|/|T| t, renormalised. One float64
Gram pass and one weighted-sum pass merge a tensor of any size.
"""

from __future__ import annotations

import logging

import numpy as np

from .base import MergeMethod, Param, TensorContext, TensorMerge
from .common import WEIGHT, GramThenWeightedSum, expert_weights, normalized

log = logging.getLogger(__name__)


def karcher_coefficients(gram: np.ndarray, weights: np.ndarray, max_iter: int = 10,
                         tol: float = 1e-5, tensor: str = "") -> np.ndarray:
    """Coefficients k with merged = sum_i k_i x_i, from the Gram matrix of the x_i.

    weights are normalised to sum to 1. The merged norm is sum_i a_i |x_i|;
    zero-norm experts keep their weight in that scale but have no direction.
    """
    alphas = normalized(weights, tensor)
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    scale = float(alphas @ norms)
    valid = np.flatnonzero(norms > 0.0)
    coefficients = np.zeros(len(norms))
    if len(valid) == 0:
        return coefficients
    a = alphas[valid] / alphas[valid].sum()
    unit_gram = gram[np.ix_(valid, valid)] / np.outer(norms[valid], norms[valid])
    c = _initial_direction(unit_gram, a, tol, tensor)
    for _ in range(max_iter):
        cosines = np.clip(unit_gram @ c, -1.0, 1.0)
        angles = np.arccos(cosines)
        # Experts at the iterate pull nothing (as in the paper's code); at the antipode
        # the log map is undefined, so an exactly opposite expert pulls nothing either.
        moving = (angles >= tol) & (angles <= np.pi - 1e-7)
        w = np.zeros_like(a)
        w[moving] = a[moving] * angles[moving] / np.sin(angles[moving])
        tangent = w - (w @ cosines) * c
        tangent_norm = float(np.sqrt(max(tangent @ unit_gram @ tangent, 0.0)))
        if tangent_norm < tol:
            break
        c = np.cos(tangent_norm) * c + (np.sin(tangent_norm) / tangent_norm) * tangent
        c /= np.sqrt(c @ unit_gram @ c)
    coefficients[valid] = scale * c / norms[valid]
    return coefficients


def _initial_direction(unit_gram: np.ndarray, a: np.ndarray, tol: float, tensor: str):
    mean_norm = float(np.sqrt(max(a @ unit_gram @ a, 0.0)))
    if mean_norm >= tol:
        return a / mean_norm
    log.info("karcher: %s: the experts' weighted mean direction is near zero (near-antipodal"
             " inputs); starting from the first expert's direction", tensor or "tensor")
    start = np.zeros_like(a)
    start[0] = 1.0
    return start


class _KarcherTensor(GramThenWeightedSum):
    def __init__(self, context: TensorContext, task_vectors: bool) -> None:
        super().__init__(context.n_experts, of_deltas=task_vectors)
        self.context = context
        self.task_vectors = task_vectors

    def solve(self, gram: np.ndarray) -> tuple[np.ndarray, float | None]:
        params = self.context.params
        k = karcher_coefficients(gram, expert_weights(self.context), int(params["max_iter"]),
                                 float(params["tol"]), self.context.name)
        return k, 1.0 if self.task_vectors else None  # task vectors: base + sum k_i (x_i - base)


class Karcher(MergeMethod):
    name = "karcher"
    summary = "Fisher-Rao weighted Karcher mean on the sphere (keeps norms, stable as N grows)"
    reference = "https://arxiv.org/abs/2603.04972"
    base_model = "optional"
    min_experts = 1
    params = (
        Param("max_iter", int, 10, "maximum fixed-point iterations"),
        Param("tol", float, 1e-5, "stop when the tangent step |T| is below this"),
        Param("task_vectors", bool, True,
              "with --base, merge the experts' deltas from the base and add the base back;"
              " false merges raw weights and uses the base only for config and tokenizer"),
    )
    model_params = (WEIGHT,)

    def for_tensor(self, context: TensorContext) -> TensorMerge:
        return _KarcherTensor(context, context.has_base and bool(context.params["task_vectors"]))
