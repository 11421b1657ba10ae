"""Weight-space diagnostics, streamed: norms and angles of a merge against its experts.

For every tensor the Gram matrix of [expert 1, ..., expert N, merged] (or of
their deltas from a base) is accumulated in float64, chunk by chunk, with the
same kernels as the merges; norms and angles follow from it. Per layer, the
Gram matrices of the layer's tensors are summed, which is the Gram matrix of
the layer's weights as one vector.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from .. import kernels
from ..engine.naming import GGUF, HF, present
from ..engine.values import STORAGE, read_values
from ..errors import MergeError
from ..io import Model, RangeReader, TensorInfo, open_model
from ..methods import Chunk
from ..methods.common import GramStatistic

LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|blk)\.(\d+)\.")
CHUNK = 1 << 22  # elements per chunk: a multiple of the reduction block


@dataclass
class GramSummary:
    """Norms and angles read off a Gram matrix of [experts..., merged]."""

    gram: np.ndarray

    @property
    def norms(self) -> np.ndarray:
        return np.sqrt(np.maximum(np.diag(self.gram), 0.0))

    @property
    def norm_ratio(self) -> float:
        """Norm of the merge over the experts' mean norm (1: norms kept, < 1: shrinkage)."""
        mean = float(np.mean(self.norms[:-1]))
        return float(self.norms[-1] / mean) if mean > 0 else math.nan

    def angles(self) -> np.ndarray:
        """Angles in degrees between all pairs (NaN where a vector is zero)."""
        norms = self.norms
        with np.errstate(invalid="ignore", divide="ignore"):
            cosines = self.gram / np.outer(norms, norms)
        return np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0)))

    @property
    def expert_angles(self) -> list[float]:
        """Pairwise angles between the experts, upper triangle in order."""
        angles = self.angles()[:-1, :-1]
        rows, cols = np.triu_indices(angles.shape[0], 1)
        return [float(a) for a in angles[rows, cols]]

    @property
    def merge_angles(self) -> list[float]:
        """Angle of the merge to each expert."""
        return [float(a) for a in self.angles()[-1, :-1]]

    def as_dict(self) -> dict:
        return {"norms": [float(n) for n in self.norms], "norm_ratio": self.norm_ratio,
                "expert_angles": self.expert_angles, "merge_angles": self.merge_angles}


@dataclass
class TensorStats(GramSummary):
    name: str = ""
    layer: int | None = None

    def as_dict(self) -> dict:
        return {"name": self.name, "layer": self.layer, **super().as_dict()}


@dataclass
class LayerStats(GramSummary):
    layer: int = 0
    tensors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"layer": self.layer, "tensors": len(self.tensors), **super().as_dict()}


def weight_diagnostics(merged: str, experts: list[str], base: str | None = None
                       ) -> tuple[list[TensorStats], list[LayerStats]]:
    """Per-tensor and per-layer statistics of a merge against its experts (task vectors
    from base when given). Float tensors common to all models are measured."""
    models = [open_model(ref) for ref in [*experts, merged] + ([base] if base else [])]
    naming = HF if any(not m.is_gguf for m in models) else GGUF
    models = [present(m, naming) for m in models]
    names = _common_float_tensors(models)
    reader = RangeReader()
    try:
        tensors = [_tensor_stats(reader, name, [m.tensors[name] for m in models],
                                 base is not None) for name in names]
    finally:
        reader.close()
    return tensors, _layers(tensors)


def _common_float_tensors(models: list[Model]) -> list[str]:
    first = models[0]
    names = [name for name, info in first.tensors.items()
             if all(name in m.tensors and m.tensors[name].shape == info.shape for m in models)
             and all(m.tensors[name].dtype not in ("I8", "I16", "I32", "I64", "U8", "BOOL")
                     for m in models)]
    if not names:
        raise MergeError("the merged model and the experts have no tensor in common")
    return names


def _tensor_stats(reader: RangeReader, name: str, infos: list[TensorInfo],
                  with_base: bool) -> TensorStats:
    vectors = infos[:-1] if with_base else infos
    numel = infos[0].numel
    gram = GramStatistic(len(vectors), of_deltas=with_base)
    width = max(4, max(i.bytes_per_block // i.block_elements + 1 for i in infos))
    scratch = np.empty(CHUNK * width, np.uint8)
    spare = np.empty(CHUNK * width, np.uint8)
    for start in range(0, numel, CHUNK):
        count = min(CHUNK, numel - start)
        stack = np.empty((len(vectors), count), STORAGE[kernels.F32])
        for row, info in zip(stack, vectors):
            read_values(reader, info, start, row, kernels.F32, scratch, spare)
        base = None
        if with_base:
            base = np.empty(count, STORAGE[kernels.F32])
            read_values(reader, infos[-1], start, base, kernels.F32, scratch, spare)
        gram.observe(Chunk(stack, kernels.F32, base, kernels.F32, start))
    match = LAYER.search(name)
    return TensorStats(gram.matrix, name, int(match.group(1)) if match else None)


def _layers(tensors: list[TensorStats]) -> list[LayerStats]:
    layers: dict[int, LayerStats] = {}
    for stats in tensors:
        if stats.layer is None:
            continue
        layer = layers.setdefault(stats.layer, LayerStats(np.zeros_like(stats.gram),
                                                          stats.layer))
        layer.gram = layer.gram + stats.gram
        layer.tensors.append(stats.name)
    return [layers[k] for k in sorted(layers)]
