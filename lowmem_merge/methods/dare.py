"""DARE: drop task-vector elements at random and rescale, then sum (linear) or TIES-merge."""

from .sparse_task_vectors import (
    DENSITY,
    SEED,
    WEIGHT,
    SparseTaskVectorMethod,
    common_params,
)


class DareTies(SparseTaskVectorMethod):
    name = "dare_ties"
    summary = "random drop and rescale of task vectors, then TIES sign election"
    reference = "https://arxiv.org/abs/2311.03099"
    params = (*common_params(normalize=False, rescale=True), SEED)
    model_params = (WEIGHT, DENSITY)
    sparsification = "random"
    consensus = True


class DareLinear(DareTies):
    name = "dare_linear"
    summary = "random drop and rescale of task vectors, then a weighted sum"
    consensus = False
