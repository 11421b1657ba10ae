"""An output folder that appears under its final name only when complete."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import MergeError


def check_output_path(target: Path, inputs: list[Path], force: bool) -> None:
    """Refuse an output that is, or lies inside, an input, or exists without --force."""
    resolved = target.resolve()
    for source in inputs:
        source = source.resolve()
        source_dir = source if source.is_dir() else source.parent
        if resolved == source or resolved == source_dir or source_dir in resolved.parents \
                or resolved in source.parents:
            raise MergeError(f"{target}: the output may not be, contain or lie inside the"
                             f" input {source}")
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
