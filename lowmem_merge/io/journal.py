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
FILES_JOURNAL_NAME = "files-journal.jsonl"


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


def _entries(path: Path, fingerprint: str) -> list[dict] | None:
    """The checkpoint lines after the header, up to the first torn one; None if the header
    itself is torn (the journal is then made anew)."""
    lines = path.read_bytes().split(b"\n")
    try:
        header = json.loads(lines[0])
    except ValueError:
        header = None
    if not isinstance(header, dict):  # torn by a crash before anything was recorded
        _create(path, fingerprint)
        return None
    if header.get("fingerprint") != fingerprint:
        raise MergeError(
            f"{path.parent}: the interrupted merge there was for a different plan (inputs,"
            " method, parameters or output type changed); run without --resume to start over")
    entries = []
    for line in lines[1:]:
        try:
            entry = json.loads(line)
        except ValueError:
            break  # a line torn by the crash ends the journal
        if not isinstance(entry, dict):
            break
        entries.append(entry)
    return entries


def _read_done(path: Path, fingerprint: str) -> int:
    done = 0
    for entry in _entries(path, fingerprint) or []:
        try:
            done = int(entry["tensors"])
        except (ValueError, KeyError, TypeError):
            break
    return done


class FileJournal:
    """The journal of an output whose files are written independently (one per task).

    A line per finished file, with its size and SHA-256, appended and fsynced after the
    file was synced and renamed into place. The first line is the plan's fingerprint, as in
    Journal; a file listed here is never written again by --resume.
    """

    def __init__(self, folder: Path, fingerprint: str, resume: bool) -> None:
        self.path = folder / FILES_JOURNAL_NAME
        self.done: dict[str, dict] = {}
        if resume and self.path.is_file():
            self.done = _read_files(self.path, fingerprint)
        else:
            _create(self.path, fingerprint)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def record(self, entry: dict) -> None:
        """``entry`` (file, bytes, sha256, ...) is durably on disk under its final name."""
        os.write(self._fd, (json.dumps(entry) + "\n").encode())
        os.fsync(self._fd)
        self.done[entry["file"]] = entry

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _read_files(path: Path, fingerprint: str) -> dict[str, dict]:
    done = {}
    for entry in _entries(path, fingerprint) or []:
        if not isinstance(entry.get("file"), str):
            break
        done[entry["file"]] = entry
    return done
