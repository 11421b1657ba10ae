"""TIES: keep each task vector's largest magnitudes, elect signs, average agreeing values."""

from .sparse_task_vectors import (
    DENSITY,
    WEIGHT,
    SparseTaskVectorMethod,
    common_params,
)


class Ties(SparseTaskVectorMethod):
    name = "ties"
    summary = "trim task vectors to their top-k magnitudes, elect signs, merge agreeing values"
    reference = "https://arxiv.org/abs/2306.01708"
    params = common_params(normalize=True, rescale=False)
    model_params = (WEIGHT, DENSITY)
    sparsification = "magnitude"
    consensus = True
