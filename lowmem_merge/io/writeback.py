"""Bounded dirty page cache for streaming writes, without stalling on the newest data.

Each finished window of the file is handed to the kernel for write-back at
once (sync_file_range WRITE, which does not wait); the window before it is
then waited for and dropped from the page cache. Dirty pages stay under two
windows, which matters under a cgroup memory limit, and the writer rarely
blocks. Where sync_file_range is missing, fdatasync every few windows does
the same job less smoothly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

WINDOW = 64 * 1024 * 1024


def window_for(budget: int) -> int:
    """A window that keeps dirty pages (two windows) within 1/8 of a memory budget."""
    return max(4 * 1024**2, min(WINDOW, budget // 16 // 1024**2 * 1024**2))
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4


def _load_sync_file_range():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _load_sync_file_range()


class WriteBack:
    """Call wrote(position) after each write; windows behind it are flushed and dropped."""

    def __init__(self, fd: int, window: int = WINDOW, start: int = 0) -> None:
        self.fd = fd
        self.window = window
        self.started = start // window * window  # write-back requested up to here
        self.dropped = self.started  # written back and dropped up to here

    def wrote(self, position: int) -> None:
        while position - self.started >= self.window:
            self._start(self.started)
            self.started += self.window
            if self.started - self.dropped > self.window:
                self._finish(self.dropped)
                self.dropped += self.window

    def _start(self, offset: int) -> None:
        started = _SYNC_FILE_RANGE is not None \
            and _SYNC_FILE_RANGE(self.fd, offset, self.window, _WRITE) == 0
        if not started and (offset // self.window) % 4 == 3:
            os.fdatasync(self.fd)

    def _finish(self, offset: int) -> None:
        if _SYNC_FILE_RANGE is not None:
            _SYNC_FILE_RANGE(self.fd, offset, self.window, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, offset, self.window, os.POSIX_FADV_DONTNEED)
