"""Numba kernels for GGUF (ggml) block formats: dequantize to float32 and quantize from it.

Every kernel runs ``prange`` over blocks, so a tensor of any size uses all cores and no
temporaries beyond a few small per-chunk scratch arrays.

Bit-exactness is the contract:

* dequantization equals ``gguf.quants.dequantize`` bit for bit (same float32 operations in
  the same order, never fused into an FMA: numba leaves ``fastmath`` off);
* F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 quantization equals ``gguf.quants.quantize``
  byte for byte (which itself follows ggml's reference quantizers);
* Q4_K, Q5_K and Q6_K follow llama.cpp's reference quantizers without an importance matrix
  (``quantize_row_q4_K_ref`` and friends in ggml-quants.c), step by step in float32, which
  the gguf package cannot do at all.

The quantizers' block code is quant_blocks.py, which the CUDA backend compiles too.

Python scalars are float64 in numba and would silently promote float32 arithmetic, so every
constant below is spelled ``np.float32(...)`` and every integer meets floats through
``np.float32``. Kernels use ``error_model="numpy"``: every division is guarded as in the C
code, and without Python's zero-division checks the inner loops vectorise.
"""

import gguf
import gguf.quants
import numpy as np
from numba import njit, prange

from . import quant_blocks as blocks
from .quant_blocks import QK_K, half_at, scale_min_k4
from .scalars import half_bits_to_f32

_T = gguf.GGMLQuantizationType
# Elements per gguf.quants call: its numpy temporaries peak at about 17 bytes per
# element (measured with tracemalloc over the rare types), so about 18 MiB here.
_FALLBACK_ELEMENTS = 1 << 20
FALLBACK_WORKING_BYTES = 24 * 1024**2
_CHUNK_BLOCKS = 64  # blocks per parallel work item of the quantizers with scratch

_F32 = _T.F32.value
_F16 = _T.F16.value
_BF16 = _T.BF16.value


def block_layout(qtype: int) -> tuple[int, int]:
    """(elements per block, bytes per block) of a ggml type, from gguf.GGML_QUANT_SIZES."""
    block_elements, block_bytes = gguf.GGML_QUANT_SIZES[_T(qtype)]
    return block_elements, block_bytes


def can_dequantize(qtype: int) -> bool:
    """Every type gguf.quants can dequantize, plus F32, F16 and BF16."""
    try:
        member = _T(qtype)
    except ValueError:
        return False
    return member in (_T.F32, _T.F16, _T.BF16) or member in gguf.quants._type_traits


# ---------------------------------------------------------------- dequantization


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _dequant_f32(raw_bits, out_bits):
    for i in prange(out_bits.shape[0]):
        out_bits[i] = raw_bits[i]


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _dequant_f16(halves, out):
    for i in prange(out.shape[0]):
        out[i] = half_bits_to_f32(np.uint32(halves[i]))


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _dequant_bf16(halves, out_bits):
    for i in prange(out_bits.shape[0]):
        out_bits[i] = np.uint32(halves[i]) << np.uint32(16)


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _dequant_q8_0(raw, out):
    for b in prange(out.shape[0] // 32):
        base = b * 34
        d = half_at(raw, base)
        for j in range(32):
            out[b * 32 + j] = np.float32(np.int8(raw[base + 2 + j])) * d


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _dequant_q4_0(raw, out):
    for b in prange(out.shape[0] // 32):
        base = b * 18
        d = half_at(raw, base)
        for j in range(16):
            packed = raw[base + 2 + j]
            out[b * 32 + j] = d * np.float32(np.int32(packed & np.uint8(0x0F)) - 8)
            out[b * 32 + 16 + j] = d * np.float32(np.int32(packed >> np.uint8(4)) - 8)


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _dequant_q4_k(raw, out):
    for b in prange(out.shape[0] // QK_K):
        base = b * 144
        d = half_at(raw, base)
        dmin = half_at(raw, base + 2)
        for group in range(4):  # 64 elements: low nibbles, then high nibbles of 32 bytes
            sc1, m1 = scale_min_k4(2 * group, raw, base + 4)
            sc2, m2 = scale_min_k4(2 * group + 1, raw, base + 4)
            d1 = d * np.float32(sc1)
            min1 = dmin * np.float32(m1)
            d2 = d * np.float32(sc2)
            min2 = dmin * np.float32(m2)
            q = base + 16 + 32 * group
            o = b * QK_K + 64 * group
            for j in range(32):
                out[o + j] = d1 * np.float32(raw[q + j] & np.uint8(0x0F)) - min1
                out[o + 32 + j] = d2 * np.float32(raw[q + j] >> np.uint8(4)) - min2


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _dequant_q5_k(raw, out):
    for b in prange(out.shape[0] // QK_K):
        base = b * 176
        d = half_at(raw, base)
        dmin = half_at(raw, base + 2)
        qh = base + 16
        for group in range(4):
            sc1, m1 = scale_min_k4(2 * group, raw, base + 4)
            sc2, m2 = scale_min_k4(2 * group + 1, raw, base + 4)
            d1 = d * np.float32(sc1)
            min1 = dmin * np.float32(m1)
            d2 = d * np.float32(sc2)
            min2 = dmin * np.float32(m2)
            q = base + 48 + 32 * group
            o = b * QK_K + 64 * group
            shift = np.uint8(2 * group)
            for j in range(32):
                high = raw[qh + j] >> shift
                low_q = (raw[q + j] & np.uint8(0x0F)) | ((high & np.uint8(1)) << np.uint8(4))
                high_q = (raw[q + j] >> np.uint8(4)) | ((high & np.uint8(2)) << np.uint8(3))
                out[o + j] = d1 * np.float32(low_q) - min1
                out[o + 32 + j] = d2 * np.float32(high_q) - min2


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _dequant_q6_k(raw, out):
    for b in prange(out.shape[0] // QK_K):
        base = b * 210
        d = half_at(raw, base + 208)
        for half in range(2):  # 128 elements from 64 low-nibble bytes and 32 high-bit bytes
            ql = base + 64 * half
            qh = base + 128 + 32 * half
            sc = base + 192 + 8 * half
            o = b * QK_K + 128 * half
            for j in range(32):
                g = j // 16
                high = raw[qh + j]
                q1 = (raw[ql + j] & np.uint8(0x0F)) | ((high & np.uint8(3)) << np.uint8(4))
                q2 = (raw[ql + 32 + j] & np.uint8(0x0F)) | (((high >> np.uint8(2)) & np.uint8(3))
                                                            << np.uint8(4))
                q3 = (raw[ql + j] >> np.uint8(4)) | (((high >> np.uint8(4)) & np.uint8(3))
                                                     << np.uint8(4))
                q4 = (raw[ql + 32 + j] >> np.uint8(4)) | ((high >> np.uint8(6)) << np.uint8(4))
                out[o + j] = (d * np.float32(np.int8(raw[sc + g]))) * np.float32(np.int32(q1) - 32)
                out[o + 32 + j] = ((d * np.float32(np.int8(raw[sc + g + 2])))
                                   * np.float32(np.int32(q2) - 32))
                out[o + 64 + j] = ((d * np.float32(np.int8(raw[sc + g + 4])))
                                   * np.float32(np.int32(q3) - 32))
                out[o + 96 + j] = ((d * np.float32(np.int8(raw[sc + g + 6])))
                                   * np.float32(np.int32(q4) - 32))


_DEQUANT_BLOCK_KERNELS = {
    _T.Q8_0.value: _dequant_q8_0,
    _T.Q4_0.value: _dequant_q4_0,
    _T.Q4_K.value: _dequant_q4_k,
    _T.Q5_K.value: _dequant_q5_k,
    _T.Q6_K.value: _dequant_q6_k,
}


def _check_buffers(data: np.ndarray, data_dtype: type, out: np.ndarray, out_dtype: type) -> None:
    """The kernels index flat memory: both buffers must be contiguous 1-D of the right dtype."""
    for name, array, dtype in (("input", data, data_dtype), ("out", out, out_dtype)):
        if array.dtype != dtype or array.ndim != 1 or not array.flags.c_contiguous:
            raise ValueError(f"{name} must be a contiguous 1-D {np.dtype(dtype).name} array")


def decodes_in_numba(qtype: int) -> bool:
    """Whether a type has its own kernel; others use gguf.quants (FALLBACK_WORKING_BYTES)."""
    return qtype in (_F32, _F16, _BF16) or qtype in _DEQUANT_BLOCK_KERNELS


def dequantize_into(raw: np.ndarray, qtype: int, out: np.ndarray) -> None:
    """raw: uint8, a whole number of blocks; out: float32 of n_blocks*block_elements."""
    if not can_dequantize(qtype):
        raise ValueError(f"cannot dequantize ggml type {qtype}")
    _check_buffers(raw, np.uint8, out, np.float32)
    block_elements, block_bytes = block_layout(qtype)
    n_blocks, rest = divmod(raw.shape[0], block_bytes)
    if rest or out.shape[0] != n_blocks * block_elements:
        raise ValueError(f"{_T(qtype).name}: {raw.shape[0]} bytes do not decode into "
                         f"{out.shape[0]} elements")
    if qtype == _F32:
        _dequant_f32(raw.view(np.uint32), out.view(np.uint32))
    elif qtype == _F16:
        _dequant_f16(raw.view(np.uint16), out)
    elif qtype == _BF16:
        _dequant_bf16(raw.view(np.uint16), out.view(np.uint32))
    elif qtype in _DEQUANT_BLOCK_KERNELS:
        _DEQUANT_BLOCK_KERNELS[qtype](raw, out)
    else:
        # Rare types: gguf's numpy code, a bounded number of blocks at a time.
        member = _T(qtype)
        step = max(1, _FALLBACK_ELEMENTS // block_elements)
        for first in range(0, n_blocks, step):
            last = min(n_blocks, first + step)
            with np.errstate(over="ignore", invalid="ignore"):  # inf / NaN blocks are data
                decoded = gguf.quants.dequantize(raw[first * block_bytes:last * block_bytes],
                                                 member)
            out[first * block_elements:last * block_elements] = decoded.reshape(-1)


# ---------------------------------------------------------------- quantization
# One block of each type is quant_blocks' (the same code runs on a GPU); these spread the
# blocks over the cores.


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _quant_f16(values, out_halves):
    for i in prange(values.shape[0]):
        out_halves[i] = np.uint16(blocks.f32_to_half_bits(values[i]))


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _quant_bf16(value_bits, out_halves):
    for i in prange(value_bits.shape[0]):
        out_halves[i] = np.uint16(blocks.bf16_bits(value_bits[i]))


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _quant_q8_0(values, out):
    for b in prange(values.shape[0] // 32):
        blocks.q8_0_block(values, b, out)


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _quant_q4_0(values, out):
    for b in prange(values.shape[0] // 32):
        blocks.q4_0_block(values, b, out)


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _quant_q4_1(values, out):
    for b in prange(values.shape[0] // 32):
        blocks.q4_1_block(values, b, out)


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _quant_q5_0(values, out):
    n_blocks = values.shape[0] // 32
    for chunk in prange(-(-n_blocks // _CHUNK_BLOCKS)):
        q = np.empty(32, np.int64)
        for b in range(chunk * _CHUNK_BLOCKS, min(n_blocks, (chunk + 1) * _CHUNK_BLOCKS)):
            blocks.q5_0_block(values, b, out, q)


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _quant_q5_1(values, out):
    n_blocks = values.shape[0] // 32
    for chunk in prange(-(-n_blocks // _CHUNK_BLOCKS)):
        q = np.empty(32, np.int64)
        for b in range(chunk * _CHUNK_BLOCKS, min(n_blocks, (chunk + 1) * _CHUNK_BLOCKS)):
            blocks.q5_1_block(values, b, out, q)


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _quant_q4_k(values, out):
    n_blocks = values.shape[0] // QK_K
    for chunk in prange(-(-n_blocks // _CHUNK_BLOCKS)):
        levels = np.empty(QK_K, np.int32)
        labels_aux = np.empty(32, np.float32)
        weights = np.empty(32, np.float32)
        shifted = np.empty(32, np.float32)
        scales = np.empty(8, np.float32)
        mins = np.empty(8, np.float32)
        for b in range(chunk * _CHUNK_BLOCKS, min(n_blocks, (chunk + 1) * _CHUNK_BLOCKS)):
            blocks.q4_k_block(values, b, out, levels, labels_aux, weights, shifted, scales, mins)


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _quant_q5_k(values, out):
    n_blocks = values.shape[0] // QK_K
    for chunk in prange(-(-n_blocks // _CHUNK_BLOCKS)):
        levels = np.empty(QK_K, np.int32)
        labels_aux = np.empty(32, np.float32)
        weights = np.empty(32, np.float32)
        shifted = np.empty(32, np.float32)
        scales = np.empty(8, np.float32)
        mins = np.empty(8, np.float32)
        for b in range(chunk * _CHUNK_BLOCKS, min(n_blocks, (chunk + 1) * _CHUNK_BLOCKS)):
            blocks.q5_k_block(values, b, out, levels, labels_aux, weights, shifted, scales, mins)


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _quant_q6_k(values, out):
    n_blocks = values.shape[0] // QK_K
    for chunk in prange(-(-n_blocks // _CHUNK_BLOCKS)):
        levels = np.empty(QK_K, np.int32)
        candidate = np.empty(16, np.float32)
        scales = np.empty(16, np.float32)
        for b in range(chunk * _CHUNK_BLOCKS, min(n_blocks, (chunk + 1) * _CHUNK_BLOCKS)):
            blocks.q6_k_block(values, b, out, levels, candidate, scales)


_QUANT_BLOCK_KERNELS = {
    _T.Q8_0.value: _quant_q8_0,
    _T.Q4_0.value: _quant_q4_0,
    _T.Q4_1.value: _quant_q4_1,
    _T.Q5_0.value: _quant_q5_0,
    _T.Q5_1.value: _quant_q5_1,
    _T.Q4_K.value: _quant_q4_k,
    _T.Q5_K.value: _quant_q5_k,
    _T.Q6_K.value: _quant_q6_k,
}


def can_quantize(qtype: int) -> bool:
    """F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K."""
    return qtype in (_F32, _F16, _BF16) or qtype in _QUANT_BLOCK_KERNELS


def quantize_into(values: np.ndarray, qtype: int, out: np.ndarray) -> None:
    """values: float32, length a multiple of block elements; out: uint8 of the exact byte size."""
    if not can_quantize(qtype):
        raise ValueError(f"cannot quantize to ggml type {qtype}")
    _check_buffers(values, np.float32, out, np.uint8)
    block_elements, block_bytes = block_layout(qtype)
    n_blocks, rest = divmod(values.shape[0], block_elements)
    if rest or out.shape[0] != n_blocks * block_bytes:
        raise ValueError(f"{_T(qtype).name}: {values.shape[0]} values do not encode into "
                         f"{out.shape[0]} bytes")
    if qtype == _F32:
        _dequant_f32(values.view(np.uint32), out.view(np.uint32))
    elif qtype == _F16:
        _quant_f16(values, out.view(np.uint16))
    elif qtype == _BF16:
        _quant_bf16(values.view(np.uint32), out.view(np.uint16))
    else:
        _QUANT_BLOCK_KERNELS[qtype](values, out)
