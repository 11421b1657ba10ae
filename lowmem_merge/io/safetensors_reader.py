"""Validated safetensors headers and positioned reads into caller-owned buffers.

Every file is untrusted: the header is parsed with limits and checked before
any tensor data is touched, and nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputFileError

# Bytes per element of every dtype the safetensors format defines.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: file, absolute offset and length.

    dtype is a safetensors dtype or a ggml type name (Q4_K, ...); data comes in
    blocks of block_elements elements and block_bytes bytes (1 element for
    plain dtypes). When the model's tensors are presented under the other
    format's names, Llama-family q/k weights have their rows permuted within
    each of permute_heads heads (0: stored order).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    offset: int
    nbytes: int
    block_elements: int = 1
    block_bytes: int = 0  # 0: DTYPE_SIZES[dtype]
    permute_heads: int = 0
    permute_to_gguf: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bytes_per_block(self) -> int:
        return self.block_bytes or DTYPE_SIZES[self.dtype]

    def byte_span(self, start: int, count: int) -> tuple[int, int]:
        """Absolute offset and length of elements [start, start + count), whole blocks."""
        if start % self.block_elements or (count % self.block_elements
                                           and start + count != self.numel):
            raise ValueError(f"{self.name}: elements {start}+{count} are not whole blocks"
                             f" of {self.block_elements}")
        first = start // self.block_elements
        blocks = -(-count // self.block_elements)
        return self.offset + first * self.bytes_per_block, blocks * self.bytes_per_block

    @property
    def permuted_unit(self) -> int:
        """Elements of one head's rows: chunks of a permuted tensor hold whole heads."""
        if not self.permute_heads:
            return 1
        return self.numel // self.permute_heads


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one file's header: tensors by name, and its __metadata__."""
    file_size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise InputFileError(path, "too short to be a safetensors file (no header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
            raise InputFileError(
                path, f"header length {header_len} is beyond the file ({file_size} bytes)"
                " or absurdly large: not a safetensors file or truncated")
        raw_header = handle.read(header_len)
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(path, f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise InputFileError(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise InputFileError(path, "__metadata__ is not a JSON object")
    data_start = 8 + header_len
    tensors = {name: _tensor_info(path, name, entry, data_start, file_size - data_start)
               for name, entry in header.items()}
    _check_no_overlap(path, tensors)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _tensor_info(path: Path, name: str, entry: object, data_start: int,
                 data_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise InputFileError(path, f"tensor {name!r}: header entry is not an object")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise InputFileError(path, f"tensor {name!r}: unknown dtype {dtype!r}")
    if not (isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise InputFileError(path, f"tensor {name!r}: shape {shape!r} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise InputFileError(path,
                             f"tensor {name!r}: data_offsets {offsets!r} are not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise InputFileError(
            path, f"tensor {name!r}: data_offsets [{begin}, {end}] lie outside the"
            f" {data_size} data bytes")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise InputFileError(
            path, f"tensor {name!r}: shape {shape} of {dtype} needs {expected} bytes,"
            f" data_offsets give {end - begin}")
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, end - begin)


def _check_no_overlap(path: Path, tensors: dict[str, TensorInfo]) -> None:
    ordered = sorted((t for t in tensors.values() if t.nbytes), key=lambda t: t.offset)
    for before, after in zip(ordered, ordered[1:]):
        if after.offset < before.offset + before.nbytes:
            raise InputFileError(
                path, f"tensors {before.name!r} and {after.name!r} overlap in the data")


class RangeReader:
    """Positioned reads with open file descriptors kept per file.

    Read pages are dropped from the page cache afterwards, since a merge never
    rereads them soon and cached pages count against a cgroup memory limit.
    """

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self._fds[path] = fd
        return fd

    def read_into(self, path: Path, offset: int, buffer: memoryview) -> None:
        view = buffer.cast("B")
        if not len(view):
            return  # (fadvise with length 0 would mean "to the end of the file")
        fd = self._fd(path)
        done = 0
        while done < len(view):
            count = os.preadv(fd, [view[done:]], offset + done)
            if count == 0:
                raise InputFileError(path,
                                     f"file ends early: expected data at byte {offset + done}")
            done += count
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, offset, len(view), os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
