"""Linear: a weighted average of the models (Wortsman et al., model soups)."""

from .base import MergeMethod, Param, TensorContext, TensorMerge
from .common import WEIGHT, WeightedSumMerge, expert_weights, normalized


class Linear(MergeMethod):
    name = "linear"
    summary = "weighted average of the models"
    reference = "https://arxiv.org/abs/2203.05482"
    params = (Param("normalize", bool, True, "divide by the sum of the weights"),)
    model_params = (WEIGHT,)

    def for_tensor(self, context: TensorContext) -> TensorMerge:
        weights = expert_weights(context)
        if context.params["normalize"]:
            weights = normalized(weights, context.name)
        return WeightedSumMerge(weights)
