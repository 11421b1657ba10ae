"""The streaming engine: plans tensors, sizes chunks to the budget, runs the pipeline.

It knows nothing of any method's math: it feeds chunks to the method's
statistics passes and apply pass.
"""

from .budget import CHUNK_ALIGN, cgroup_memory_limit, default_max_memory
from .devices import DEVICES
from .job import EXECUTORS, MergeJob, MergeReport, OutputSlice, ParamResolver, SliceSource
from .preview import MergePreview, preview_merge
from .run import run_merge

__all__ = [
    "CHUNK_ALIGN",
    "DEVICES",
    "EXECUTORS",
    "MergeJob",
    "MergePreview",
    "MergeReport",
    "OutputSlice",
    "ParamResolver",
    "SliceSource",
    "cgroup_memory_limit",
    "default_max_memory",
    "preview_merge",
    "run_merge",
]
