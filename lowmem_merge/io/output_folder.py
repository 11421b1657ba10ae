"""An output folder that appears under its final name only when complete."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import MergeError


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
    """Work happens in a hidden sibling folder, renamed over the target on commit."""

    def __init__(self, target: Path) -> None:
        self.target = target
        target.parent.mkdir(parents=True, exist_ok=True)
        self.staging = target.parent / f".{target.name}.partial-{os.getpid()}"
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir()

    def commit(self) -> None:
        fd = os.open(self.staging, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if self.target.exists():
            retired = self.target.parent / f".{self.target.name}.replaced-{os.getpid()}"
            os.rename(self.target, retired)
            os.rename(self.staging, self.target)
            shutil.rmtree(retired) if retired.is_dir() else retired.unlink()
        else:
            os.rename(self.staging, self.target)

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


class OutputFiles:
    """Files made in a hidden sibling folder and moved beside it on commit, first file last,
    so a complete first file (the one users open) means a complete set."""

    def __init__(self, target: Path) -> None:
        self.folder = OutputFolder(target)
        self.staging = self.folder.staging

    def commit(self, names: list[str]) -> None:
        parent = self.folder.target.parent
        for name in names:
            fd = os.open(self.staging / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for name in reversed(names):
            os.replace(self.staging / name, parent / name)
        shutil.rmtree(self.staging)

    def abort(self) -> None:
        self.folder.abort()
