"""DELLA: drop task-vector elements with probabilities set by magnitude rank in each row."""

from .sparse_task_vectors import (
    DENSITY,
    EPSILON,
    SEED,
    WEIGHT,
    SparseTaskVectorMethod,
    common_params,
)


class Della(SparseTaskVectorMethod):
    name = "della"
    summary = "rank-weighted random drop (MagPrune) and rescale, then TIES sign election"
    reference = "https://arxiv.org/abs/2406.11617"
    params = (*common_params(normalize=True, rescale=True), SEED)
    model_params = (WEIGHT, DENSITY, EPSILON)
    sparsification = "rank"
    consensus = True


class DellaLinear(Della):
    name = "della_linear"
    summary = "rank-weighted random drop (MagPrune) and rescale, then a weighted sum"
    params = (*common_params(normalize=False, rescale=True), SEED)
    consensus = False
