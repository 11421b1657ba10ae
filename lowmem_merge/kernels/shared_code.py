"""Scalar code written once for the CPU and the CUDA kernels.

A function decorated with ``shared`` is an ordinary Numba CPU function. ``retarget``
rebuilds all the shared functions of a module from the same code objects for another
device: each twin sees the module's globals with the device's own PRIMITIVES and the other
twins put in, and is compiled by the device's decorator. So the codecs of
kernels/scalars.py, the keys and random draws of kernels/sparse.py and the quantizers of
kernels/quant_blocks.py run on the CPU and, through kernels/cuda/, on a GPU, and a fix in
one is a fix in both.

Shared code may use only what both Numba targets compile (scalars, loops, array indexing,
numpy scalar constructors), the primitives (kernels/primitives.py), for the operations whose
device spelling differs, and the shared functions of other modules.
"""

from __future__ import annotations

from collections.abc import Callable
from types import FunctionType, ModuleType
from typing import Any

from numba import njit

from . import primitives

# The operations each device spells its own way; the CPU's are kernels/primitives.py.
PRIMITIVES = tuple(primitives.__all__)
_SHARED: dict[str, list[str]] = {}  # module name -> its shared functions, in order
_ORIGIN: dict[int, str] = {}  # id of a shared CPU function (they live for good) -> its module


def shared(fn: Callable | None = None, *, inline: bool = True) -> Any:
    """Compile ``fn`` for the CPU, and mark it for ``retarget``.

    Numba inlines it into its callers (inline="always"), which also drops the reference
    counting of the arrays it takes; ``inline=False`` keeps a large, loop-heavy function
    whole, where LLVM optimises its loops better on their own."""
    def compile_cpu(fn: Callable) -> Any:
        _SHARED.setdefault(fn.__module__, []).append(fn.__name__)
        compiled = njit(inline="always" if inline else "never", cache=True, nogil=True,
                        error_model="numpy")(fn)
        _ORIGIN[id(compiled)] = fn.__module__
        return compiled

    return compile_cpu if fn is None else compile_cpu(fn)


def retarget(module: ModuleType, device_primitives: dict[str, Any],
             compile_device: Callable[[Callable], Any], name: str,
             links: tuple[ModuleType, ...] = ()) -> ModuleType:
    """A module ``name`` of the shared functions of ``module``, compiled for another device.

    ``links`` are modules retarget made for the same device from the modules ``module``
    takes shared functions from: their twins replace those functions. A module, because
    Numba resolves ``module.function`` in a kernel at compile time, as it does for the CPU
    kernels' ``quant_blocks.function``."""
    missing = set(PRIMITIVES) - set(device_primitives)
    if missing:
        raise ValueError(f"retarget needs the primitives {sorted(missing)}")
    namespace = dict(vars(module))
    namespace.update(device_primitives)
    for linked in links:
        _link(namespace, linked)
    _check_linked(namespace, module)
    twins = ModuleType(name, f"{module.__name__}'s shared functions for another device")
    twins.retargeted_from = module
    for function in _SHARED[module.__name__]:
        source = getattr(module, function).py_func
        twin = compile_device(FunctionType(source.__code__, namespace, function,
                                           source.__defaults__))
        setattr(twins, function, twin)
        namespace[function] = twin  # twins call twins: their calls resolve in namespace
    return twins


def _link(namespace: dict[str, Any], twins: ModuleType) -> None:
    """Put ``twins``' functions in place of their CPU originals, under any name."""
    source = twins.retargeted_from
    for function in _SHARED[source.__name__]:
        original = getattr(source, function)
        for key, value in namespace.items():
            if value is original:
                namespace[key] = getattr(twins, function)


def _check_linked(namespace: dict[str, Any], module: ModuleType) -> None:
    """A shared CPU function of another module still in the namespace is a missing link:
    twins calling it would fail only when a kernel first compiles, far from the cause."""
    for key, value in namespace.items():
        origin = _ORIGIN.get(id(value))
        if origin is not None and origin != module.__name__:
            raise ValueError(f"{module.__name__}.{key} is a shared function of {origin}: "
                             "pass retarget that module's twins in links")
