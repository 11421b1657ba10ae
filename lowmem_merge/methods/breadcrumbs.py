"""Model breadcrumbs: drop both the largest outliers and the smallest task-vector values."""

from .sparse_task_vectors import (
    DENSITY,
    GAMMA,
    WEIGHT,
    SparseTaskVectorMethod,
    common_params,
)


class Breadcrumbs(SparseTaskVectorMethod):
    name = "breadcrumbs"
    summary = "drop the top gamma and the smallest magnitudes of task vectors, then sum"
    reference = "https://arxiv.org/abs/2312.06795"
    params = common_params(normalize=False, rescale=False)
    model_params = (WEIGHT, DENSITY, GAMMA)
    sparsification = "outliers"
    consensus = False


class BreadcrumbsTies(Breadcrumbs):
    name = "breadcrumbs_ties"
    summary = "breadcrumbs sparsification, then TIES sign election"
    consensus = True
