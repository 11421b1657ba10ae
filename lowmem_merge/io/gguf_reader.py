"""Validated GGUF headers: metadata and where each tensor's blocks lie.

Every file is untrusted. The header is parsed from a memory map with every
count, length and offset checked against the file before it is used, so a
truncated or hostile file gives one clear error instead of a crash or a huge
allocation. Only the header pages are touched; tensor data is read later,
chunk by chunk, by RangeReader.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from ..errors import InputFileError
from .gguf_values import Metadata, MetaValue
from .safetensors_reader import TensorInfo

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4
ALIGNMENT_KEY = "general.alignment"
SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")

SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


@dataclass
class GGUFHeader:
    version: int
    metadata: Metadata
    tensors: dict[str, TensorInfo]
    alignment: int


class _Cursor:
    """Bounded little-endian reads from a memory map; running past the end is an error."""

    def __init__(self, path: Path, data: mmap.mmap | bytes) -> None:
        self.path = path
        self.data = data
        self.position = 0

    def fail(self, problem: str) -> InputFileError:
        return InputFileError(self.path, problem)

    def take(self, size: int, what: str) -> int:
        start = self.position
        if size < 0 or start + size > len(self.data):
            raise self.fail(f"truncated: {what} at byte {start} needs {size} bytes,"
                            f" the file has {len(self.data)}")
        self.position += size
        return start

    def scalar(self, fmt: str, what: str):
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.data, start)[0]

    def string(self, what: str) -> str:
        length = self.scalar("<Q", f"length of {what}")
        start = self.take(length, what)
        try:
            return bytes(self.data[start:start + length]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at byte {start} is not valid UTF-8") from None

    def count(self, what: str, smallest_item: int) -> int:
        """A count read from the file, refused when its items could not fit in what is left."""
        value = self.scalar("<Q", what)
        left = len(self.data) - self.position
        if value * smallest_item > left:
            raise self.fail(f"{what} is {value}, more than the {left} bytes left can hold")
        return value


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse and validate one GGUF file's metadata and tensor table."""
    with open(path, "rb") as handle:
        size = path.stat().st_size
        if size < 24:
            raise InputFileError(path, f"too short to be a GGUF file ({size} bytes)")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            cursor = _Cursor(path, data)
            return _parse(cursor, size)


def _parse(cursor: _Cursor, file_size: int) -> GGUFHeader:
    magic = bytes(cursor.data[cursor.take(4, "magic"):4])
    if magic != MAGIC:
        raise cursor.fail(f"not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
    version = cursor.scalar("<I", "version")
    if version not in SUPPORTED_VERSIONS:
        raise cursor.fail(f"GGUF version {version} is not supported"
                          f" (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
    tensor_count = cursor.count("tensor count", 8 + 4 + 4 + 8)
    kv_count = cursor.count("metadata count", 8 + 4)
    metadata: Metadata = {}
    for index in range(kv_count):
        key = cursor.string(f"metadata key {index}")
        if key in metadata:
            raise cursor.fail(f"metadata key {key!r} appears twice")
        metadata[key] = _value(cursor, key)
    alignment = _alignment(cursor, metadata)
    entries = [_tensor_entry(cursor, index) for index in range(tensor_count)]
    data_start = -(-cursor.position // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, shape, ggml_type, offset in entries:
        if name in tensors:
            raise cursor.fail(f"tensor {name!r} appears twice")
        tensors[name] = _tensor_info(cursor, name, shape, ggml_type, offset, data_start,
                                     alignment, file_size)
    _check_no_overlap(cursor, tensors)
    return GGUFHeader(version, metadata, tensors, alignment)


def _value(cursor: _Cursor, key: str) -> MetaValue:
    value_type = _value_type(cursor, cursor.scalar("<I", f"type of {key!r}"), key)
    if value_type != GGUFValueType.ARRAY:
        return MetaValue(value_type, _item(cursor, value_type, key))
    item_type = _value_type(cursor, cursor.scalar("<I", f"item type of {key!r}"), key)
    if item_type == GGUFValueType.ARRAY:
        raise cursor.fail(f"metadata {key!r}: arrays of arrays are not supported")
    if item_type == GGUFValueType.STRING:
        length = cursor.count(f"length of {key!r}", 8)
        return MetaValue.array(item_type, [cursor.string(f"item {i} of {key!r}")
                                           for i in range(length)])
    fmt = SCALAR_FORMATS[item_type]
    width = struct.calcsize(fmt)
    length = cursor.count(f"length of {key!r}", width)
    start = cursor.take(length * width, f"items of {key!r}")
    items = np.frombuffer(cursor.data, np.dtype(fmt), length, start)
    return MetaValue.array(item_type, items.tolist())


def _item(cursor: _Cursor, value_type: GGUFValueType, key: str):
    if value_type == GGUFValueType.STRING:
        return cursor.string(f"value of {key!r}")
    return cursor.scalar(SCALAR_FORMATS[value_type], f"value of {key!r}")


def _value_type(cursor: _Cursor, raw: int, key: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise cursor.fail(f"metadata {key!r} has unknown value type {raw}") from None


def _alignment(cursor: _Cursor, metadata: Metadata) -> int:
    entry = metadata.get(ALIGNMENT_KEY)
    if entry is None:
        return GGUF_DEFAULT_ALIGNMENT
    if entry.type != GGUFValueType.UINT32 or entry.value <= 0 \
            or entry.value & (entry.value - 1) or entry.value % 8:
        raise cursor.fail(f"{ALIGNMENT_KEY} {entry.value!r} is not a power of two multiple"
                          " of 8 stored as uint32")
    return entry.value


def _tensor_entry(cursor: _Cursor, index: int) -> tuple[str, tuple[int, ...], int, int]:
    name = cursor.string(f"name of tensor {index}")
    n_dims = cursor.scalar("<I", f"dimension count of tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cursor.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
    dims = [cursor.scalar("<Q", f"dimensions of tensor {name!r}") for _ in range(n_dims)]
    ggml_type = cursor.scalar("<I", f"type of tensor {name!r}")
    offset = cursor.scalar("<Q", f"offset of tensor {name!r}")
    # GGUF lists the fastest-varying dimension first; numpy order is the reverse.
    return name, tuple(reversed(dims)), ggml_type, offset


def _tensor_info(cursor: _Cursor, name: str, shape: tuple[int, ...], ggml_type: int,
                 offset: int, data_start: int, alignment: int, file_size: int) -> TensorInfo:
    try:
        type_name = GGMLQuantizationType(ggml_type).name
        block_elements, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise cursor.fail(f"tensor {name!r} has unknown ggml type {ggml_type}") from None
    if shape[-1] % block_elements:
        raise cursor.fail(f"tensor {name!r}: rows of {shape[-1]} elements are not whole"
                          f" {type_name} blocks of {block_elements}")
    if offset % alignment:
        raise cursor.fail(f"tensor {name!r}: offset {offset} is not a multiple of the"
                          f" alignment {alignment}")
    numel = math.prod(shape)
    nbytes = numel // block_elements * block_bytes
    if data_start + offset + nbytes > file_size:
        raise cursor.fail(f"tensor {name!r}: data at bytes {data_start + offset} to"
                          f" {data_start + offset + nbytes} lies beyond the end of the file"
                          f" ({file_size} bytes); truncated?")
    return TensorInfo(name, type_name, shape, cursor.path, data_start + offset, nbytes,
                      block_elements, block_bytes)


def _check_no_overlap(cursor: _Cursor, tensors: dict[str, TensorInfo]) -> None:
    ordered = sorted((t for t in tensors.values() if t.nbytes), key=lambda t: t.offset)
    for before, after in zip(ordered, ordered[1:]):
        if after.offset < before.offset + before.nbytes:
            raise cursor.fail(f"tensors {before.name!r} and {after.name!r} overlap in the data")


def split_paths(path: Path) -> list[Path]:
    """All files of a split GGUF (gguf-split naming) given its first file, else [path]."""
    match = SPLIT_NAME.match(path.name)
    if not match:
        return [path]
    if int(match["index"]) != 1:
        raise InputFileError(path, "is not the first file of a split GGUF; give the"
                             f" -00001-of-{match['count']}.gguf file")
    count = int(match["count"])
    paths = [path.with_name(f"{match['prefix']}-{i:05d}-of-{count:05d}.gguf")
             for i in range(1, count + 1)]
    for part in paths:
        if not part.is_file():
            raise InputFileError(part, f"missing: split GGUF {path.name} has {count} files")
    return paths
