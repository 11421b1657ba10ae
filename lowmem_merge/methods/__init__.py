"""Merge methods, one module each; this registry is the only list of them."""

from ..errors import MergeError
from .base import REQUIRED, Chunk, MergeMethod, OutChunk, Param, TensorContext, TensorMerge
from .breadcrumbs import Breadcrumbs, BreadcrumbsTies
from .dare import DareLinear, DareTies
from .della import Della, DellaLinear
from .karcher import Karcher
from .linear import Linear
from .model_stock import ModelStock
from .multislerp import MultiSlerp
from .nuslerp import NuSlerp
from .passthrough import Passthrough
from .slerp import Slerp
from .task_arithmetic import TaskArithmetic
from .ties import Ties
from .tsv import Tsv

METHODS: dict[str, MergeMethod] = {m.name: m for m in (
    Karcher(), Linear(), Slerp(), TaskArithmetic(), Ties(), DareTies(), DareLinear(),
    Breadcrumbs(), BreadcrumbsTies(), Della(), DellaLinear(), ModelStock(), MultiSlerp(),
    NuSlerp(), Passthrough(), Tsv())}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise MergeError(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}")\
            from None


__all__ = [
    "METHODS",
    "REQUIRED",
    "Chunk",
    "MergeMethod",
    "OutChunk",
    "Param",
    "TensorContext",
    "TensorMerge",
    "get_method",
]
