"""Arguments and (later) mergekit YAML -> one validated MergeJob for the engine."""

from .plan import build_job, output_dtype
from .settings import evaluate, parse_assignment

__all__ = ["build_job", "evaluate", "output_dtype", "parse_assignment"]
