"""Compile every CUDA kernel for real GPUs, with no GPU, and check the code a GPU would run.

The simulator runs the kernels as Python, so it cannot see what NVVM and ptxas do to the
arithmetic. Both may fuse a product and a sum into one FMA with a single rounding, where
the CPU rounds twice, and then a GPU's bytes differ from the CPU's:

* NVVM contracts ``a * b + c`` into ``fma.rn`` unless the product is ``mul.rn``;
* ptxas may still fuse a PTX ``mul`` with no rounding modifier into a following ``add`` or
  ``sub`` with none (PTX ISA, "Floating Point Instructions": instructions without a rounding
  modifier may be optimised into fused multiply-add).

Approximate float instructions (``div.approx``, ``sqrt.approx``...) and flushed subnormals
(``.ftz``), which fast math would bring, would change bytes too.

For each kernel specialization the backend can launch, this compiles PTX (numba-cuda, NVVM
from the CUDA toolkit wheels), flags all of these, and assembles the PTX for each target
with nvJitLink (ptxas), recording registers and spills. Run as a script, without
NUMBA_ENABLE_CUDASIM, it prints a JSON report; exit code 3 means no CUDA compiler here
(numba-cuda with NVVM, NVRTC and nvJitLink, as the cuda and test extras install them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from itertools import product

# The report is a JSON object: {"kernels": [...], "problems": [...], "controls": {...}, ...}.
COMPILE_CC = (7, 5)  # the oldest architecture CUDA 13 builds for; its PTX runs on newer ones
TARGETS = ("sm_75", "sm_86", "sm_90")
NO_COMPILER = 3

_INSTRUCTION = re.compile(r"^\s*(?:@%p\d+\s+)?([a-z][\w.]*)\s+([^;]*);", re.M)
_PLAIN_FLOAT = re.compile(r"^(mul|add|sub|neg|mov)\.f(32|64)$")
# Approximate division, reciprocal, square root or transcendental, or subnormals flushed to
# zero: NVVM emits these under fast math, and the CPU does neither.
_INEXACT = re.compile(r"\.(approx|ftz|full)\b")


def arithmetic_problems(ptx: str) -> list[str]:
    """Float FMAs NVVM emitted, plain products that ptxas may fuse into a plain sum, and
    float instructions that are not correctly rounded IEEE arithmetic."""
    problems = []
    products: set[str] = set()  # registers holding an unrounded-order product, or its copy
    for opcode, operands in _INSTRUCTION.findall(ptx):
        parts = [p.strip() for p in operands.split(",")]
        if _INEXACT.search(opcode):
            problems.append(f"{opcode} {operands} (not IEEE-exact)")
            continue
        if re.match(r"^(fma|mad)\.(rn\.|rz\.|rm\.|rp\.)?(ftz\.)?(sat\.)?f(32|64)", opcode):
            problems.append(f"{opcode} {operands}")
            continue
        plain = _PLAIN_FLOAT.match(opcode)
        if not plain:
            continue
        kind, dest, sources = plain.group(1), parts[0], parts[1:]
        carries_product = kind in ("mov", "neg") and sources and sources[0] in products
        if kind == "mul" or carries_product:
            products.add(dest)
        elif kind in ("add", "sub") and any(s in products for s in sources):
            problems.append(f"{opcode} {operands} (adds a plain mul's product)")
    return problems


def _force_compile_target() -> None:
    """Device functions compile for the current device's compute capability, which needs a
    driver; this run has none, so they are told the compile target instead."""
    import numba.cuda.dispatcher as dispatcher

    class Target:
        compute_capability = COMPILE_CC

    if not hasattr(dispatcher, "get_current_device"):
        raise RuntimeError("numba-cuda changed: numba.cuda.dispatcher.get_current_device is gone")
    dispatcher.get_current_device = lambda: Target


def specializations() -> list[tuple[str, object, tuple]]:
    """(name, kernel, argument types) for the kernels the CUDA backend launches."""
    from numba import types

    from lowmem_merge.kernels import BF16, F16, F32
    from lowmem_merge.kernels.cuda import arrays, gguf_quants, sparse

    def array(dtype: types.Type, ndim: int = 1) -> types.Array:
        return types.Array(dtype, ndim, "C")

    storage = {BF16: types.uint16, F16: types.uint16, F32: types.uint32}
    names = {BF16: "BF16", F16: "F16", F32: "F32"}
    f64, i64, u8 = types.float64, types.int64, types.uint8
    kernels = []
    # Each stack encoding once, each base encoding once, each flag with each.
    encoding_pairs = [(BF16, BF16), (F16, F32), (F32, F16)]
    for (encoding, base_encoding), flag in product(encoding_pairs, (True, False)):
        stack, base = array(storage[encoding], 2), array(storage[base_encoding])
        tag = f"{names[encoding]},{names[base_encoding]},{flag}"
        n = 2 if flag else 5
        kernels.append((f"gram[{tag},{n}]", arrays._gram_kernel(encoding, base_encoding, flag, n),
                        (stack, base, array(f64, 3))))
        out_encoding = base_encoding if flag else F32
        out = array(storage[out_encoding])
        kernels.append((f"weighted_sum[{tag}->{names[out_encoding]}]",
                        arrays._weighted_sum_kernel(encoding, base_encoding, flag, out_encoding),
                        (stack, array(f64), base, f64, out)))
        kernels.append((f"line_gram[{tag},by_row={not flag},{n}]",
                        arrays._line_gram_kernel(encoding, base_encoding, flag, not flag, n),
                        (stack, base, i64, array(f64, 3))))
        kernels.append((f"line_weighted_sum[{tag},by_row={flag}->{names[out_encoding]}]",
                        arrays._line_sum_kernel(encoding, base_encoding, flag, flag, out_encoding),
                        (stack, array(f64, 2), base, f64, i64, i64, out)))
    for width in (types.uint16, types.uint32):
        raw = array(width)
        kernels += [
            (f"count_nonfinite[{width}]", arrays._count_nonfinite_kernel, (raw, i64, array(i64))),
            (f"decode[{width}]", arrays._decode_kernel, (raw, i64, array(types.float32))),
            (f"encode[{width}]", arrays._encode_kernel, (array(f64), raw, i64)),
            (f"transcode[{width}]", arrays._transcode_kernel, (raw, i64, raw, i64)),
        ]
    selection = (array(i64, 2), array(i64, 2), array(i64, 3), array(types.uint64), array(f64),
                 array(f64))
    for stack_width, base_width in ((types.uint16, types.uint16), (types.uint32, types.uint32),
                                    (types.uint16, types.uint32)):
        stack, base, tag = array(stack_width, 2), array(base_width), f"{stack_width},{base_width}"
        kernels += [
            (f"histogram_high[{tag}]", sparse._histogram_high,
             (stack, i64, base, i64, array(i64, 3))),
            (f"histogram_low[{tag}]", sparse._histogram_low,
             (stack, i64, base, i64, array(i64, 2), array(i64, 4))),
            (f"tie_counts[{tag}]", sparse._tie_counts,
             (stack, i64, base, i64, array(i64, 2), array(i64, 3))),
            (f"task_vector_l1[{tag}]", sparse._l1_sums,
             (stack, i64, base, i64, i64, i64, i64, *selection, array(f64, 3))),
            (f"task_vector_merge[{tag}]", sparse._merge,
             (stack, i64, base, i64, i64, types.boolean, i64, i64, *selection, array(f64),
              array(f64), types.boolean, f64, array(base_width), i64)),
        ]
    for qtype, (kernel, _) in gguf_quants._KERNELS.items():
        name = gguf_quants._T(qtype).name
        kernels.append((f"quantize[{name}]", kernel, (array(types.float32), array(u8))))
    return kernels


def assemble(ptx: str, target: str) -> dict:
    """ptxas through nvJitLink: registers, spill bytes and local memory per thread."""
    from cuda.bindings import nvjitlink

    handle = nvjitlink.create(2, [f"-arch={target}", "-verbose"])
    try:
        data = ptx.encode()
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "kernel")
        nvjitlink.complete(handle)
        log = bytearray(nvjitlink.get_info_log_size(handle))
        nvjitlink.get_info_log(handle, log)
    finally:
        nvjitlink.destroy(handle)
    text = log.decode(errors="replace")

    def figure(pattern: str) -> int:
        found = re.findall(pattern, text)
        return max((int(x) for x in found), default=0)

    return {"registers": figure(r"Used (\d+) registers"),
            "spill_bytes": figure(r"(\d+) bytes spill stores")
            + figure(r"(\d+) bytes spill loads"),
            "stack_bytes": figure(r"(\d+) bytes stack frame")}


def _fusable(x, y, out):
    out[0] = x[0] * y[0] + out[0]


def _divides(x, y, out):
    out[0] = x[0] / y[0]


def compile_controls() -> dict[str, str]:
    """PTX that the rules must flag, or they would see nothing anywhere: a * b + c written
    plainly, and a float32 division under fast math."""
    from numba import cuda, types

    f64, f32 = types.Array(types.float64, 1, "C"), types.Array(types.float32, 1, "C")
    fused, _ = cuda.compile_ptx(_fusable, (f64, f64, f64), cc=COMPILE_CC)
    fast, _ = cuda.compile_ptx(_divides, (f32, f32, f32), cc=COMPILE_CC, fastmath=True)
    return {"a * b + c": fused, "fast-math division": fast}


def check(controls: dict[str, str]) -> dict:
    """Compile and assemble every specialization; ``controls`` holds what the rules find in
    each control, which must not be empty."""
    from numba import cuda

    report = {"compile_cc": list(COMPILE_CC), "targets": list(TARGETS), "kernels": [],
              "problems": [],
              "controls": {name: arithmetic_problems(ptx) for name, ptx in controls.items()}}
    for name, kernel, signature in specializations():
        ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=COMPILE_CC)
        problems = arithmetic_problems(ptx)
        report["problems"] += [f"{name}: {p}" for p in problems]
        entry = {"kernel": name, "ptx_lines": ptx.count("\n")}
        for target in TARGETS:
            entry[target] = assemble(ptx, target)
        report["kernels"].append(entry)
    return report


def main() -> int:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        print("NUMBA_ENABLE_CUDASIM=1: the simulator compiles nothing")
        return NO_COMPILER
    if importlib.util.find_spec("numba_cuda") is None:
        print("no CUDA compiler here: numba-cuda is not installed")
        return NO_COMPILER
    _force_compile_target()  # fails loudly if numba-cuda moved what it patches
    try:
        controls = compile_controls()
        assemble(controls["a * b + c"], TARGETS[0])
    except Exception as exc:  # noqa: BLE001 - a missing NVVM, NVRTC or nvJitLink library
        print(f"no CUDA compiler here ({type(exc).__name__}: {exc})".splitlines()[0])
        return NO_COMPILER
    print(json.dumps(check(controls), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
