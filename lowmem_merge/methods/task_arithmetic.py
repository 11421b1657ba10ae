"""Task arithmetic: base + lambda * sum_i w_i (expert_i - base) (Ilharco et al.)."""

from .base import MergeMethod, Param, TensorContext, TensorMerge
from .common import WEIGHT, WeightedSumMerge, expert_weights


class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    summary = "base plus the weighted sum of the experts' task vectors"
    reference = "https://arxiv.org/abs/2212.04089"
    base_model = "required"
    params = (
        Param("lambda", float, 1.0, "scale of the summed task vectors"),
        Param("normalize", bool, False, "divide the summed task vectors by the sum of weights"),
    )
    model_params = (WEIGHT,)

    def for_tensor(self, context: TensorContext) -> TensorMerge:
        weights = expert_weights(context)
        if context.params["normalize"] and abs(weights.sum()) >= 1e-8:
            weights = weights / weights.sum()
        return WeightedSumMerge(context.params["lambda"] * weights, base_coefficient=1.0)
