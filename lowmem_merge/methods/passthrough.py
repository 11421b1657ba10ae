"""Passthrough: one model's tensors as they are (optionally scaled), for frankenmerges."""

from __future__ import annotations

import numpy as np

from .base import MergeMethod, Param, TensorContext, TensorMerge
from .common import WeightedSumMerge


class Passthrough(MergeMethod):
    name = "passthrough"
    summary = "copy one model's tensors (with slices: stack layers of several models)"
    reference = "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md"
    min_experts = 1
    max_experts = 1
    model_params = (Param("scale", float, 1.0, "multiply the tensor by this"),)

    def for_tensor(self, context: TensorContext) -> TensorMerge:
        return WeightedSumMerge(np.array([context.model_params[0]["scale"]], np.float64))
