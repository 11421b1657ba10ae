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

Python scalars are float64 in numba and would silently promote float32 arithmetic, so every
constant below is spelled ``np.float32(...)`` and every integer meets floats through
``np.float32``. Kernels use ``error_model="numpy"``: every division is guarded as in the C
code, and without Python's zero-division checks the inner loops vectorise.
"""

import gguf
import gguf.quants
import numpy as np
from numba import njit, prange

from .scalars import bits_from_f32, f32_from_bits, half_bits_to_f32

_T = gguf.GGMLQuantizationType
QK_K = 256
_GROUP_MAX_EPS = np.float32(1e-15)  # ggml's "all zero" threshold for a group
_MAGIC_ROUND = np.float32(12582912.0)  # 1.5 * 2**23: adding it rounds to an integer
# Elements per gguf.quants call: its numpy temporaries peak at about 17 bytes per
# element (measured with tracemalloc over the rare types), so about 18 MiB here.
_FALLBACK_ELEMENTS = 1 << 20
FALLBACK_WORKING_BYTES = 24 * 1024**2
_CHUNK_BLOCKS = 64  # blocks per parallel work item of the K-quantizers (scratch reuse)

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


# ---------------------------------------------------------------- scalar helpers


@njit(inline="always", cache=True, error_model="numpy")
def _nearest_int(value):
    """ggml's nearest_int: round half to even through the float32 magic-number trick.

    Spelled as the C code does it (not np.rint) so that even out-of-range or NaN inputs,
    where the C result is bit garbage, give the same bytes."""
    shifted = value + _MAGIC_ROUND
    return np.int64(bits_from_f32(shifted) & np.uint32(0x007FFFFF)) - np.int64(0x00400000)


@njit(inline="always", cache=True, error_model="numpy")
def _round_clamp(value, lowest, highest):
    """nearest_int(value) clamped to [lowest, highest], as a float32.

    Adding and removing 1.5 * 2**23 rounds half to even exactly as the C trick does while
    |value| < 2**22, which holds for the bounded grids it is used on (finite input); staying
    in float32 saves two int conversions in the innermost loops."""
    level = (value + _MAGIC_ROUND) - _MAGIC_ROUND
    return min(highest, max(lowest, level))


@njit(inline="always", cache=True, error_model="numpy")
def _round_clamp_int(value, lowest, highest):
    """_round_clamp through the C bit trick itself, for grids whose scale overflowed."""
    return np.float32(min(np.int64(highest), max(np.int64(lowest), _nearest_int(value))))


@njit(inline="always", cache=True, error_model="numpy")
def _half_at(raw, offset):
    """float32 of the little-endian float16 stored at raw[offset:offset + 2] (exact)."""
    return half_bits_to_f32(np.uint32(raw[offset]) | (np.uint32(raw[offset + 1]) << np.uint32(8)))


@njit(inline="always", cache=True, error_model="numpy")
def _f32_to_half_bits(value):
    """numpy's float32 -> float16 conversion, bit for bit, without branches (vectorises).

    Round to nearest even; a NaN keeps its sign and the top of its payload, forced non-zero,
    as numpy does (so gguf.quants' bytes are matched)."""
    bits = bits_from_f32(value)
    sign = (bits >> np.uint32(16)) & np.uint32(0x8000)
    magnitude = bits & np.uint32(0x7FFFFFFF)
    # Normal halves: rebias the exponent by -112 and round the 13 dropped bits to even.
    normal = (magnitude + np.uint32(0xC8000FFF) + ((magnitude >> np.uint32(13)) & np.uint32(1))
              ) >> np.uint32(13)
    # Below 2**-14: adding 0.5 makes the float adder round to a multiple of 2**-24 (RNE).
    subnormal = bits_from_f32(f32_from_bits(magnitude) + np.float32(0.5)) - np.uint32(0x3F000000)
    nan = np.uint32(0x7C00) + ((magnitude & np.uint32(0x007FFFFF)) >> np.uint32(13))
    nan += np.uint32(nan == np.uint32(0x7C00))
    half = subnormal if magnitude < np.uint32(0x38800000) else normal
    half = np.uint32(0x7C00) if magnitude >= np.uint32(0x477FF000) else half  # >= 65520: inf
    half = nan if magnitude > np.uint32(0x7F800000) else half
    return sign | half


@njit(inline="always", cache=True, error_model="numpy")
def _put_half(out, offset, value):
    half = _f32_to_half_bits(value)
    out[offset] = np.uint8(half & np.uint32(0xFF))
    out[offset + 1] = np.uint8(half >> np.uint32(8))


@njit(inline="always", cache=True, error_model="numpy")
def _scale_min_k4(j, raw, base):
    """The 6-bit scale and min of sub-block j from the 12 packed bytes at raw[base:]."""
    if j < 4:
        return raw[base + j] & np.uint8(63), raw[base + j + 4] & np.uint8(63)
    high_scale = (raw[base + j - 4] >> np.uint8(6)) << np.uint8(4)
    scale = (raw[base + j + 4] & np.uint8(0x0F)) | high_scale
    low_min = raw[base + j + 4] >> np.uint8(4)
    return scale, low_min | ((raw[base + j] >> np.uint8(6)) << np.uint8(4))


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
        d = _half_at(raw, base)
        for j in range(32):
            out[b * 32 + j] = np.float32(np.int8(raw[base + 2 + j])) * d


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _dequant_q4_0(raw, out):
    for b in prange(out.shape[0] // 32):
        base = b * 18
        d = _half_at(raw, base)
        for j in range(16):
            packed = raw[base + 2 + j]
            out[b * 32 + j] = d * np.float32(np.int32(packed & np.uint8(0x0F)) - 8)
            out[b * 32 + 16 + j] = d * np.float32(np.int32(packed >> np.uint8(4)) - 8)


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _dequant_q4_k(raw, out):
    for b in prange(out.shape[0] // QK_K):
        base = b * 144
        d = _half_at(raw, base)
        dmin = _half_at(raw, base + 2)
        for group in range(4):  # 64 elements: low nibbles, then high nibbles of 32 bytes
            sc1, m1 = _scale_min_k4(2 * group, raw, base + 4)
            sc2, m2 = _scale_min_k4(2 * group + 1, raw, base + 4)
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
        d = _half_at(raw, base)
        dmin = _half_at(raw, base + 2)
        qh = base + 16
        for group in range(4):
            sc1, m1 = _scale_min_k4(2 * group, raw, base + 4)
            sc2, m2 = _scale_min_k4(2 * group + 1, raw, base + 4)
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
        d = _half_at(raw, base + 208)
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


# ---------------------------------------------------------------- simple quantizers


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _quant_f16(values, out_halves):
    for i in prange(values.shape[0]):
        out_halves[i] = np.uint16(_f32_to_half_bits(values[i]))


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _quant_bf16(value_bits, out_halves):
    for i in prange(value_bits.shape[0]):
        bits = value_bits[i]
        if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
            # gguf (like ggml_compute_fp32_to_bf16) forces a NaN quiet, dropping its low payload.
            bits = (bits & np.uint32(0xFFFF0000)) | np.uint32(0x00400000)
        rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        out_halves[i] = np.uint16((bits + rounding) >> np.uint32(16))


@njit(inline="always", cache=True, error_model="numpy")
def _signed_max(values, lo, hi):
    """The value of largest magnitude, the first one on ties (as ggml and numpy argmax)."""
    amax = np.float32(0.0)
    vmax = np.float32(0.0)
    for j in range(lo, hi):
        if amax < abs(values[j]):
            amax = abs(values[j])
            vmax = values[j]
    return vmax


@njit(inline="always", cache=True, error_model="numpy")
def _min_max(values, lo, hi):
    vmin = values[lo]
    vmax = values[lo]
    for j in range(lo + 1, hi):
        if values[j] < vmin:
            vmin = values[j]
        if values[j] > vmax:
            vmax = values[j]
    return vmin, vmax


@njit(inline="always", cache=True, error_model="numpy")
def _reciprocal_or_zero(d):
    return np.float32(0.0) if d == np.float32(0.0) else np.float32(1.0) / d


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _quant_q8_0(values, out):
    for b in prange(values.shape[0] // 32):
        lo = b * 32
        amax = np.float32(0.0)
        for j in range(lo, lo + 32):
            amax = max(amax, abs(values[j]))
        d = amax / np.float32(127.0)
        inverse = _reciprocal_or_zero(d)
        base = b * 34
        _put_half(out, base, d)
        for j in range(32):
            scaled = values[lo + j] * inverse
            # roundf (half away from zero), computed as gguf's np_roundf does.
            magnitude = abs(scaled)
            floored = np.floor(magnitude)
            rounded = np.int64(floored + np.floor(np.float32(2.0) * (magnitude - floored)))
            if scaled < np.float32(0.0):
                rounded = -rounded
            out[base + 2 + j] = np.uint8(rounded & 0xFF)


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _quant_q4_0(values, out):
    for b in prange(values.shape[0] // 32):
        lo = b * 32
        d = _signed_max(values, lo, lo + 32) / np.float32(-8.0)
        inverse = _reciprocal_or_zero(d)
        base = b * 18
        _put_half(out, base, d)
        for j in range(16):
            q0 = min(15, np.int64(values[lo + j] * inverse + np.float32(8.5)))
            q1 = min(15, np.int64(values[lo + 16 + j] * inverse + np.float32(8.5)))
            out[base + 2 + j] = np.uint8(q0 | (q1 << 4))


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _quant_q4_1(values, out):
    for b in prange(values.shape[0] // 32):
        lo = b * 32
        vmin, vmax = _min_max(values, lo, lo + 32)
        d = (vmax - vmin) / np.float32(15.0)
        inverse = _reciprocal_or_zero(d)
        base = b * 20
        _put_half(out, base, d)
        _put_half(out, base + 2, vmin)
        for j in range(16):
            q0 = min(15, np.int64((values[lo + j] - vmin) * inverse + np.float32(0.5)))
            q1 = min(15, np.int64((values[lo + 16 + j] - vmin) * inverse + np.float32(0.5)))
            out[base + 4 + j] = np.uint8(q0 | (q1 << 4))


@njit(inline="always", cache=True, error_model="numpy")
def _put_q5(out, base, q, qh_offset, qs_offset):
    """Pack 32 five-bit codes: low nibbles in pairs (j, j + 16), fifth bits as a uint32."""
    high_bits = np.uint32(0)
    for j in range(32):
        high_bits |= np.uint32((q[j] >> 4) & 1) << np.uint32(j)
    for k in range(4):
        out[base + qh_offset + k] = np.uint8((high_bits >> np.uint32(8 * k)) & np.uint32(0xFF))
    for j in range(16):
        out[base + qs_offset + j] = np.uint8((q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4))


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _quant_q5_0(values, out):
    for b in prange(values.shape[0] // 32):
        lo = b * 32
        d = _signed_max(values, lo, lo + 32) / np.float32(-16.0)
        inverse = _reciprocal_or_zero(d)
        base = b * 22
        _put_half(out, base, d)
        q = np.empty(32, np.int64)
        for j in range(32):
            q[j] = min(31, np.int64(values[lo + j] * inverse + np.float32(16.5)))
        _put_q5(out, base, q, 2, 6)


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _quant_q5_1(values, out):
    for b in prange(values.shape[0] // 32):
        lo = b * 32
        vmin, vmax = _min_max(values, lo, lo + 32)
        d = (vmax - vmin) / np.float32(31.0)
        inverse = _reciprocal_or_zero(d)
        base = b * 24
        _put_half(out, base, d)
        _put_half(out, base + 2, vmin)
        q = np.empty(32, np.int64)
        for j in range(32):
            # gguf clips to [0, 31]; ggml does not, but its value never exceeds 31.
            q[j] = min(31, np.int64((values[lo + j] - vmin) * inverse + np.float32(0.5)))
        _put_q5(out, base, q, 4, 8)


# ---------------------------------------------------------------- K-quantizers


@njit(cache=True, nogil=True, error_model="numpy")
def _make_qkx2_quants(x, lo, weights, n_max, r_min, r_delta, n_step, labels, labels_aux,
                      shifted):
    """ggml's make_qkx2_quants for the 32 values x[lo:lo + 32] (weighted squared error).

    Fits x ~ scale * L - min_value with L in [0, n_max]: starts from the plain min/max grid,
    then tries n_step + 1 stretched grids, each refined by weighted least squares, and keeps
    the one of least weighted error; each new best min also moves the following grids.
    Writes L into labels[0:32]; returns (scale, min_value).
    """
    n = 32
    vmin = x[lo]
    vmax = x[lo]
    sum_w = weights[0]
    sum_x = sum_w * x[lo]
    for i in range(1, n):
        value = x[lo + i]
        if value < vmin:
            vmin = value
        if value > vmax:
            vmax = value
        sum_w += weights[i]
        sum_x += weights[i] * value
    if vmin > np.float32(0.0):
        vmin = np.float32(0.0)
    if vmax == vmin:
        for i in range(n):
            labels[i] = 0
        return np.float32(0.0), -vmin
    span = vmax - vmin
    for i in range(n):
        shifted[i] = x[lo + i] - vmin
    top = np.float32(n_max)
    zero = np.float32(0.0)
    # Only a span so small (all |x| < ~1e-37) that the grid scale overflows to inf needs
    # ggml's exact integer trick; everywhere else the float32 rounding is the same.
    overflow = not np.isfinite((top + np.float32(2.0)) / span)
    inverse = top / span
    scale = np.float32(1.0) / inverse
    best_error = np.float32(0.0)
    for i in range(n):
        if overflow:
            level = _round_clamp_int(inverse * shifted[i], zero, top)
        else:
            level = _round_clamp(inverse * shifted[i], zero, top)
        labels[i] = np.int64(level)
        diff = scale * level + vmin - x[lo + i]
        best_error += weights[i] * (diff * diff)
    for step in range(n_step + 1):
        inverse = (r_min + r_delta * np.float32(step) + top) / span
        if overflow:
            for i in range(n):
                labels_aux[i] = _round_clamp_int(inverse * shifted[i], zero, top)
        else:
            for i in range(n):  # no loop-carried dependency: vectorises
                labels_aux[i] = _round_clamp(inverse * shifted[i], zero, top)
        sum_l = np.float32(0.0)
        sum_l2 = np.float32(0.0)
        sum_xl = np.float32(0.0)
        for i in range(n):
            weighted = weights[i] * labels_aux[i]
            sum_l += weighted
            sum_l2 += weighted * labels_aux[i]
            sum_xl += weighted * x[lo + i]
        det = sum_w * sum_l2 - sum_l * sum_l
        if det > np.float32(0.0):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            if this_min > np.float32(0.0):
                this_min = np.float32(0.0)
                this_scale = sum_xl / sum_l2
            error = np.float32(0.0)
            for i in range(n):
                diff = this_scale * labels_aux[i] + this_min - x[lo + i]
                error += weights[i] * (diff * diff)
            if error < best_error:
                for i in range(n):
                    labels[i] = np.int64(labels_aux[i])
                best_error = error
                scale = this_scale
                vmin = this_min
                # ggml keeps using the *updated* min in the grids of the following steps.
                span = vmax - vmin
                for i in range(n):
                    shifted[i] = x[lo + i] - vmin
    return scale, -vmin


@njit(inline="always", cache=True, error_model="numpy")
def _quantize_k_block(values, lo, out, base, n_max, r_min, r_delta, n_step, levels, labels_aux,
                      weights, shifted, scales, mins):
    """Shared first half of Q4_K and Q5_K: 8 sub-block fits, then 6-bit scales and mins.

    Fills levels[0:256] with the codes, writes d, dmin and the 12 scale bytes at out[base:]."""
    max_scale = np.float32(0.0)
    max_min = np.float32(0.0)
    for j in range(8):
        sub = lo + 32 * j
        sum_x2 = np.float32(0.0)
        for i in range(32):
            sum_x2 += values[sub + i] * values[sub + i]
        av_x = np.sqrt(sum_x2 / np.float32(32.0))
        for i in range(32):
            weights[i] = av_x + abs(values[sub + i])
        scale, the_min = _make_qkx2_quants(values, sub, weights, n_max, r_min, r_delta, n_step,
                                           levels[32 * j:32 * j + 32], labels_aux, shifted)
        scales[j] = scale
        mins[j] = the_min
        if scale > max_scale:
            max_scale = scale
        if the_min > max_min:
            max_min = the_min
    inv_scale = np.float32(63.0) / max_scale if max_scale > np.float32(0.0) else np.float32(0.0)
    inv_min = np.float32(63.0) / max_min if max_min > np.float32(0.0) else np.float32(0.0)
    packed = base + 4
    for j in range(8):
        # C stores nearest_int into a uint8 before MIN(63, .): keep that wrap-around.
        ls = min(63, _nearest_int(inv_scale * scales[j]) & 0xFF)
        lm = min(63, _nearest_int(inv_min * mins[j]) & 0xFF)
        if j < 4:
            out[packed + j] = np.uint8(ls)
            out[packed + j + 4] = np.uint8(lm)
        else:
            out[packed + j + 4] = np.uint8((ls & 0xF) | ((lm & 0xF) << 4))
            out[packed + j - 4] |= np.uint8((ls >> 4) << 6)
            out[packed + j] |= np.uint8((lm >> 4) << 6)
    _put_half(out, base, max_scale / np.float32(63.0))
    _put_half(out, base + 2, max_min / np.float32(63.0))
    # Final codes against the scales as stored (rounded to 6 bits and f16).
    d_all = _half_at(out, base)
    dmin_all = _half_at(out, base + 2)
    for j in range(8):
        sc, m = _scale_min_k4(j, out, packed)
        d = d_all * np.float32(sc)
        if d == np.float32(0.0):
            continue  # ggml keeps the codes of the sub-block fit here
        dm = dmin_all * np.float32(m)
        for i in range(32):
            level = _nearest_int((values[lo + 32 * j + i] + dm) / d)
            levels[32 * j + i] = min(n_max, max(0, level))


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _quant_q4_k(values, out):
    n_blocks = values.shape[0] // QK_K
    n_chunks = (n_blocks + _CHUNK_BLOCKS - 1) // _CHUNK_BLOCKS
    for chunk in prange(n_chunks):
        levels = np.empty(QK_K, np.int64)
        labels_aux = np.empty(32, np.float32)
        weights = np.empty(32, np.float32)
        shifted = np.empty(32, np.float32)
        scales = np.empty(8, np.float32)
        mins = np.empty(8, np.float32)
        for b in range(chunk * _CHUNK_BLOCKS, min(n_blocks, (chunk + 1) * _CHUNK_BLOCKS)):
            base = b * 144
            _quantize_k_block(values, b * QK_K, out, base, 15, np.float32(-1.0),
                              np.float32(0.1), 20, levels, labels_aux, weights, shifted,
                              scales, mins)
            for group in range(4):
                for i in range(32):
                    low = levels[64 * group + i]
                    high = levels[64 * group + 32 + i]
                    out[base + 16 + 32 * group + i] = np.uint8(low | (high << 4))


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _quant_q5_k(values, out):
    n_blocks = values.shape[0] // QK_K
    n_chunks = (n_blocks + _CHUNK_BLOCKS - 1) // _CHUNK_BLOCKS
    for chunk in prange(n_chunks):
        levels = np.empty(QK_K, np.int64)
        labels_aux = np.empty(32, np.float32)
        weights = np.empty(32, np.float32)
        shifted = np.empty(32, np.float32)
        scales = np.empty(8, np.float32)
        mins = np.empty(8, np.float32)
        for b in range(chunk * _CHUNK_BLOCKS, min(n_blocks, (chunk + 1) * _CHUNK_BLOCKS)):
            base = b * 176
            _quantize_k_block(values, b * QK_K, out, base, 31, np.float32(-0.5),
                              np.float32(0.1), 15, levels, labels_aux, weights, shifted,
                              scales, mins)
            for i in range(32):
                out[base + 16 + i] = 0
            for group in range(4):
                for i in range(32):
                    low = levels[64 * group + i]
                    high = levels[64 * group + 32 + i]
                    bits = ((low >> 4) << (2 * group)) | ((high >> 4) << (2 * group + 1))
                    out[base + 16 + i] |= np.uint8(bits)
                    out[base + 48 + 32 * group + i] = np.uint8((low & 0xF) | ((high & 0xF) << 4))


@njit(cache=True, nogil=True, error_model="numpy")
def _make_qx_quants_rmse1(x, lo, levels, lo_levels, candidate):
    """ggml's make_qx_quants(16, 32, ..., rmse_type=1, no weights) for x[lo:lo + 16].

    Symmetric 6-bit codes (levels in [0, 63], meaning L - 32) under an x^2-weighted error,
    trying 18 stretched grids around 32 / max. Returns the scale."""
    n = 16
    n_max = 32
    amax = np.float32(0.0)
    vmax = np.float32(0.0)
    for i in range(n):
        if abs(x[lo + i]) > amax:
            amax = abs(x[lo + i])
            vmax = x[lo + i]
    if amax < _GROUP_MAX_EPS:
        for i in range(n):
            levels[lo_levels + i] = 0
        return np.float32(0.0)
    lowest = np.float32(-n_max)
    highest = np.float32(n_max - 1)
    inverse = np.float32(-n_max) / vmax
    sum_lx = np.float32(0.0)
    sum_l2 = np.float32(0.0)
    for i in range(n):
        value = x[lo + i]
        level = _round_clamp(inverse * value, lowest, highest)
        levels[lo_levels + i] = np.int64(level) + n_max
        weight = value * value
        sum_lx += weight * value * level
        sum_l2 += weight * level * level
    scale = sum_lx / sum_l2 if sum_l2 != np.float32(0.0) else np.float32(0.0)
    best = scale * sum_lx
    for step in range(-9, 10):
        if step == 0:
            continue
        inverse = -(np.float32(n_max) + np.float32(0.1) * np.float32(step)) / vmax
        for i in range(n):  # no loop-carried dependency: vectorises
            candidate[i] = _round_clamp(inverse * x[lo + i], lowest, highest)
        sum_lx = np.float32(0.0)
        sum_l2 = np.float32(0.0)
        for i in range(n):
            value = x[lo + i]
            weight = value * value
            sum_lx += weight * value * candidate[i]
            sum_l2 += weight * candidate[i] * candidate[i]
        if sum_l2 > np.float32(0.0) and sum_lx * sum_lx > best * sum_l2:
            for i in range(n):
                levels[lo_levels + i] = np.int64(candidate[i]) + n_max
            scale = sum_lx / sum_l2
            best = scale * sum_lx
    return scale


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _quant_q6_k(values, out):
    n_blocks = values.shape[0] // QK_K
    n_chunks = (n_blocks + _CHUNK_BLOCKS - 1) // _CHUNK_BLOCKS
    for chunk in prange(n_chunks):
        levels = np.empty(QK_K, np.int64)
        candidate = np.empty(16, np.float32)
        scales = np.empty(16, np.float32)
        for b in range(chunk * _CHUNK_BLOCKS, min(n_blocks, (chunk + 1) * _CHUNK_BLOCKS)):
            lo = b * QK_K
            base = b * 210
            max_scale = np.float32(0.0)
            max_abs_scale = np.float32(0.0)
            for g in range(16):
                scale = _make_qx_quants_rmse1(values, lo + 16 * g, levels, 16 * g, candidate)
                scales[g] = scale
                if abs(scale) > max_abs_scale:
                    max_abs_scale = abs(scale)
                    max_scale = scale
            if max_abs_scale < _GROUP_MAX_EPS:
                for k in range(210):
                    out[base + k] = 0  # ggml writes an all-zero block (d = +0.0)
                continue
            inverse = np.float32(-128.0) / max_scale
            _put_half(out, base + 208, np.float32(1.0) / inverse)
            for g in range(16):
                # C stores MIN(127, nearest_int(.)) into an int8: keep its low byte.
                out[base + 192 + g] = np.uint8(min(127, _nearest_int(inverse * scales[g])) & 0xFF)
            d_all = _half_at(out, base + 208)
            for g in range(16):
                d = d_all * np.float32(np.int8(out[base + 192 + g]))
                if d == np.float32(0.0):
                    continue  # ggml keeps the codes of the group fit here
                for i in range(16):
                    level = _nearest_int(values[lo + 16 * g + i] / d)
                    levels[16 * g + i] = max(-32, min(31, level)) + 32
            for half in range(2):
                ql = base + 64 * half
                qh = base + 128 + 32 * half
                at = 128 * half
                for i in range(32):
                    l1 = levels[at + i]
                    l2 = levels[at + 32 + i]
                    l3 = levels[at + 64 + i]
                    l4 = levels[at + 96 + i]
                    out[ql + i] = np.uint8((l1 & 0xF) | ((l3 & 0xF) << 4))
                    out[ql + 32 + i] = np.uint8((l2 & 0xF) | ((l4 & 0xF) << 4))
                    out[qh + i] = np.uint8((l1 >> 4) | ((l2 >> 4) << 2) | ((l3 >> 4) << 4)
                                           | ((l4 >> 4) << 6))


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
