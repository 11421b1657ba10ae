"""Which tensors a GPU merges: --device, --max-gpu-memory and the size threshold.

The plan and the methods are the same on every device; only the backend serving the
dispatched kernels changes (kernels/dispatch.py). numba-cuda is imported only here and in
kernels/cuda, and only when a GPU may be used, so users without the extra see no change.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

from ..errors import MergeError
from ..kernels.dispatch import CPU
from ..units import format_bytes
from .tensors import TensorTask

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
# --device auto sends a merged tensor to the GPU from this many elements. Not yet measured
# on a GPU (see the README): below a few million elements the copies and launches cost
# more than the CPU kernels save.
GPU_MIN_ELEMENTS = 1 << 22
# Share of the device's free memory used when --max-gpu-memory is not given.
GPU_MEMORY_SHARE = 0.8
SIMULATOR_BUDGET = 256 * 1024**2  # the simulator reports infinite memory


@dataclass(frozen=True)
class DevicePlan:
    """The backend of each device in use, and what the plan says about them."""

    requested: str
    description: str
    gpu: Any | None = None  # a CudaKernels, when some tensor runs on the GPU
    gpu_budget: int = 0

    def backend_for(self, task: TensorTask) -> Any:
        return self.gpu if task.device == "cuda" else CPU

    def host_buffer(self, nbytes: int) -> Any:
        """Pinned host memory when a GPU is in use (asynchronous copies), else plain."""
        return (self.gpu or CPU).host_buffer(nbytes)


CPU_ONLY = DevicePlan("cpu", "cpu")


def cuda_problem() -> str | None:
    """Why no CUDA device can be used here, or None when one can."""
    if importlib.util.find_spec("numba_cuda") is None:
        return "numba-cuda is not installed (pip install 'lowmem-merge[cuda]')"
    from numba import config, cuda

    if config.ENABLE_CUDASIM:
        return None
    try:
        count = len(cuda.gpus)
    except Exception as exc:  # noqa: BLE001 - CudaSupportError and driver errors alike
        return f"no usable CUDA driver ({_driver_message(exc)})"
    if count == 0:
        return "the CUDA driver sees no GPU"
    return None


def plan_devices(tasks: list[TensorTask], requested: str,
                 max_gpu_memory: int | None) -> DevicePlan:
    """Assign each merged tensor a device; open the GPU when one will be used."""
    if requested not in DEVICES:
        raise MergeError(f"--device {requested!r}: use {', '.join(DEVICES)}")
    for task in tasks:
        task.device = "cpu"
    if requested == "cpu":
        return CPU_ONLY
    threshold = 1 if requested == "cuda" else GPU_MIN_ELEMENTS
    chosen = [t for t in tasks if t.merge is not None and t.numel >= threshold]
    if not chosen and requested == "auto":  # no need to look for a GPU (nor load its driver)
        return DevicePlan("auto", f"cpu (auto: no tensor of {GPU_MIN_ELEMENTS:,} elements"
                          " or more)")
    problem = cuda_problem()
    if problem is None and requested == "auto" and _simulated():
        problem = "only Numba's CUDA simulator is available (--device cuda uses it)"
    if problem is not None:
        if requested == "cuda":
            raise MergeError(f"--device cuda: {problem}")
        log.info("--device auto: merging on the CPU: %s", problem)
        return DevicePlan("auto", f"cpu (auto: {problem})")
    for task in chosen:
        task.device = "cuda"
    return _open_gpu(requested, max_gpu_memory)


def _driver_message(exc: Exception) -> str:
    """The informative line of a driver error (numba wraps it in boilerplate)."""
    lines = [line.strip(" :") for line in str(exc).splitlines()]
    lines = [line for line in lines if line and not line.startswith("Error at driver init")]
    return lines[0] if lines else type(exc).__name__


def _simulated() -> bool:
    from numba import config

    return bool(config.ENABLE_CUDASIM)


def _open_gpu(requested: str, max_gpu_memory: int | None) -> DevicePlan:
    from numba import cuda

    from ..kernels.cuda.backend import CudaKernels

    if _simulated():
        name, free = "Numba CUDA simulator", SIMULATOR_BUDGET
    else:
        device = cuda.get_current_device()
        name = device.name.decode() if isinstance(device.name, bytes) else str(device.name)
        free = int(cuda.current_context().get_memory_info().free * GPU_MEMORY_SHARE)
    budget = min(max_gpu_memory, free) if max_gpu_memory is not None else free
    try:
        backend = CudaKernels(budget)
    except ValueError as exc:
        raise MergeError(f"--max-gpu-memory: {exc}") from None
    return DevicePlan(requested, f"cuda: {name}, budget {format_bytes(budget)}", backend,
                      budget)
