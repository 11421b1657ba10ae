"""GGUF block quantizers, one block at a time: one source for the CPU and the CUDA kernels.

kernels/gguf_quants.py runs these over blocks with ``prange`` on the CPU; kernels/cuda/
gguf_quants.py compiles the same code for the GPU (see kernels/shared_code.py) and runs one
block per thread. Both follow llama.cpp's reference quantizers (``quantize_row_q4_K_ref`` and
friends in ggml-quants.c, and the gguf package for the 32-element types) step by step in
float32, so the bytes are the same on either device:

* every product goes through ``mul32``, which a GPU compiler can never fuse with a sum into
  an FMA (the CPU never fuses: numba leaves ``fastmath`` off);
* every constant is a float32 (Python floats are float64 in numba and would promote);
* a float ``max`` that a NaN could reach is ``_max`` (numba's builtin select, which a
  device's fmaxf would not be for NaN; see _round_clamp for where none can);
* float-to-integer conversions go through ``to_int64``, which gives x86's
  0x8000000000000000 for NaN or out of range, where a device saturates.

The primitives each device supplies are the names in shared_code.PRIMITIVES; the CPU's are
in kernels/primitives.py.
"""

import numpy as np

from .primitives import bits_from_f32, f32_from_bits, floor32, mul32, sqrt32, to_int64
from .scalars import half_bits_to_f32
from .shared_code import shared

QK_K = 256
_GROUP_MAX_EPS = np.float32(1e-15)  # ggml's "all zero" threshold for a group
_MAGIC_ROUND = np.float32(12582912.0)  # 1.5 * 2**23: adding it rounds to an integer
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)


# ---------------------------------------------------------------- scalar helpers


@shared
def _max(acc, value):
    """numba's builtin max(acc, value) on floats (a device's fmaxf treats NaN otherwise)."""
    return value if value > acc else acc


@shared
def _nearest_int(value):
    """ggml's nearest_int, through the float32 magic-number trick as the C code spells it."""
    shifted = value + _MAGIC_ROUND
    return np.int64(bits_from_f32(shifted) & np.uint32(0x007FFFFF)) - np.int64(0x00400000)


@shared
def _round_clamp(value, lowest, highest):
    """nearest_int(value) clamped to [lowest, highest], as a float32 (bounded grids).

    Builtin min and max vectorise on the CPU (selects like _max's did not, a tenth
    slower in Q6_K). On a GPU numba-cuda makes them fmaxf and fminf, which differ from the
    CPU's select only for NaN and for zeros of both signs; neither matters here: the bounds
    are never NaN, a NaN level becomes lowest either way, and the level is never -0.0
    (x - x is +0.0)."""
    level = (value + _MAGIC_ROUND) - _MAGIC_ROUND
    return min(highest, max(lowest, level))


@shared
def _round_clamp_int(value, lowest, highest):
    """_round_clamp through the C bit trick itself, for grids whose scale overflowed."""
    return np.float32(min(np.int64(highest), max(np.int64(lowest), _nearest_int(value))))


@shared
def half_at(raw, offset):
    """float32 of the little-endian float16 at raw[offset:offset + 2] (exact)."""
    bits = np.uint32(raw[offset]) | (np.uint32(raw[offset + 1]) << np.uint32(8))
    return half_bits_to_f32(bits)


@shared
def f32_to_half_bits(value):
    """numpy's float32 -> float16 conversion, bit for bit, without branches (vectorises).

    Round to nearest even; a NaN keeps its sign and the top of its payload, forced non-zero,
    as numpy does (so gguf.quants' bytes are matched)."""
    bits = bits_from_f32(value)
    sign = (bits >> np.uint32(16)) & np.uint32(0x8000)
    magnitude = bits & np.uint32(0x7FFFFFFF)
    # Normal halves: rebias the exponent by -112 and round the 13 dropped bits to even
    # (from 2**-15 up, so the subtraction never wraps where this value goes unused).
    floor = np.uint32(0x38000000)
    normal_bits = magnitude if magnitude > floor else floor
    normal = (normal_bits - floor + np.uint32(0xFFF) + ((normal_bits >> np.uint32(13))
                                                         & np.uint32(1))) >> np.uint32(13)
    # Below 2**-14: adding 0.5 makes the float adder round to a multiple of 2**-24 (RNE).
    subnormal = bits_from_f32(f32_from_bits(magnitude) + np.float32(0.5)) - np.uint32(0x3F000000)
    nan = np.uint32(0x7C00) + ((magnitude & np.uint32(0x007FFFFF)) >> np.uint32(13))
    nan += np.uint32(nan == np.uint32(0x7C00))
    half = subnormal if magnitude < np.uint32(0x38800000) else normal
    half = np.uint32(0x7C00) if magnitude >= np.uint32(0x477FF000) else half  # >= 65520: inf
    half = nan if magnitude > np.uint32(0x7F800000) else half
    return sign | half


@shared
def bf16_bits(bits):
    """float32 bits -> bfloat16 bits, rounded to nearest even; a NaN is forced quiet and
    loses its low payload, as gguf (like ggml_compute_fp32_to_bf16) does."""
    if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        bits = (bits & np.uint32(0xFFFF0000)) | np.uint32(0x00400000)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (bits + rounding) >> np.uint32(16)


@shared
def put_bytes(out, offset, bits, count):
    """The low count bytes of bits, little-endian, at out[offset:]."""
    for k in range(count):
        out[offset + k] = np.uint8((bits >> np.uint32(8 * k)) & np.uint32(0xFF))


@shared
def _put_half(out, offset, value):
    put_bytes(out, offset, f32_to_half_bits(value), 2)


@shared
def _reciprocal_or_zero(d):
    return _ZERO if d == _ZERO else _ONE / d


@shared
def scale_min_k4(j, raw, base):
    """The 6-bit scale and min of sub-block j from the 12 packed bytes at raw[base:]."""
    if j < 4:
        return np.int64(raw[base + j] & 63), np.int64(raw[base + j + 4] & 63)
    scale = np.int64(raw[base + j + 4] & 0x0F) | (np.int64(raw[base + j - 4] >> 6) << 4)
    low_min = np.int64(raw[base + j + 4] >> 4) | (np.int64(raw[base + j] >> 6) << 4)
    return scale, low_min


@shared
def _signed_max(values, lo, hi):
    """The value of largest magnitude, the first one on ties (as ggml)."""
    amax = _ZERO
    vmax = _ZERO
    for j in range(lo, hi):
        if amax < abs(values[j]):
            amax = abs(values[j])
            vmax = values[j]
    return vmax


@shared
def _min_max(values, lo, hi):
    vmin = values[lo]
    vmax = values[lo]
    for j in range(lo + 1, hi):
        if values[j] < vmin:
            vmin = values[j]
        if values[j] > vmax:
            vmax = values[j]
    return vmin, vmax


@shared
def q8_0_block(values, b, out):
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
        rounded = to_int64(floored + floor32(mul32(np.float32(2.0), magnitude - floored)))
        if scaled < _ZERO:
            rounded = -rounded
        out[base + 2 + j] = np.uint8(rounded & 0xFF)


@shared
def _put_signed_scale(values, lo, out, base, divisor):
    """The Q4_0 / Q5_0 header: d = (the value of largest magnitude) / divisor, as a half at
    out[base:]. Returns 1 / d (0 for d = 0)."""
    d = _signed_max(values, lo, lo + 32) / divisor
    _put_half(out, base, d)
    return _reciprocal_or_zero(d)


@shared
def q4_0_block(values, b, out):
    lo = b * 32
    base = b * 18
    inverse = _put_signed_scale(values, lo, out, base, np.float32(-8.0))
    for j in range(16):
        q0 = min(15, to_int64(mul32(values[lo + j], inverse) + np.float32(8.5)))
        q1 = min(15, to_int64(mul32(values[lo + 16 + j], inverse) + np.float32(8.5)))
        out[base + 2 + j] = np.uint8(q0 | (q1 << 4))


@shared
def _put_scale_and_min(values, lo, out, base, top):
    """The Q4_1 / Q5_1 header: d = (max - min) / top and the min, as halves at out[base:].
    Returns the min and 1 / d (0 for d = 0)."""
    vmin, vmax = _min_max(values, lo, lo + 32)
    d = (vmax - vmin) / top
    _put_half(out, base, d)
    _put_half(out, base + 2, vmin)
    return vmin, _reciprocal_or_zero(d)


@shared
def q4_1_block(values, b, out):
    lo = b * 32
    base = b * 20
    vmin, inverse = _put_scale_and_min(values, lo, out, base, np.float32(15.0))
    for j in range(16):
        q0 = min(15, to_int64(mul32(values[lo + j] - vmin, inverse) + np.float32(0.5)))
        q1 = min(15, to_int64(mul32(values[lo + 16 + j] - vmin, inverse) + np.float32(0.5)))
        out[base + 4 + j] = np.uint8(q0 | (q1 << 4))


@shared
def _put_q5(out, base, q, qh_offset, qs_offset):
    """Pack 32 five-bit codes: low nibbles in pairs (j, j + 16), fifth bits as a uint32."""
    high_bits = np.uint32(0)
    for j in range(32):
        high_bits |= np.uint32((q[j] >> 4) & 1) << np.uint32(j)
    put_bytes(out, base + qh_offset, high_bits, 4)
    for j in range(16):
        out[base + qs_offset + j] = np.uint8((q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4))


@shared
def q5_0_block(values, b, out, q):
    lo = b * 32
    base = b * 22
    inverse = _put_signed_scale(values, lo, out, base, np.float32(-16.0))
    for j in range(32):
        q[j] = min(31, to_int64(mul32(values[lo + j], inverse) + np.float32(16.5)))
    _put_q5(out, base, q, 2, 6)


@shared
def q5_1_block(values, b, out, q):
    lo = b * 32
    base = b * 24
    vmin, inverse = _put_scale_and_min(values, lo, out, base, np.float32(31.0))
    for j in range(32):
        # gguf clips to [0, 31]; ggml does not, but its value never exceeds 31.
        q[j] = min(31, to_int64(mul32(values[lo + j] - vmin, inverse) + np.float32(0.5)))
    _put_q5(out, base, q, 4, 8)


@shared(inline=False)
def _make_qkx2_quants(x, lo, weights, n_max, r_min, r_delta, n_step, labels, at, labels_aux,
                      shifted):
    """ggml's make_qkx2_quants for the 32 values x[lo:lo + 32] (weighted squared error).

    Fits x ~ scale * L - min_value with L in [0, n_max]: starts from the plain min/max grid,
    then tries n_step + 1 stretched grids, each refined by weighted least squares, and keeps
    the one of least weighted error; each new best min also moves the following grids.
    Writes L into labels[at:at + 32]; returns (scale, min_value). The loops stay in line: as
    a helper taking arrays, the grid loop ran the CPU's K-quantizers a fifth slower."""
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
    # Only a span so small (all |x| < ~1e-37) that the grid scale overflows to inf needs
    # ggml's exact integer trick; everywhere else the float32 rounding is the same.
    quotient = (top + np.float32(2.0)) / span
    overflow = quotient - quotient != _ZERO  # inf or NaN
    scale = _ZERO
    best_error = _ZERO
    # Step -1 is the plain grid; steps 0..n_step stretch it and refit by least squares.
    for step in range(-1, n_step + 1):
        if step < 0:
            inverse = top / span
        else:
            inverse = (r_min + mul32(r_delta, np.float32(step)) + top) / span
        if overflow:
            for i in range(32):
                labels_aux[i] = _round_clamp_int(mul32(inverse, shifted[i]), _ZERO, top)
        else:
            for i in range(32):  # no loop-carried dependency: vectorises on the CPU
                labels_aux[i] = _round_clamp(mul32(inverse, shifted[i]), _ZERO, top)
        if step < 0:
            this_scale = _ONE / inverse
            this_min = vmin
        else:
            sum_l = _ZERO
            sum_l2 = _ZERO
            sum_xl = _ZERO
            for i in range(32):
                weighted = mul32(weights[i], labels_aux[i])
                sum_l += weighted
                sum_l2 += mul32(weighted, labels_aux[i])
                sum_xl += mul32(weighted, x[lo + i])
            det = mul32(sum_w, sum_l2) - mul32(sum_l, sum_l)
            if not det > _ZERO:
                continue
            this_scale = (mul32(sum_w, sum_xl) - mul32(sum_x, sum_l)) / det
            this_min = (mul32(sum_l2, sum_x) - mul32(sum_l, sum_xl)) / det
            if this_min > _ZERO:
                this_min = _ZERO
                this_scale = sum_xl / sum_l2
        error = _ZERO
        for i in range(32):
            diff = mul32(this_scale, labels_aux[i]) + this_min - x[lo + i]
            error += mul32(weights[i], mul32(diff, diff))
        if step < 0 or error < best_error:
            for i in range(32):
                labels[at + i] = np.int32(labels_aux[i])
            best_error = error
            scale = this_scale
            if step >= 0:
                vmin = this_min
                # ggml keeps using the updated min in the grids of the following steps.
                span = vmax - vmin
                for i in range(32):
                    shifted[i] = x[lo + i] - vmin
    return scale, -vmin


@shared
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


@shared
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


@shared
def _quantize_k_block(values, lo, out, base, n_max, r_min, r_delta, n_step, levels, labels_aux,
                      weights, shifted, scales, mins):
    """The first half of Q4_K and Q5_K: 8 sub-block fits, then 6-bit scales and mins.

    Fills levels[0:256] with the codes, writes d, dmin and the 12 scale bytes at out[base:]."""
    max_scale, max_min = _sub_block_fits(values, lo, n_max, r_min, r_delta, n_step, levels,
                                         labels_aux, weights, shifted, scales, mins)
    _pack_k_scales(out, base + 4, scales, mins, max_scale, max_min)
    _put_half(out, base, max_scale / np.float32(63.0))
    _put_half(out, base + 2, max_min / np.float32(63.0))
    # Final codes against the scales as stored (rounded to 6 bits and f16).
    d_all = half_at(out, base)
    dmin_all = half_at(out, base + 2)
    for j in range(8):
        sc, m = scale_min_k4(j, out, base + 4)
        d = mul32(d_all, np.float32(sc))
        if d == _ZERO:
            continue  # ggml keeps the codes of the sub-block fit here
        dm = mul32(dmin_all, np.float32(m))
        for i in range(32):
            level = _nearest_int((values[lo + 32 * j + i] + dm) / d)
            levels[32 * j + i] = min(n_max, max(0, level))


@shared
def q4_k_block(values, b, out, levels, labels_aux, weights, shifted, scales, mins):
    base = b * 144
    _quantize_k_block(values, b * QK_K, out, base, 15, np.float32(-1.0), np.float32(0.1), 20,
                      levels, labels_aux, weights, shifted, scales, mins)
    for group in range(4):
        for i in range(32):
            low = levels[64 * group + i]
            high = levels[64 * group + 32 + i]
            out[base + 16 + 32 * group + i] = np.uint8(low | (high << 4))


@shared
def q5_k_block(values, b, out, levels, labels_aux, weights, shifted, scales, mins):
    base = b * 176
    _quantize_k_block(values, b * QK_K, out, base, 31, np.float32(-0.5), np.float32(0.1), 15,
                      levels, labels_aux, weights, shifted, scales, mins)
    for i in range(32):
        high_bits = 0
        for group in range(4):
            low = levels[64 * group + i]
            high = levels[64 * group + 32 + i]
            high_bits |= ((low >> 4) << (2 * group)) | ((high >> 4) << (2 * group + 1))
            out[base + 48 + 32 * group + i] = np.uint8((low & 0xF) | ((high & 0xF) << 4))
        out[base + 16 + i] = np.uint8(high_bits)


@shared(inline=False)
def _make_qx_quants_rmse1(x, lo, levels, lo_levels, candidate):
    """ggml's make_qx_quants(16, 32, ..., rmse_type=1, no weights) for x[lo:lo + 16].

    Symmetric 6-bit codes (levels in [0, 63], meaning L - 32) under an x^2-weighted error,
    trying 18 stretched grids around 32 / max. Returns the scale. The loops stay in line, as
    in _make_qkx2_quants."""
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
    scale = _ZERO
    best = _ZERO
    # Step -10 is the plain grid, kept whatever its error; steps -9..9 (not 0) stretch it.
    for step in range(-10, 10):
        if step == 0:
            continue
        if step < -9:
            inverse = np.float32(-32.0) / vmax
        else:
            inverse = -(np.float32(32.0) + mul32(np.float32(0.1), np.float32(step))) / vmax
        for i in range(16):  # no loop-carried dependency: vectorises on the CPU
            candidate[i] = _round_clamp(mul32(inverse, x[lo + i]), lowest, highest)
        sum_lx = _ZERO
        sum_l2 = _ZERO
        for i in range(16):
            value = x[lo + i]
            weight = mul32(value, value)
            sum_lx += mul32(mul32(weight, value), candidate[i])
            sum_l2 += mul32(mul32(weight, candidate[i]), candidate[i])
        if step < -9 or (sum_l2 > _ZERO and mul32(sum_lx, sum_lx) > mul32(best, sum_l2)):
            for i in range(16):
                levels[lo_levels + i] = np.int32(candidate[i]) + 32
            scale = sum_lx / sum_l2 if sum_l2 != _ZERO else _ZERO
            best = mul32(scale, sum_lx)
    return scale


@shared
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


@shared
def q6_k_block(values, b, out, levels, candidate, scales):
    lo = b * QK_K
    base = b * 210
    if not _q6_k_scales(values, lo, out, base, levels, candidate, scales):
        return
    d_all = half_at(out, base + 208)
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
