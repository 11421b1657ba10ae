"""An output folder that appears under its final name only when complete."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from pathlib import Path

from ..errors import MergeError
from .journal import FILES_JOURNAL_NAME, JOURNAL_NAME

log = logging.getLogger(__name__)
STAGING_SUFFIX = ".partial"
LOCK_NAME = ".lock"
# Files of the staging folder that are not output.
BOOKKEEPING = (LOCK_NAME, JOURNAL_NAME, FILES_JOURNAL_NAME)


def check_output_path(target: Path, files: list[Path], folders: list[Path],
                      force: bool) -> None:
    """Refuse an output that is or contains an input file, or lies inside an input folder;
    refuse to replace an existing output without force."""
    resolved = target.resolve()
    for source in files:
        source = source.resolve()
        if resolved == source or resolved in source.parents:
            raise MergeError(f"{target}: the output would replace the input {source}")
    for folder in folders:
        folder = folder.resolve()
        if resolved == folder or folder in resolved.parents:
            raise MergeError(f"{target}: the output may not be or lie inside the input"
                             f" model folder {folder}")
    if target.exists() and not force:
        raise MergeError(f"{target}: already exists; pass --force to replace it")


class OutputFolder:
    """Work happens in a hidden sibling folder, renamed over the target on commit.

    The folder's name is fixed (.NAME.partial), so an interrupted merge can be
    resumed from it; a lock in it keeps two merges from writing one output.
    """

    def __init__(self, target: Path, resume: bool = False) -> None:
        self.target = target
        target.parent.mkdir(parents=True, exist_ok=True)
        self.staging = target.parent / f".{target.name}{STAGING_SUFFIX}"
        self._lock = -1
        if self.staging.is_dir():
            self._take_lock()
            if not resume:
                log.warning("%s: output of an interrupted merge, removed; pass --resume to"
                            " continue such a merge instead", self.staging)
                self._release_lock()
                shutil.rmtree(self.staging)
        self.resumed = self.staging.is_dir()
        self.staging.mkdir(exist_ok=True)
        if self._lock < 0:
            self._take_lock()

    def _take_lock(self) -> None:
        self._lock = os.open(self.staging / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._release_lock()
            raise MergeError(f"{self.target}: another lowmem-merge is writing this output"
                             f" (in {self.staging})") from None

    def _release_lock(self) -> None:
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    def commit(self) -> None:
        for name in BOOKKEEPING:
            (self.staging / name).unlink(missing_ok=True)
        fsync_path(self.staging)
        self._release_lock()
        if self.target.exists():
            retired = self.target.parent / f".{self.target.name}.replaced-{os.getpid()}"
            os.rename(self.target, retired)
            os.rename(self.staging, self.target)
            shutil.rmtree(retired) if retired.is_dir() else retired.unlink()
        else:
            os.rename(self.staging, self.target)
        fsync_path(self.target.parent)

    def keep(self) -> None:
        """Leave the work so far for --resume."""
        self._release_lock()

    def abort(self) -> None:
        self._release_lock()
        shutil.rmtree(self.staging, ignore_errors=True)


def fsync_path(path: Path) -> None:
    """Sync a file's or a folder's entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OutputFiles:
    """Files made in a hidden sibling folder and moved beside it on commit, first file last,
    so a complete first file (the one users open) means a complete set."""

    def __init__(self, target: Path, resume: bool = False) -> None:
        self.folder = OutputFolder(target, resume)
        self.staging = self.folder.staging
        self.resumed = self.folder.resumed

    def commit(self, names: list[str]) -> None:
        parent = self.folder.target.parent
        for name in names:
            fsync_path(self.staging / name)
        for name in reversed(names):
            os.replace(self.staging / name, parent / name)
        fsync_path(parent)
        self.folder.abort()  # only the bookkeeping is left

    def keep(self) -> None:
        self.folder.keep()

    def abort(self) -> None:
        self.folder.abort()
