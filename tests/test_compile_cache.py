"""Numba's disk cache with the kernels' source digest (kernels/compile_cache.py): a kernel
whose callee changed in another file is compiled again, where Numba alone keeps the old one."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lowmem_merge.kernels import compile_cache

CALLER = """
from numba import njit
from callee import step

@njit(cache=True)
def twice():
    return 2 * step()
"""
CALLEE = """
from numba import njit

@njit(cache=True, inline="{inline}")
def step():
    return {value}
"""
RUN = """
import sys
sys.path.insert(0, {root!r})
if {stamped}:
    from pathlib import Path
    from lowmem_merge.kernels.compile_cache import install
    assert install(Path({root!r}))
from caller import twice
print(twice())
"""


def _twice(root: Path, stamped: bool) -> int:
    script = RUN.format(root=str(root), stamped=stamped)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.mark.parametrize("inline", ["always", "never"])
def test_a_changed_callee_in_another_file_recompiles_its_caller(tmp_path, inline):
    (tmp_path / "caller.py").write_text(textwrap.dedent(CALLER))
    callee = tmp_path / "callee.py"
    callee.write_text(CALLEE.format(inline=inline, value=1))
    assert _twice(tmp_path, stamped=True) == 2
    assert list((tmp_path / "__pycache__").glob("caller.twice-*.nbi"))  # cached, then reused
    callee.write_text(CALLEE.format(inline=inline, value=5))
    assert _twice(tmp_path, stamped=True) == 10


def test_numba_alone_keeps_the_stale_kernel(tmp_path):
    """The hazard compile_cache exists for. If this fails, Numba tracks dependencies now and
    compile_cache can go."""
    (tmp_path / "caller.py").write_text(textwrap.dedent(CALLER))
    callee = tmp_path / "callee.py"
    callee.write_text(CALLEE.format(inline="always", value=1))
    assert _twice(tmp_path, stamped=False) == 2
    callee.write_text(CALLEE.format(inline="always", value=5))
    assert _twice(tmp_path, stamped=False) == 2


def test_the_package_kernels_are_stamped():
    from lowmem_merge.kernels import arrays

    stamp = arrays.encode_array._cache._cache_file._source_stamp
    assert stamp[1] == compile_cache.sources_digest(compile_cache.KERNELS)


def test_the_digest_follows_names_and_contents(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    first = compile_cache.sources_digest.__wrapped__(tmp_path)
    (tmp_path / "a.py").write_text("x = 2\n")
    second = compile_cache.sources_digest.__wrapped__(tmp_path)
    (tmp_path / "a.py").rename(tmp_path / "b.py")
    third = compile_cache.sources_digest.__wrapped__(tmp_path)
    assert len({first, second, third}) == 3
