"""Arguments and (later) mergekit YAML -> one validated MergeJob for the engine."""

from .mergekit_yaml import job_from_yaml
from .plan import build_job, output_dtype
from .settings import evaluate, parse_assignment

__all__ = ["build_job", "evaluate", "job_from_yaml", "output_dtype", "parse_assignment"]
