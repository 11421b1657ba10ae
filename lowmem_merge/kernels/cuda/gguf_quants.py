"""CUDA quantizers for GGUF block formats, byte-identical to kernels/gguf_quants.py.

One thread quantizes one block (32 elements, or 256 for the K-quants) with per-thread scratch
in local memory, following the CPU kernels (and so llama.cpp's reference quantizers) step by
step in float32. Every product goes through ``mul32`` so that NVVM cannot fuse it with a sum
into an FMA (see exact_ops), and every constant is a float32, as on the CPU.

The CPU's results for NaN and infinity are kept too: float ``min``/``max`` are numba's
select (``max(acc, v)`` is ``v if v > acc else acc``), where libdevice's fmaxf would drop a
NaN, and float-to-integer conversions give x86's 0x8000000000000000 for NaN or out of range,
where a device saturates.
"""

from typing import Any

import gguf
import numpy as np
from numba import cuda

from ..gguf_quants import QK_K, block_layout
from .exact_ops import SIMULATED, device_function, floor32, mul32, sqrt32
from .scalars import bits_from_f32, f32_from_bits, half_bits_to_f32_bits

_T = gguf.GGMLQuantizationType
THREADS = 32 if SIMULATED else 64  # blocks quantized per CUDA block of threads
_MAX_GRID = 1 << 16
_GROUP_MAX_EPS = np.float32(1e-15)
_MAGIC_ROUND = np.float32(12582912.0)  # 1.5 * 2**23: adding it rounds to an integer
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_TWO_63 = np.float32(2.0**63)
_INT64_MIN = np.int64(-(2**63))


# ---------------------------------------------------------------- scalar helpers


@device_function
def _max(acc, value):
    """numba's builtin max(acc, value) on floats (a device's fmaxf treats NaN otherwise)."""
    return value if value > acc else acc


@device_function
def _min(acc, value):
    """numba's builtin min(acc, value) on floats."""
    return value if value < acc else acc


@device_function
def _to_int64(value):
    """np.int64(value) as x86 truncates: 0x8000000000000000 for NaN or out of range."""
    if value >= -_TWO_63 and value < _TWO_63:
        return np.int64(value)
    return _INT64_MIN


@device_function
def _nearest_int(value):
    """ggml's nearest_int, through the float32 magic-number trick as the C code spells it."""
    shifted = value + _MAGIC_ROUND
    return np.int64(bits_from_f32(shifted) & np.uint32(0x007FFFFF)) - np.int64(0x00400000)


@device_function
def _round_clamp(value, lowest, highest):
    """nearest_int(value) clamped to [lowest, highest], as a float32 (bounded grids)."""
    level = (value + _MAGIC_ROUND) - _MAGIC_ROUND
    return _min(highest, _max(lowest, level))


@device_function
def _round_clamp_int(value, lowest, highest):
    """_round_clamp through the C bit trick itself, for grids whose scale overflowed."""
    return np.float32(min(np.int64(highest), max(np.int64(lowest), _nearest_int(value))))


@device_function
def _half_at(raw, offset):
    """float32 of the little-endian float16 at raw[offset:offset + 2] (exact)."""
    bits = np.uint32(raw[offset]) | (np.uint32(raw[offset + 1]) << np.uint32(8))
    return f32_from_bits(half_bits_to_f32_bits(bits))


@device_function
def _f32_to_half_bits(value):
    """numpy's float32 -> float16 bits (RNE; a NaN keeps sign and top payload, non-zero)."""
    bits = bits_from_f32(value)
    sign = (bits >> np.uint32(16)) & np.uint32(0x8000)
    magnitude = bits & np.uint32(0x7FFFFFFF)
    if magnitude > np.uint32(0x7F800000):
        nan = np.uint32(0x7C00) + ((magnitude & np.uint32(0x007FFFFF)) >> np.uint32(13))
        return sign | (nan + np.uint32(nan == np.uint32(0x7C00)))
    if magnitude >= np.uint32(0x477FF000):  # >= 65520: infinity
        return sign | np.uint32(0x7C00)
    if magnitude < np.uint32(0x38800000):
        # Below 2**-14: adding 0.5 makes the float adder round to a multiple of 2**-24 (RNE).
        rounded = f32_from_bits(magnitude) + np.float32(0.5)
        return sign | (bits_from_f32(rounded) - np.uint32(0x3F000000))
    # Normal: rebias the exponent by -112 and round the 13 dropped bits to even.
    lsb = (magnitude >> np.uint32(13)) & np.uint32(1)
    return sign | ((magnitude - np.uint32(0x38000000) + np.uint32(0xFFF) + lsb) >> np.uint32(13))


@device_function
def _put_bytes(out, offset, bits, count):
    """The low count bytes of bits, little-endian, at out[offset:]."""
    for k in range(count):
        out[offset + k] = np.uint8((bits >> np.uint32(8 * k)) & np.uint32(0xFF))


@device_function
def _put_half(out, offset, value):
    _put_bytes(out, offset, _f32_to_half_bits(value), 2)


@device_function
def _reciprocal_or_zero(d):
    return _ZERO if d == _ZERO else _ONE / d


@device_function
def _scale_min_k4(j, raw, base):
    """The 6-bit scale and min of sub-block j from the 12 packed bytes at raw[base:]."""
    if j < 4:
        return np.int64(raw[base + j] & 63), np.int64(raw[base + j + 4] & 63)
    scale = np.int64(raw[base + j + 4] & 0x0F) | (np.int64(raw[base + j - 4] >> 6) << 4)
    low_min = np.int64(raw[base + j + 4] >> 4) | (np.int64(raw[base + j] >> 6) << 4)
    return scale, low_min


# ---------------------------------------------------------------- float formats


@cuda.jit
def _quant_f32(values, out):
    for i in range(cuda.grid(1), values.shape[0], cuda.gridsize(1)):
        _put_bytes(out, 4 * i, bits_from_f32(values[i]), 4)


@cuda.jit
def _quant_f16(values, out):
    for i in range(cuda.grid(1), values.shape[0], cuda.gridsize(1)):
        _put_bytes(out, 2 * i, _f32_to_half_bits(values[i]), 2)


@cuda.jit
def _quant_bf16(values, out):
    for i in range(cuda.grid(1), values.shape[0], cuda.gridsize(1)):
        bits = bits_from_f32(values[i])
        if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
            # gguf (like ggml_compute_fp32_to_bf16) forces a NaN quiet, dropping its low payload.
            bits = (bits & np.uint32(0xFFFF0000)) | np.uint32(0x00400000)
        rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        _put_bytes(out, 2 * i, (bits + rounding) >> np.uint32(16), 2)


# ---------------------------------------------------------------- 32-element formats


@device_function
def _signed_max(values, lo, hi):
    """The value of largest magnitude, the first one on ties (as ggml)."""
    amax = _ZERO
    vmax = _ZERO
    for j in range(lo, hi):
        if amax < abs(values[j]):
            amax = abs(values[j])
            vmax = values[j]
    return vmax


@device_function
def _min_max(values, lo, hi):
    vmin = values[lo]
    vmax = values[lo]
    for j in range(lo + 1, hi):
        if values[j] < vmin:
            vmin = values[j]
        if values[j] > vmax:
            vmax = values[j]
    return vmin, vmax


@device_function
def _q8_0_block(values, b, out):
    lo = b * 32
    amax = _ZERO
    for j in range(lo, lo + 32):
        amax = _max(amax, abs(values[j]))
    d = amax / np.float32(127.0)
    inverse = _reciprocal_or_zero(d)
    base = b * 34
    _put_half(out, base, d)
    for j in range(32):
        scaled = mul32(values[lo + j], inverse)
        # roundf (half away from zero), computed as gguf's np_roundf does.
        magnitude = abs(scaled)
        floored = floor32(magnitude)
        rounded = _to_int64(floored + floor32(mul32(np.float32(2.0), magnitude - floored)))
        if scaled < _ZERO:
            rounded = -rounded
        out[base + 2 + j] = np.uint8(rounded & 0xFF)


@device_function
def _q4_0_block(values, b, out):
    lo = b * 32
    d = _signed_max(values, lo, lo + 32) / np.float32(-8.0)
    inverse = _reciprocal_or_zero(d)
    base = b * 18
    _put_half(out, base, d)
    for j in range(16):
        q0 = min(15, _to_int64(mul32(values[lo + j], inverse) + np.float32(8.5)))
        q1 = min(15, _to_int64(mul32(values[lo + 16 + j], inverse) + np.float32(8.5)))
        out[base + 2 + j] = np.uint8(q0 | (q1 << 4))


@device_function
def _q4_1_block(values, b, out):
    lo = b * 32
    vmin, vmax = _min_max(values, lo, lo + 32)
    d = (vmax - vmin) / np.float32(15.0)
    inverse = _reciprocal_or_zero(d)
    base = b * 20
    _put_half(out, base, d)
    _put_half(out, base + 2, vmin)
    for j in range(16):
        q0 = min(15, _to_int64(mul32(values[lo + j] - vmin, inverse) + np.float32(0.5)))
        q1 = min(15, _to_int64(mul32(values[lo + 16 + j] - vmin, inverse) + np.float32(0.5)))
        out[base + 4 + j] = np.uint8(q0 | (q1 << 4))


@device_function
def _put_q5(out, base, q, qh_offset, qs_offset):
    """Pack 32 five-bit codes: low nibbles in pairs (j, j + 16), fifth bits as a uint32."""
    high_bits = np.uint32(0)
    for j in range(32):
        high_bits |= np.uint32((q[j] >> 4) & 1) << np.uint32(j)
    _put_bytes(out, base + qh_offset, high_bits, 4)
    for j in range(16):
        out[base + qs_offset + j] = np.uint8((q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4))


@device_function
def _q5_0_block(values, b, out, q):
    lo = b * 32
    d = _signed_max(values, lo, lo + 32) / np.float32(-16.0)
    inverse = _reciprocal_or_zero(d)
    base = b * 22
    _put_half(out, base, d)
    for j in range(32):
        q[j] = min(31, _to_int64(mul32(values[lo + j], inverse) + np.float32(16.5)))
    _put_q5(out, base, q, 2, 6)


@device_function
def _q5_1_block(values, b, out, q):
    lo = b * 32
    vmin, vmax = _min_max(values, lo, lo + 32)
    d = (vmax - vmin) / np.float32(31.0)
    inverse = _reciprocal_or_zero(d)
    base = b * 24
    _put_half(out, base, d)
    _put_half(out, base + 2, vmin)
    for j in range(32):
        # gguf clips to [0, 31]; ggml does not, but its value never exceeds 31.
        q[j] = min(31, _to_int64(mul32(values[lo + j] - vmin, inverse) + np.float32(0.5)))
    _put_q5(out, base, q, 4, 8)


@cuda.jit
def _quant_q8_0(values, out):
    for b in range(cuda.grid(1), values.shape[0] // 32, cuda.gridsize(1)):
        _q8_0_block(values, b, out)


@cuda.jit
def _quant_q4_0(values, out):
    for b in range(cuda.grid(1), values.shape[0] // 32, cuda.gridsize(1)):
        _q4_0_block(values, b, out)


@cuda.jit
def _quant_q4_1(values, out):
    for b in range(cuda.grid(1), values.shape[0] // 32, cuda.gridsize(1)):
        _q4_1_block(values, b, out)


@cuda.jit
def _quant_q5_0(values, out):
    q = cuda.local.array(32, np.int64)
    for b in range(cuda.grid(1), values.shape[0] // 32, cuda.gridsize(1)):
        _q5_0_block(values, b, out, q)


@cuda.jit
def _quant_q5_1(values, out):
    q = cuda.local.array(32, np.int64)
    for b in range(cuda.grid(1), values.shape[0] // 32, cuda.gridsize(1)):
        _q5_1_block(values, b, out, q)


# ---------------------------------------------------------------- K-quantizers


@device_function
def _weighted_sums(x, lo, weights):
    """min, max, sum of weights and weighted sum of x[lo:lo + 32], in the CPU's order."""
    vmin = x[lo]
    vmax = x[lo]
    sum_w = weights[0]
    sum_x = mul32(sum_w, x[lo])
    for i in range(1, 32):
        value = x[lo + i]
        if value < vmin:
            vmin = value
        if value > vmax:
            vmax = value
        sum_w += weights[i]
        sum_x += mul32(weights[i], value)
    return vmin, vmax, sum_w, sum_x


@device_function
def _grid_levels(inverse, shifted, top, overflow, levels):
    """levels[i] = nearest level in [0, top] of inverse * shifted[i], for the 32 values."""
    for i in range(32):
        if overflow:
            levels[i] = _round_clamp_int(mul32(inverse, shifted[i]), _ZERO, top)
        else:
            levels[i] = _round_clamp(mul32(inverse, shifted[i]), _ZERO, top)


@device_function
def _fit_error(x, lo, weights, levels, scale, offset):
    """sum_i w_i (scale * L_i + offset - x_i)^2 in the CPU's order."""
    error = _ZERO
    for i in range(32):
        diff = mul32(scale, levels[i]) + offset - x[lo + i]
        error += mul32(weights[i], mul32(diff, diff))
    return error


@device_function
def _least_squares(x, lo, weights, levels, sum_w, sum_x):
    """Weighted least-squares (scale, min <= 0) for the given levels; ok False if singular."""
    sum_l = _ZERO
    sum_l2 = _ZERO
    sum_xl = _ZERO
    for i in range(32):
        weighted = mul32(weights[i], levels[i])
        sum_l += weighted
        sum_l2 += mul32(weighted, levels[i])
        sum_xl += mul32(weighted, x[lo + i])
    det = mul32(sum_w, sum_l2) - mul32(sum_l, sum_l)
    if not det > _ZERO:
        return False, _ZERO, _ZERO
    this_scale = (mul32(sum_w, sum_xl) - mul32(sum_x, sum_l)) / det
    this_min = (mul32(sum_l2, sum_x) - mul32(sum_l, sum_xl)) / det
    if this_min > _ZERO:
        this_min = _ZERO
        this_scale = sum_xl / sum_l2
    return True, this_scale, this_min


@device_function
def _make_qkx2_quants(x, lo, weights, n_max, r_min, r_delta, n_step, labels, at, labels_aux,
                      shifted):
    """ggml's make_qkx2_quants for x[lo:lo + 32] (gguf_quants._make_qkx2_quants).

    Writes the levels into labels[at:at + 32]; returns (scale, -min)."""
    vmin, vmax, sum_w, sum_x = _weighted_sums(x, lo, weights)
    if vmin > _ZERO:
        vmin = _ZERO
    if vmax == vmin:
        for i in range(32):
            labels[at + i] = 0
        return _ZERO, -vmin
    span = vmax - vmin
    for i in range(32):
        shifted[i] = x[lo + i] - vmin
    top = np.float32(n_max)
    quotient = (top + np.float32(2.0)) / span
    overflow = quotient - quotient != _ZERO  # inf or NaN: the grid scale overflowed
    inverse = top / span
    scale = _ONE / inverse
    _grid_levels(inverse, shifted, top, overflow, labels_aux)
    for i in range(32):
        labels[at + i] = np.int32(labels_aux[i])
    best_error = _fit_error(x, lo, weights, labels_aux, scale, vmin)
    for step in range(n_step + 1):
        inverse = (r_min + mul32(r_delta, np.float32(step)) + top) / span
        _grid_levels(inverse, shifted, top, overflow, labels_aux)
        ok, this_scale, this_min = _least_squares(x, lo, weights, labels_aux, sum_w, sum_x)
        if not ok:
            continue
        error = _fit_error(x, lo, weights, labels_aux, this_scale, this_min)
        if error < best_error:
            for i in range(32):
                labels[at + i] = np.int32(labels_aux[i])
            best_error = error
            scale = this_scale
            vmin = this_min
            # ggml keeps using the updated min in the grids of the following steps.
            span = vmax - vmin
            for i in range(32):
                shifted[i] = x[lo + i] - vmin
    return scale, -vmin


@device_function
def _sub_block_fits(values, lo, n_max, r_min, r_delta, n_step, levels, labels_aux, weights,
                    shifted, scales, mins):
    """The 8 sub-block fits of Q4_K / Q5_K; returns the largest scale and min."""
    max_scale = _ZERO
    max_min = _ZERO
    for j in range(8):
        sub = lo + 32 * j
        sum_x2 = _ZERO
        for i in range(32):
            sum_x2 += mul32(values[sub + i], values[sub + i])
        av_x = sqrt32(sum_x2 / np.float32(32.0))
        for i in range(32):
            weights[i] = av_x + abs(values[sub + i])
        scale, the_min = _make_qkx2_quants(values, sub, weights, n_max, r_min, r_delta, n_step,
                                           levels, 32 * j, labels_aux, shifted)
        scales[j] = scale
        mins[j] = the_min
        if scale > max_scale:
            max_scale = scale
        if the_min > max_min:
            max_min = the_min
    return max_scale, max_min


@device_function
def _pack_k_scales(out, packed, scales, mins, max_scale, max_min):
    """6-bit scales and mins of the 8 sub-blocks into the 12 bytes at out[packed:]."""
    inv_scale = np.float32(63.0) / max_scale if max_scale > _ZERO else _ZERO
    inv_min = np.float32(63.0) / max_min if max_min > _ZERO else _ZERO
    for j in range(8):
        # C stores nearest_int into a uint8 before MIN(63, .): keep that wrap-around.
        ls = min(63, _nearest_int(mul32(inv_scale, scales[j])) & 0xFF)
        lm = min(63, _nearest_int(mul32(inv_min, mins[j])) & 0xFF)
        if j < 4:
            out[packed + j] = np.uint8(ls)
            out[packed + j + 4] = np.uint8(lm)
        else:
            out[packed + j + 4] = np.uint8((ls & 0xF) | ((lm & 0xF) << 4))
            out[packed + j - 4] = np.uint8(out[packed + j - 4] | ((ls >> 4) << 6))
            out[packed + j] = np.uint8(out[packed + j] | ((lm >> 4) << 6))


@device_function
def _quantize_k_block(values, lo, out, base, n_max, r_min, r_delta, n_step, levels, labels_aux,
                      weights, shifted, scales, mins):
    """Shared first half of Q4_K and Q5_K (gguf_quants._quantize_k_block).

    Fills levels[0:256] with the codes, writes d, dmin and the 12 scale bytes at out[base:]."""
    max_scale, max_min = _sub_block_fits(values, lo, n_max, r_min, r_delta, n_step, levels,
                                         labels_aux, weights, shifted, scales, mins)
    _pack_k_scales(out, base + 4, scales, mins, max_scale, max_min)
    _put_half(out, base, max_scale / np.float32(63.0))
    _put_half(out, base + 2, max_min / np.float32(63.0))
    # Final codes against the scales as stored (rounded to 6 bits and f16).
    d_all = _half_at(out, base)
    dmin_all = _half_at(out, base + 2)
    for j in range(8):
        sc, m = _scale_min_k4(j, out, base + 4)
        d = mul32(d_all, np.float32(sc))
        if d == _ZERO:
            continue  # ggml keeps the codes of the sub-block fit here
        dm = mul32(dmin_all, np.float32(m))
        for i in range(32):
            level = _nearest_int((values[lo + 32 * j + i] + dm) / d)
            levels[32 * j + i] = min(n_max, max(0, level))


@cuda.jit
def _quant_q4_k(values, out):
    levels = cuda.local.array(QK_K, np.int32)
    labels_aux = cuda.local.array(32, np.float32)
    weights = cuda.local.array(32, np.float32)
    shifted = cuda.local.array(32, np.float32)
    scales = cuda.local.array(8, np.float32)
    mins = cuda.local.array(8, np.float32)
    for b in range(cuda.grid(1), values.shape[0] // QK_K, cuda.gridsize(1)):
        base = b * 144
        _quantize_k_block(values, b * QK_K, out, base, 15, np.float32(-1.0), np.float32(0.1),
                          20, levels, labels_aux, weights, shifted, scales, mins)
        for group in range(4):
            for i in range(32):
                low = levels[64 * group + i]
                high = levels[64 * group + 32 + i]
                out[base + 16 + 32 * group + i] = np.uint8(low | (high << 4))


@cuda.jit
def _quant_q5_k(values, out):
    levels = cuda.local.array(QK_K, np.int32)
    labels_aux = cuda.local.array(32, np.float32)
    weights = cuda.local.array(32, np.float32)
    shifted = cuda.local.array(32, np.float32)
    scales = cuda.local.array(8, np.float32)
    mins = cuda.local.array(8, np.float32)
    for b in range(cuda.grid(1), values.shape[0] // QK_K, cuda.gridsize(1)):
        base = b * 176
        _quantize_k_block(values, b * QK_K, out, base, 31, np.float32(-0.5), np.float32(0.1),
                          15, levels, labels_aux, weights, shifted, scales, mins)
        for i in range(32):
            high_bits = 0
            for group in range(4):
                low = levels[64 * group + i]
                high = levels[64 * group + 32 + i]
                high_bits |= ((low >> 4) << (2 * group)) | ((high >> 4) << (2 * group + 1))
                out[base + 48 + 32 * group + i] = np.uint8((low & 0xF) | ((high & 0xF) << 4))
            out[base + 16 + i] = np.uint8(high_bits)


@device_function
def _rmse1_sums(x, lo, inverse, lowest, highest, candidate):
    """Levels of one grid for x[lo:lo + 16] into candidate, and their x^2-weighted sums."""
    sum_lx = _ZERO
    sum_l2 = _ZERO
    for i in range(16):
        candidate[i] = _round_clamp(mul32(inverse, x[lo + i]), lowest, highest)
    for i in range(16):
        value = x[lo + i]
        weight = mul32(value, value)
        sum_lx += mul32(mul32(weight, value), candidate[i])
        sum_l2 += mul32(mul32(weight, candidate[i]), candidate[i])
    return sum_lx, sum_l2


@device_function
def _make_qx_quants_rmse1(x, lo, levels, lo_levels, candidate):
    """ggml's make_qx_quants(16, 32, ..., rmse_type=1, no weights) for x[lo:lo + 16]
    (gguf_quants._make_qx_quants_rmse1). Returns the scale."""
    amax = _ZERO
    vmax = _ZERO
    for i in range(16):
        if abs(x[lo + i]) > amax:
            amax = abs(x[lo + i])
            vmax = x[lo + i]
    if amax < _GROUP_MAX_EPS:
        for i in range(16):
            levels[lo_levels + i] = 0
        return _ZERO
    lowest = np.float32(-32.0)
    highest = np.float32(31.0)
    sum_lx, sum_l2 = _rmse1_sums(x, lo, np.float32(-32.0) / vmax, lowest, highest, candidate)
    for i in range(16):
        levels[lo_levels + i] = np.int32(candidate[i]) + 32
    scale = sum_lx / sum_l2 if sum_l2 != _ZERO else _ZERO
    best = mul32(scale, sum_lx)
    for step in range(-9, 10):
        if step == 0:
            continue
        inverse = -(np.float32(32.0) + mul32(np.float32(0.1), np.float32(step))) / vmax
        sum_lx, sum_l2 = _rmse1_sums(x, lo, inverse, lowest, highest, candidate)
        if sum_l2 > _ZERO and mul32(sum_lx, sum_lx) > mul32(best, sum_l2):
            for i in range(16):
                levels[lo_levels + i] = np.int32(candidate[i]) + 32
            scale = sum_lx / sum_l2
            best = mul32(scale, sum_lx)
    return scale


@device_function
def _q6_k_scales(values, lo, out, base, levels, candidate, scales):
    """The 16 group fits; writes d and the int8 scales. Returns False for an all-zero block."""
    max_scale = _ZERO
    max_abs_scale = _ZERO
    for g in range(16):
        scale = _make_qx_quants_rmse1(values, lo + 16 * g, levels, 16 * g, candidate)
        scales[g] = scale
        if abs(scale) > max_abs_scale:
            max_abs_scale = abs(scale)
            max_scale = scale
    if max_abs_scale < _GROUP_MAX_EPS:
        for k in range(210):
            out[base + k] = 0  # ggml writes an all-zero block (d = +0.0)
        return False
    inverse = np.float32(-128.0) / max_scale
    _put_half(out, base + 208, _ONE / inverse)
    for g in range(16):
        # C stores MIN(127, nearest_int(.)) into an int8: keep its low byte.
        out[base + 192 + g] = np.uint8(min(127, _nearest_int(mul32(inverse, scales[g]))) & 0xFF)
    return True


@device_function
def _q6_k_block(values, b, out, levels, candidate, scales):
    lo = b * QK_K
    base = b * 210
    if not _q6_k_scales(values, lo, out, base, levels, candidate, scales):
        return
    d_all = _half_at(out, base + 208)
    for g in range(16):
        d = mul32(d_all, np.float32(np.int8(out[base + 192 + g])))
        if d == _ZERO:
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


@cuda.jit
def _quant_q6_k(values, out):
    levels = cuda.local.array(QK_K, np.int32)
    candidate = cuda.local.array(16, np.float32)
    scales = cuda.local.array(16, np.float32)
    for b in range(cuda.grid(1), values.shape[0] // QK_K, cuda.gridsize(1)):
        _q6_k_block(values, b, out, levels, candidate, scales)


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
