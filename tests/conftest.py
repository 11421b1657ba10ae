import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# The CUDA kernels' tests run on Numba's CUDA simulator unless a real GPU is asked for; numba
# reads this when it is first imported, so it is set before any test module imports it.
if os.environ.get("LOWMEM_TEST_REAL_CUDA") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
