import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# The CUDA kernels' tests run on Numba's CUDA simulator unless a real GPU is asked for; numba
# reads this when it is first imported, so it is set before any test module imports it.
if os.environ.get("LOWMEM_TEST_REAL_CUDA") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")


@pytest.fixture(autouse=True, scope="module")
def _cuda_modules(request):
    """The CUDA modules run on a GPU only when one is usable, and otherwise on the simulator
    with its shared arrays allocated atomically (see cudasim_shared.py) and a short GIL switch
    interval: the simulator runs each CUDA thread as a Python thread and polls them at every
    barrier, and with the default 5 ms interval those hand-offs made these tests up to 3 times
    slower on an idle machine."""
    if not request.module.__name__.startswith("test_cuda"):
        yield
        return
    pytest.importorskip("numba_cuda", reason="numba-cuda is not installed (CUDA path)")
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        from lowmem_merge.engine.devices import cuda_problem

        problem = cuda_problem()
        if problem:
            pytest.skip(f"LOWMEM_TEST_REAL_CUDA=1, but {problem}")
        yield
        return
    from cudasim_shared import make_shared_arrays_atomic

    make_shared_arrays_atomic()
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(previous)
