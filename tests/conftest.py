import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# The CUDA kernels' tests run on Numba's CUDA simulator unless a real GPU is asked for; numba
# reads this when it is first imported, so it is set before any test module imports it.
if os.environ.get("LOWMEM_TEST_REAL_CUDA") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")


@pytest.fixture(autouse=True)
def _fast_cuda_simulator(request):
    """The simulator runs every CUDA thread as a Python thread that waits on the others at
    each barrier; on an idle multi-core machine the default 5 ms GIL switch interval makes
    those hand-offs very slow. A short one makes the CUDA tests several times faster."""
    if not request.module.__name__.startswith("test_cuda"):
        yield
        return
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(previous)
