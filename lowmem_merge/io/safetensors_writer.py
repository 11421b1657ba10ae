"""Streaming sharded safetensors writer: headers first, then data in order.

All output tensors are known up front (sizes do not depend on data), so each
shard's header is final before any tensor data exists and data is appended
as it is produced, never held whole in memory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .model import INDEX_NAME
from .writeback import WriteBack


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


class ShardedSafetensorsWriter:
    """Accepts the bytes of all tensors, in plan order, and spreads them over shards."""

    def __init__(self, folder: Path, tensors: list[OutputTensor], shard_size: int,
                 metadata: dict[str, str]) -> None:
        self.folder = folder
        self.shards = plan_shards(tensors, shard_size)
        self._metadata = metadata
        self._shard_index = -1
        self._fd = -1
        self._remaining = 0
        self._position = 0
        self._writeback: WriteBack | None = None
        self._next_shard()

    def _next_shard(self) -> None:
        self._close_current()
        self._shard_index += 1
        shard = self.shards[self._shard_index]
        self._fd = os.open(self.folder / shard.file_name,
                           os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._position = 0
        self._writeback = WriteBack(self._fd)
        header = _header_bytes(shard, self._metadata)
        self._write_all(memoryview(header))
        self._remaining = shard.data_bytes

    def write(self, data: memoryview) -> None:
        """Append the next bytes of tensor data (any split across tensors and shards)."""
        data = data.cast("B")
        while len(data):
            while self._remaining == 0:
                self._next_shard()
            take = min(len(data), self._remaining)
            self._write_all(data[:take])
            self._remaining -= take
            data = data[take:]

    def _write_all(self, data: memoryview) -> None:
        while len(data):
            count = os.write(self._fd, data)
            data = data[count:]
            self._position += count
        self._writeback.wrote(self._position)

    def _close_current(self) -> None:
        if self._fd >= 0:
            if self._remaining:
                raise RuntimeError(f"shard {self.shards[self._shard_index].file_name}"
                                   f" is {self._remaining} bytes short")
            os.fsync(self._fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(self._fd)
            self._fd = -1

    def finish(self) -> None:
        """Close the last shard (it must be complete) and write the index if sharded."""
        while self._shard_index < len(self.shards) - 1:
            self._next_shard()
        self._close_current()
        if len(self.shards) > 1:
            weight_map = {t.name: s.file_name for s in self.shards for t in s.tensors}
            total = sum(s.data_bytes for s in self.shards)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
