"""A child memory cgroup with a hard limit, for running a merge under a real memory cap.

cgroup v2 (memory.max) or v1 (memory.limit_in_bytes), beside this process's own
cgroup; CgroupUnavailable says why one cannot be made here.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


class CgroupUnavailable(Exception):
    pass


class MemoryCgroup:
    def __init__(self, path: Path, version: int) -> None:
        self.path = path
        self.version = version

    @classmethod
    def create(cls, limit: int, name: str = "lowmem-merge-test") -> MemoryCgroup:
        for version, parent in _parents():
            child = parent / f"{name}-{os.getpid()}"
            try:
                child.mkdir(exist_ok=True)
                group = cls(child, version)
                group._set_limit(limit)
                return group
            except OSError as exc:
                reason = f"{child}: {exc.strerror or exc}"
                with contextlib.suppress(OSError):
                    child.rmdir()
                raise CgroupUnavailable(reason) from None
        raise CgroupUnavailable("no writable memory cgroup (v1 or v2) for this process")

    def _set_limit(self, limit: int) -> None:
        if self.version == 2:
            (self.path / "memory.max").write_text(str(limit))
            swap = self.path / "memory.swap.max"
            if swap.exists():
                swap.write_text("0")
        else:
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
            swap = self.path / "memory.memsw.limit_in_bytes"
            if swap.exists():
                with contextlib.suppress(OSError):  # swap accounting off: RAM is still capped
                    swap.write_text(str(limit))

    def enter(self) -> None:
        """Move the calling process in (use as a subprocess preexec_fn)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int | None:
        """Highest usage seen (v1 counts the page cache too; v2 needs memory.peak)."""
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            return int((self.path / name).read_text().split()[0])
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int:
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except OSError:
            pass
        return 0

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.rmdir()


def _parents():
    """(version, folder) where a child memory cgroup of this process's cgroup can go."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            folder = ROOT / "memory" / path.lstrip("/")
            if folder.is_dir():
                yield 1, folder
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            folder = ROOT / path.lstrip("/")
            if "memory" in (folder / "cgroup.controllers").read_text().split() \
                    if (folder / "cgroup.controllers").exists() else False:
                yield 2, folder
