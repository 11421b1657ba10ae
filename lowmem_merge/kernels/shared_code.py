"""Scalar code written once for the CPU and the CUDA kernels.

A function decorated with ``shared`` is an ordinary Numba CPU function. ``retarget``
rebuilds all the shared functions of a module from the same code objects for another
device: each twin sees the module's globals with the device's own PRIMITIVES and the other
twins put in, and is compiled by the device's decorator. So a
quantizer written once in kernels/quant_blocks.py runs on the CPU and, through
kernels/cuda/gguf_quants.py, on a GPU, and a fix in one is a fix in both.

Shared code may use only what both Numba targets compile (scalars, loops, array indexing,
numpy scalar constructors) and the primitives, for the operations whose device spelling
differs.
"""

from __future__ import annotations

from collections.abc import Callable
from types import FunctionType, ModuleType
from typing import Any

from numba import njit

# The operations each device spells its own way (see quant_blocks.py for the CPU's).
PRIMITIVES = ("mul32", "floor32", "sqrt32", "to_int64", "bits_from_f32", "f32_from_bits",
              "half_to_f32")
_SHARED: dict[str, list[str]] = {}  # module name -> its shared functions, in order


def shared(fn: Callable | None = None, *, inline: bool = True) -> Any:
    """Compile ``fn`` for the CPU, and mark it for ``retarget``.

    Numba inlines it into its callers (inline="always"), which also drops the reference
    counting of the arrays it takes; ``inline=False`` keeps a large, loop-heavy function
    whole, where LLVM optimises its loops better on their own."""
    def compile_cpu(fn: Callable) -> Any:
        _SHARED.setdefault(fn.__module__, []).append(fn.__name__)
        return njit(inline="always" if inline else "never", cache=True, nogil=True,
                    error_model="numpy")(fn)

    return compile_cpu if fn is None else compile_cpu(fn)


def retarget(module: ModuleType, primitives: dict[str, Any],
             compile_device: Callable[[Callable], Any], name: str) -> ModuleType:
    """A module ``name`` of the shared functions of ``module``, compiled for another device.

    A module, because Numba resolves ``module.function`` in a kernel at compile time, as it
    does for the CPU kernels' ``quant_blocks.function``."""
    missing = set(PRIMITIVES) - set(primitives)
    if missing:
        raise ValueError(f"retarget needs the primitives {sorted(missing)}")
    namespace = dict(vars(module))
    namespace.update(primitives)
    twins = ModuleType(name, f"{module.__name__}'s shared functions for another device")
    for function in _SHARED[module.__name__]:
        source = getattr(module, function).py_func
        twin = compile_device(FunctionType(source.__code__, namespace, function,
                                           source.__defaults__))
        setattr(twins, function, twin)
        namespace[function] = twin  # twins call twins: their calls resolve in namespace
    return twins
