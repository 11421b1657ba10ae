"""TSV-Merge (Gargiulo et al., "Task Singular Vectors", CVPR 2025).

Per weight matrix: each task vector is truncated to its top singular triplets
(a fraction of the rank, 1/N by default), the stacked left and right singular
vectors of all tasks are decorrelated (replaced by the nearest orthogonal
matrices) and the merged task vector U_perp diag(s) V_perp^T is added to the
base, scaled by alpha. Other tensors (vectors) fall back to task arithmetic.

The SVD needs whole matrices, so each matrix is one chunk: it must fit the
budget with its float64 working copies, or the merge is refused up front.
"""

from __future__ import annotations

import numpy as np

from .. import kernels
from .base import Chunk, MergeMethod, OutChunk, Param, TensorContext, TensorMerge
from .common import WEIGHT, expert_weights


def tsv_delta(deltas: list[np.ndarray], fraction: float) -> np.ndarray:
    """The decorrelated low-rank sum of task-vector matrices (float64)."""
    rank = min(deltas[0].shape)
    keep = max(1, int(fraction * rank))
    lefts, values, rights = [], [], []
    for delta in deltas:
        u, s, vt = np.linalg.svd(delta, full_matrices=False)
        lefts.append(u[:, :keep])
        values.append(s[:keep])
        rights.append(vt[:keep].T)
    u_all, s_all, v_all = np.hstack(lefts), np.concatenate(values), np.hstack(rights)
    u_perp = _nearest_orthogonal(u_all)
    v_perp = _nearest_orthogonal(v_all)
    return (u_perp * s_all) @ v_perp.T


def _nearest_orthogonal(matrix: np.ndarray) -> np.ndarray:
    p, _, qt = np.linalg.svd(matrix, full_matrices=False)
    return p @ qt


def _values(raw: np.ndarray, encoding: int) -> np.ndarray:
    decoded = np.empty(raw.shape[0], np.float32)
    kernels.decode_array(raw, encoding, decoded)
    return decoded.astype(np.float64)


class _TsvTensor(TensorMerge):
    uses_base = True

    def __init__(self, context: TensorContext) -> None:
        self.context = context
        numel = int(np.prod(context.shape))
        self.matrix = len(context.shape) == 2 and min(context.shape) > 1
        if self.matrix:
            self.chunk_unit = max(numel, 1)  # the SVD needs the whole matrix
            # N float64 task vectors, the result and the SVDs' factors of similar size.
            self.working_bytes = (context.n_experts + 4) * numel * 8

    def apply(self, chunk: Chunk, out: OutChunk) -> None:
        params = self.context.params
        weights = expert_weights(self.context)
        base = _values(chunk.base, chunk.base_encoding)
        deltas = [w * (_values(row, chunk.encoding) - base)
                  for w, row in zip(weights, chunk.experts)]
        if self.matrix:
            fraction = params["rank_fraction"] or 1.0 / len(deltas)
            merged = tsv_delta([d.reshape(self.context.shape) for d in deltas], fraction).ravel()
        else:
            merged = np.sum(deltas, axis=0)
        kernels.encode_array(base + params["alpha"] * merged, out.data, out.encoding)


class Tsv(MergeMethod):
    name = "tsv"
    summary = "task singular vectors: low-rank, decorrelated task vectors per matrix"
    reference = "https://arxiv.org/abs/2412.00081"
    base_model = "required"
    params = (
        Param("alpha", float, 1.0, "scale of the merged task vector"),
        Param("rank_fraction", float, 0.0,
              "fraction of each task vector's rank kept; 0 means 1/N"),
    )
    model_params = (WEIGHT,)

    def for_tensor(self, context: TensorContext) -> TensorMerge:
        return _TsvTensor(context)
