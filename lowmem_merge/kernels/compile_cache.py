"""Numba's on-disk cache of the kernels, made stale by a change to any kernel source file.

Numba keys a cached kernel on its own source file only (numba issue #1833): a kernel in
arrays.py keeps running the old codecs after a change to scalars.py, with no error, until
arrays.py itself changes. An editable install updated with ``git pull`` would merge with
old arithmetic. So the kernels' cache entries carry a digest of every source file of this
package as well: any change to one recompiles them all, once.

``install`` puts Numba's own locators (a user's NUMBA_CACHE_DIR, the source tree's
__pycache__, the user-wide cache) in front of its list, restricted to the files under a
root and stamped with the root's digest; functions elsewhere are cached as Numba always
does. It must run before the kernels are decorated, so kernels/__init__.py runs it first.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path
from typing import Any

from numba.core import caching

KERNELS = Path(__file__).resolve().parent
_BASES = ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator")


@cache
def sources_digest(root: Path) -> str:
    """SHA-256 of the names and contents of every .py file under root."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def stamped_locators(root: Path) -> list[type]:
    """Numba's file-backed locators, for the files under root, stamped with its digest."""
    root = root.resolve()

    class Stamped:
        stamped_root = root

        @classmethod
        def from_function(cls, py_func: Any, py_file: str) -> Any:
            if not Path(py_file).resolve().is_relative_to(root):
                return None
            return super().from_function(py_func, py_file)

        def get_source_stamp(self) -> Any:
            return super().get_source_stamp(), sources_digest(root)

    return [type(f"Stamped{name}", (Stamped, getattr(caching, name)), {"__module__": __name__})
            for name in _BASES]


def install(root: Path = KERNELS) -> bool:
    """Stamp the cache entries of the functions under root; False where this Numba keeps
    its locators elsewhere (its own per-file stamps then apply)."""
    locators = getattr(getattr(caching, "CacheImpl", None), "_locator_classes", None)
    if not isinstance(locators, list) or not all(hasattr(caching, name) for name in _BASES):
        return False
    root = root.resolve()
    if not any(getattr(locator, "stamped_root", None) == root for locator in locators):
        locators[0:0] = stamped_locators(root)
    return True
