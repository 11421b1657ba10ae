"""How much memory a merge may use, and the chunk size that follows from it."""

from __future__ import annotations

import resource
from pathlib import Path

import psutil

from ..errors import MergeError
from ..units import format_bytes

# Chunks start at multiples of this many elements, a multiple of the kernels'
# reduction block, so statistics do not depend on the chunk size.
CHUNK_ALIGN = 65536
# Headroom for the interpreter's own transient allocations during a merge.
RESERVE_BYTES = 48 * 1024**2


def cgroup_memory_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The tightest memory limit of this process's cgroup (v2 or v1), if any."""
    limits = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: check the cgroup and its ancestors
            node = root / path.lstrip("/")
            while True:
                limits.append(_read_limit(node / "memory.max"))
                if node == root or root not in node.parents:
                    break
                node = node.parent
        elif "memory" in controllers.split(","):
            limits.append(_read_limit(root / "memory" / path.lstrip("/")
                                      / "memory.limit_in_bytes"))
            limits.append(_read_limit(root / "memory" / "memory.limit_in_bytes"))
    found = [limit for limit in limits if limit is not None]
    return min(found) if found else None


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max" or not text.isdigit():
        return None
    value = int(text)
    return value if value < 1 << 60 else None  # v1 reports "unlimited" as a huge number


def default_budget() -> tuple[int, str]:
    """Half of the available memory, and at most 80% of a cgroup limit; and which it was."""
    available = psutil.virtual_memory().available
    budget, source = available // 2, f"half of the {format_bytes(available)} available"
    limit = cgroup_memory_limit()
    if limit is not None and int(limit * 0.8) < budget:
        budget, source = int(limit * 0.8), f"80% of the cgroup limit {format_bytes(limit)}"
    return budget, source


def default_max_memory() -> int:
    return default_budget()[0]


def current_rss() -> int:
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def chunk_elements(max_memory: int, bytes_per_element: int) -> int:
    """Largest aligned chunk whose buffers fit what the budget leaves after the process."""
    working = max_memory - current_rss() - RESERVE_BYTES
    elements = (max(working, 0) // bytes_per_element) // CHUNK_ALIGN * CHUNK_ALIGN
    if elements < CHUNK_ALIGN:
        need = current_rss() + RESERVE_BYTES + CHUNK_ALIGN * bytes_per_element
        raise MergeError(
            f"--max-memory {format_bytes(max_memory)} is too small: this merge needs at least"
            f" {format_bytes(need)} (the process itself uses {format_bytes(current_rss())})")
    return elements
