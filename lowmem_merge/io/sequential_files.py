"""Files whose headers are final up front, filled with tensor data in plan order.

Output sizes do not depend on the data, so each file's header is written
first and the tensor bytes are appended as they are produced, never held
whole in memory. Formats differ only in their headers and in the padding
they want after each tensor.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MergeError
from .writeback import WINDOW, WriteBack


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
    tensors_before: int = 0  # tensors in the files before this one


# Checkpoints (data synced, then the callback) come at most this often.
CHECKPOINT_BYTES = 256 * 1024**2
CHECKPOINT_SECONDS = 10.0
Checkpoint = Callable[[int], None]  # called with the number of tensors durably written


class SequentialFileWriter:
    """Accepts the bytes of all tensors, in order, and spreads them over the planned files.

    start() may resume after the first tensors: their files are kept and the
    file being written is cut back to the end of the last finished tensor.
    """

    def __init__(self, folder: Path, files: list[PlannedFile], digest: Any = None) -> None:
        """digest: a hashlib object fed every byte written (for a writer started at 0)."""
        self.folder = folder
        self.files = files
        self.digest = digest
        self._at = _Position()
        self._fd = -1
        self._offset = 0
        self._writeback: WriteBack | None = None
        self._on_checkpoint: Checkpoint | None = None
        self._checkpoint_bytes = CHECKPOINT_BYTES
        self._last_checkpoint = (0, 0.0)  # (offset, time) in the current file
        self._started = False
        self._window = WINDOW

    @property
    def tensor_count(self) -> int:
        return sum(len(f.sizes) for f in self.files)

    def start(self, done: int = 0, on_checkpoint: Checkpoint | None = None,
              checkpoint_bytes: int = CHECKPOINT_BYTES, window: int = WINDOW) -> None:
        """Begin writing after the first `done` tensors, which are already on disk.

        window: write-back window; the file keeps at most two of them dirty.
        """
        self._window = window
        self._on_checkpoint = on_checkpoint
        self._checkpoint_bytes = checkpoint_bytes
        self._started = True
        before = 0
        for index, planned in enumerate(self.files):
            if done < before + len(planned.sizes) or not planned.sizes:
                self._open_file(index, done - before, before)
                return
            before += len(planned.sizes)
        last = self.files[-1]  # everything is on disk already
        self._at = _Position(len(self.files) - 1, len(last.sizes),
                             tensors_before=before - len(last.sizes))

    def _open_next(self) -> None:
        self._close_current()
        index = self._at.file
        self._open_file(index + 1, 0, self._at.tensors_before + len(self.files[index].sizes))

    def _open_file(self, index: int, within: int, before: int) -> None:
        """Open file `index` to write from its tensor `within` on (0: a new file)."""
        planned = self.files[index]
        path = self.folder / planned.name
        offset = len(planned.header) + sum(size + -size % planned.alignment
                                           for size in planned.sizes[:within])
        if within == 0:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        elif not path.is_file() or path.stat().st_size < offset:
            raise MergeError(f"{path}: shorter than its journal says; run without --resume"
                             " to start over")
        else:
            self._fd = os.open(path, os.O_WRONLY)
            os.ftruncate(self._fd, offset)
            os.lseek(self._fd, offset, os.SEEK_SET)
        self._offset = 0 if within == 0 else offset
        self._writeback = WriteBack(self._fd, self._window, start=self._offset)
        self._at = _Position(index, within, tensors_before=before)
        if within == 0:
            self._write_all(memoryview(planned.header))
        self._last_checkpoint = (self._offset, time.monotonic())
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
        self._maybe_checkpoint()

    def _maybe_checkpoint(self) -> None:
        offset, when = self._last_checkpoint
        if self._on_checkpoint is None or self._file_full():
            return  # a full file is checkpointed when it is closed, after its fsync
        if self._offset - offset < self._checkpoint_bytes \
                and time.monotonic() - when < CHECKPOINT_SECONDS:
            return
        os.fdatasync(self._fd)
        self._last_checkpoint = (self._offset, time.monotonic())
        self._on_checkpoint(self._at.tensors_before + self._at.tensor)

    def _file_full(self) -> bool:
        return self._at.tensor >= len(self.files[self._at.file].sizes)

    def write(self, data: memoryview) -> None:
        """Append the next bytes of tensor data (any split across tensors and files)."""
        if not self._started:
            self.start()
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
        if self.digest is not None:
            self.digest.update(data)
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
        if self._on_checkpoint is not None:
            self._on_checkpoint(self._at.tensors_before + self._at.tensor)

    def finish(self) -> None:
        """Close the last file (every file must be complete), then write any index."""
        if not self._started:
            self.start()
        while self._at.file < len(self.files) - 1:
            self._open_next()
        self._close_current()
        self.write_index()

    def write_index(self) -> None:
        """A file naming the others, for formats that have one (written last)."""

    def check_sizes(self) -> None:
        """Every file holds exactly its header and all its tensors' bytes."""
        for planned in self.files:
            path = self.folder / planned.name
            expected = len(planned.header) + planned.data_bytes
            if path.stat().st_size != expected:
                raise MergeError(f"{path}: {path.stat().st_size} bytes written, {expected}"
                                 " planned")

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
