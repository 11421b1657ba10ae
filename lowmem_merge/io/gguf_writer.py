"""Streaming GGUF writer: metadata and tensor table first, then data as it is merged.

A large output may be split the way llama.cpp's gguf-split names and marks
the files (NAME-00001-of-0000N.gguf, split.* keys), so llama.cpp loads it
from its first file.
"""

from __future__ import annotations

import struct
from pathlib import Path

from gguf import GGUF_DEFAULT_ALIGNMENT, GGUF_VERSION, GGMLQuantizationType, GGUFValueType

from .gguf_reader import MAGIC, SCALAR_FORMATS
from .gguf_values import Metadata, MetaValue
from .safetensors_writer import OutputTensor, plan_shards
from .sequential_files import PlannedFile, SequentialFileWriter

SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")


def _string(text: str) -> bytes:
    encoded = text.encode("utf-8")
    return struct.pack("<Q", len(encoded)) + encoded


def _item(value_type: GGUFValueType, value) -> bytes:
    if value_type == GGUFValueType.STRING:
        return _string(value)
    return struct.pack(SCALAR_FORMATS[value_type], value)


def _value(entry: MetaValue) -> bytes:
    head = struct.pack("<I", entry.type)
    if entry.type != GGUFValueType.ARRAY:
        return head + _item(entry.type, entry.value)
    parts = [head, struct.pack("<IQ", entry.item_type, len(entry.value))]
    if entry.item_type == GGUFValueType.STRING:
        parts += [_string(item) for item in entry.value]
    else:
        fmt = SCALAR_FORMATS[entry.item_type]
        parts.append(struct.pack(f"<{len(entry.value)}{fmt[1]}", *entry.value))
    return b"".join(parts)


def gguf_header(metadata: Metadata, tensors: list[OutputTensor],
                alignment: int = GGUF_DEFAULT_ALIGNMENT) -> bytes:
    """Header, metadata and tensor table of one file, padded to where data starts."""
    parts = [MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(metadata))]
    for key, entry in metadata.items():
        parts += [_string(key), _value(entry)]
    offset = 0
    for tensor in tensors:
        dims = tuple(reversed(tensor.shape)) or (1,)
        parts += [_string(tensor.name), struct.pack(f"<I{len(dims)}Q", len(dims), *dims),
                  struct.pack("<IQ", GGMLQuantizationType[tensor.dtype], offset)]
        offset += tensor.nbytes + -tensor.nbytes % alignment
    header = b"".join(parts)
    return header + bytes(-len(header) % alignment)


def gguf_file_names(stem: str, count: int) -> list[str]:
    if count == 1:
        return [f"{stem}.gguf"]
    return [f"{stem}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def gguf_file_groups(tensors: list[OutputTensor],
                     split_size: int | None) -> list[list[OutputTensor]]:
    """Tensors of each file: all in one, or split before a file would exceed split_size."""
    return [s.tensors for s in plan_shards(tensors, split_size)] if split_size else [tensors]


class GGUFFileWriter(SequentialFileWriter):
    """One GGUF file, or gguf-split files when split_size is set and the model exceeds it."""

    def __init__(self, folder: Path, stem: str, tensors: list[OutputTensor],
                 metadata: Metadata, split_size: int | None = None) -> None:
        groups = gguf_file_groups(tensors, split_size)
        self.file_names = gguf_file_names(stem, len(groups))
        self.tensor_names = {name: [t.name for t in group]
                             for name, group in zip(self.file_names, groups)}
        planned = []
        for index, (name, group) in enumerate(zip(self.file_names, groups)):
            file_metadata = _split_metadata(metadata, index, len(groups), len(tensors))
            planned.append(PlannedFile(name, gguf_header(file_metadata, group),
                                       [t.nbytes for t in group], GGUF_DEFAULT_ALIGNMENT))
        super().__init__(folder, planned)


def _split_metadata(metadata: Metadata, index: int, count: int, tensor_count: int) -> Metadata:
    """All metadata in the first file; split files also carry gguf-split's keys."""
    kept = {k: v for k, v in metadata.items() if k not in SPLIT_KEYS} if index == 0 else {}
    if count == 1:
        return kept
    return {**kept,
            "split.no": MetaValue(GGUFValueType.UINT16, index),
            "split.count": MetaValue(GGUFValueType.UINT16, count),
            "split.tensors.count": MetaValue(GGUFValueType.INT32, tensor_count)}
