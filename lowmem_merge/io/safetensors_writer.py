"""Streaming sharded safetensors writer: headers first, then data in order.

All output tensors are known up front (sizes do not depend on data), so each
shard's header is final before any tensor data exists and data is appended
as it is produced, never held whole in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .model import INDEX_NAME
from .sequential_files import PlannedFile, SequentialFileWriter


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class _Shard:
    file_name: str
    tensors: list[OutputTensor]

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: list[OutputTensor], shard_size: int) -> list[_Shard]:
    """Group tensors in order, starting a new shard when the next one would overflow."""
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    if len(groups) == 1:
        return [_Shard("model.safetensors", groups[0])]
    total = len(groups)
    return [_Shard(f"model-{i + 1:05d}-of-{total:05d}.safetensors", g)
            for i, g in enumerate(groups)]


def _header_bytes(shard: _Shard, metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for tensor in shard.tensors:
        header[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.shape),
                               "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keep tensor data 8-byte aligned
    return len(encoded).to_bytes(8, "little") + encoded


class ShardedSafetensorsWriter(SequentialFileWriter):
    """Safetensors shards (and their index when there are several), filled in plan order."""

    def __init__(self, folder: Path, tensors: list[OutputTensor], shard_size: int,
                 metadata: dict[str, str]) -> None:
        self.shards = plan_shards(tensors, shard_size)
        super().__init__(folder, [
            PlannedFile(s.file_name, _header_bytes(s, metadata), [t.nbytes for t in s.tensors])
            for s in self.shards])

    def write_index(self) -> None:
        """The index of the shards, when there are several."""
        if len(self.shards) > 1:
            weight_map = {t.name: s.file_name for s in self.shards for t in s.tensors}
            total = sum(s.data_bytes for s in self.shards)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
