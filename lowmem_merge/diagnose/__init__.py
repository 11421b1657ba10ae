"""Does a merge keep what the experts learned? Weight-space and function-space diagnostics."""

from .weights import LayerStats, TensorStats, weight_diagnostics

__all__ = ["LayerStats", "TensorStats", "weight_diagnostics"]
