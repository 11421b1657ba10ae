"""The journal of an output under construction: how many tensors are durably written.

One JSON line per checkpoint, appended and fsynced after the data it counts
was fdatasynced, so after a crash at any point (SIGKILL, power loss) the last
complete line is true. The first line holds the plan's fingerprint: a resumed
run continues only the very same plan.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import MergeError

JOURNAL_NAME = "journal.jsonl"


class Journal:
    def __init__(self, folder: Path, fingerprint: str, resume: bool) -> None:
        self.path = folder / JOURNAL_NAME
        self.done = 0
        if resume and self.path.is_file():
            self.done = _read_done(self.path, fingerprint)
        else:
            _create(self.path, fingerprint)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def record(self, tensors_done: int) -> None:
        """All tensors before tensors_done (in plan order) are on disk, synced."""
        os.write(self._fd, (json.dumps({"tensors": tensors_done}) + "\n").encode())
        os.fsync(self._fd)
        self.done = tensors_done

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _create(path: Path, fingerprint: str) -> None:
    """Write the header line under a temporary name first: a journal is whole or absent."""
    temporary = path.with_name(path.name + ".new")
    with open(temporary, "w") as handle:
        handle.write(json.dumps({"fingerprint": fingerprint}) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _read_done(path: Path, fingerprint: str) -> int:
    lines = path.read_bytes().split(b"\n")
    try:
        header = json.loads(lines[0])
    except ValueError:
        header = None
    if not isinstance(header, dict):  # torn by a crash before anything was recorded
        _create(path, fingerprint)
        return 0
    if header.get("fingerprint") != fingerprint:
        raise MergeError(
            f"{path.parent}: the interrupted merge there was for a different plan (inputs,"
            " method, parameters or output type changed); run without --resume to start over")
    done = 0
    for line in lines[1:]:
        try:
            done = int(json.loads(line)["tensors"])
        except (ValueError, KeyError, TypeError):
            break  # a line torn by the crash ends the journal
    return done
