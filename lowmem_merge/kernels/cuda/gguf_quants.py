"""CUDA quantizers for GGUF block formats, byte-identical to kernels/gguf_quants.py.

One thread quantizes one block (32 elements, or 256 for the K-quants) with per-thread scratch
in local memory. The block code is kernels/quant_blocks.py itself, compiled for the device
with the device's primitives (see kernels/shared_code.py and cuda/primitives.py): every
product through ``mul32`` (libdevice's ``fmul_rn``, which NVVM cannot fuse with a sum into an
FMA), bit casts through the device's own. tests/test_ptx.py checks the compiled code.
"""

from typing import Any

import gguf
import numpy as np
from numba import cuda

from .. import quant_blocks
from ..gguf_quants import QK_K, block_layout
from ..shared_code import retarget
from .primitives import DEVICE_PRIMITIVES, SIMULATED, bits_from_f32, device_function
from .scalars import twins as scalar_twins

_T = gguf.GGMLQuantizationType
THREADS = 32 if SIMULATED else 64  # blocks quantized per CUDA block of threads
_MAX_GRID = 1 << 16
blocks = retarget(quant_blocks, DEVICE_PRIMITIVES, device_function, f"{__name__}.blocks",
                  links=(scalar_twins,))


# ---------------------------------------------------------------- float formats


@cuda.jit
def _quant_f32(values, out):
    for i in range(cuda.grid(1), values.shape[0], cuda.gridsize(1)):
        blocks.put_bytes(out, 4 * i, bits_from_f32(values[i]), 4)


@cuda.jit
def _quant_f16(values, out):
    for i in range(cuda.grid(1), values.shape[0], cuda.gridsize(1)):
        blocks.put_bytes(out, 2 * i, blocks.f32_to_half_bits(values[i]), 2)


@cuda.jit
def _quant_bf16(values, out):
    for i in range(cuda.grid(1), values.shape[0], cuda.gridsize(1)):
        blocks.put_bytes(out, 2 * i, blocks.bf16_bits(bits_from_f32(values[i])), 2)


# ---------------------------------------------------------------- block formats


@cuda.jit
def _quant_q8_0(values, out):
    for b in range(cuda.grid(1), values.shape[0] // 32, cuda.gridsize(1)):
        blocks.q8_0_block(values, b, out)


@cuda.jit
def _quant_q4_0(values, out):
    for b in range(cuda.grid(1), values.shape[0] // 32, cuda.gridsize(1)):
        blocks.q4_0_block(values, b, out)


@cuda.jit
def _quant_q4_1(values, out):
    for b in range(cuda.grid(1), values.shape[0] // 32, cuda.gridsize(1)):
        blocks.q4_1_block(values, b, out)


@cuda.jit
def _quant_q5_0(values, out):
    q = cuda.local.array(32, np.int64)
    for b in range(cuda.grid(1), values.shape[0] // 32, cuda.gridsize(1)):
        blocks.q5_0_block(values, b, out, q)


@cuda.jit
def _quant_q5_1(values, out):
    q = cuda.local.array(32, np.int64)
    for b in range(cuda.grid(1), values.shape[0] // 32, cuda.gridsize(1)):
        blocks.q5_1_block(values, b, out, q)


@cuda.jit
def _quant_q4_k(values, out):
    levels = cuda.local.array(QK_K, np.int32)
    labels_aux = cuda.local.array(32, np.float32)
    weights = cuda.local.array(32, np.float32)
    shifted = cuda.local.array(32, np.float32)
    scales = cuda.local.array(8, np.float32)
    mins = cuda.local.array(8, np.float32)
    for b in range(cuda.grid(1), values.shape[0] // QK_K, cuda.gridsize(1)):
        blocks.q4_k_block(values, b, out, levels, labels_aux, weights, shifted, scales, mins)


@cuda.jit
def _quant_q5_k(values, out):
    levels = cuda.local.array(QK_K, np.int32)
    labels_aux = cuda.local.array(32, np.float32)
    weights = cuda.local.array(32, np.float32)
    shifted = cuda.local.array(32, np.float32)
    scales = cuda.local.array(8, np.float32)
    mins = cuda.local.array(8, np.float32)
    for b in range(cuda.grid(1), values.shape[0] // QK_K, cuda.gridsize(1)):
        blocks.q5_k_block(values, b, out, levels, labels_aux, weights, shifted, scales, mins)


@cuda.jit
def _quant_q6_k(values, out):
    levels = cuda.local.array(QK_K, np.int32)
    candidate = cuda.local.array(16, np.float32)
    scales = cuda.local.array(16, np.float32)
    for b in range(cuda.grid(1), values.shape[0] // QK_K, cuda.gridsize(1)):
        blocks.q6_k_block(values, b, out, levels, candidate, scales)


# ---------------------------------------------------------------- launcher

# Kernel and the number of work items (elements or blocks) per element of input.
_KERNELS = {
    _T.F32.value: (_quant_f32, 1),
    _T.F16.value: (_quant_f16, 1),
    _T.BF16.value: (_quant_bf16, 1),
    _T.Q8_0.value: (_quant_q8_0, 32),
    _T.Q4_0.value: (_quant_q4_0, 32),
    _T.Q4_1.value: (_quant_q4_1, 32),
    _T.Q5_0.value: (_quant_q5_0, 32),
    _T.Q5_1.value: (_quant_q5_1, 32),
    _T.Q4_K.value: (_quant_q4_k, QK_K),
    _T.Q5_K.value: (_quant_q5_k, QK_K),
    _T.Q6_K.value: (_quant_q6_k, QK_K),
}


def can_quantize_on_device(qtype: int) -> bool:
    """Every type the CPU quantizes in Numba: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
    Q4_K, Q5_K and Q6_K."""
    return qtype in _KERNELS


def _check_buffer(name: str, array: Any, dtype: type) -> None:
    """The kernels index flat memory: a contiguous 1-D array of the right dtype."""
    if (array.dtype != dtype or len(array.shape) != 1
            or not array.flags["C_CONTIGUOUS"]):
        raise ValueError(f"{name} must be a contiguous 1-D {np.dtype(dtype).name} array")


def quantize_into(values: Any, qtype: int, out: Any, *, stream: Any = 0) -> None:
    """values: float32 (device or host), a whole number of blocks; out: uint8 of the exact
    byte size. The bytes are the CPU's gguf_quants.quantize_into, byte for byte."""
    if not can_quantize_on_device(qtype):
        raise ValueError(f"cannot quantize to ggml type {qtype}")
    _check_buffer("input", values, np.float32)
    _check_buffer("out", out, np.uint8)
    block_elements, block_bytes = block_layout(qtype)
    n_blocks, rest = divmod(values.shape[0], block_elements)
    if rest or out.shape[0] != n_blocks * block_bytes:
        raise ValueError(f"{_T(qtype).name}: {values.shape[0]} values do not encode into "
                         f"{out.shape[0]} bytes")
    kernel, per_item = _KERNELS[qtype]
    items = values.shape[0] // per_item
    if items == 0:
        return
    grid = max(1, min(_MAX_GRID, -(-items // THREADS)))
    kernel[grid, THREADS, stream](values, out)
