"""Files whose headers are final up front, filled with tensor data in plan order.

Output sizes do not depend on the data, so each file's header is written
first and the tensor bytes are appended as they are produced, never held
whole in memory. Formats differ only in their headers and in the padding
they want after each tensor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .writeback import WriteBack


@dataclass
class PlannedFile:
    name: str
    header: bytes
    sizes: list[int]  # data bytes of each tensor, in order
    alignment: int = 1  # each tensor's data is followed by zero padding to a multiple of this

    @property
    def data_bytes(self) -> int:
        return sum(size + -size % self.alignment for size in self.sizes)


@dataclass
class _Position:
    file: int = -1
    tensor: int = 0
    left: int = 0  # bytes still due for the current tensor
    done: list[int] = field(default_factory=list)


class SequentialFileWriter:
    """Accepts the bytes of all tensors, in order, and spreads them over the planned files."""

    def __init__(self, folder: Path, files: list[PlannedFile]) -> None:
        self.folder = folder
        self.files = files
        self._at = _Position()
        self._fd = -1
        self._offset = 0
        self._writeback: WriteBack | None = None
        self._open_next()

    def _open_next(self) -> None:
        self._close_current()
        self._at = _Position(self._at.file + 1)
        planned = self.files[self._at.file]
        self._fd = os.open(self.folder / planned.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                           0o644)
        self._offset = 0
        self._writeback = WriteBack(self._fd)
        self._write_all(memoryview(planned.header))
        self._start_tensor()

    def _start_tensor(self) -> None:
        sizes = self.files[self._at.file].sizes
        self._at.left = sizes[self._at.tensor] if self._at.tensor < len(sizes) else 0

    def _end_tensor(self) -> None:
        planned = self.files[self._at.file]
        padding = -planned.sizes[self._at.tensor] % planned.alignment
        if padding:
            self._write_all(memoryview(bytes(padding)))
        self._at.tensor += 1
        self._start_tensor()

    def _file_full(self) -> bool:
        return self._at.tensor >= len(self.files[self._at.file].sizes)

    def write(self, data: memoryview) -> None:
        """Append the next bytes of tensor data (any split across tensors and files)."""
        data = data.cast("B")
        while len(data):
            while self._file_full():
                self._open_next()
            take = min(len(data), self._at.left)
            self._write_all(data[:take])
            self._at.left -= take
            data = data[take:]
            if self._at.left == 0:
                self._end_tensor()

    def _write_all(self, data: memoryview) -> None:
        while len(data):
            count = os.write(self._fd, data)
            data = data[count:]
            self._offset += count
        self._writeback.wrote(self._offset)

    def _close_current(self) -> None:
        if self._fd < 0:
            return
        # Zero-size tensors are complete without any write.
        while not self._file_full() and self._at.left == 0:
            self._end_tensor()
        if not self._file_full():
            raise RuntimeError(f"{self.files[self._at.file].name} is short of tensor data")
        os.fsync(self._fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(self._fd)
        self._fd = -1

    def finish(self) -> None:
        """Close the last file; every file must be complete."""
        while self._at.file < len(self.files) - 1:
            self._open_next()
        self._close_current()

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
