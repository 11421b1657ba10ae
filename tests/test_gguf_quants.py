"""GGUF block formats: Numba kernels against gguf.quants, and llama.cpp's quantization mixes."""

import hashlib

import gguf
import gguf.quants
import numpy as np
import pytest

from lowmem_merge.errors import MergeError
from lowmem_merge.io import gguf_mixes
from lowmem_merge.kernels import gguf_quants as gq

T = gguf.GGMLQuantizationType
QK_K = 256

# Byte offsets of the float16 fields of each block (d, dmin, m), so random blocks can hold
# finite scales; every other byte of a block is any value.
HALF_FIELDS = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
    T.TQ1_0: (52,), T.TQ2_0: (64,), T.IQ2_XXS: (0,), T.IQ2_XS: (0,), T.IQ2_S: (0,),
    T.IQ3_XXS: (0,), T.IQ3_S: (0,), T.IQ1_S: (0,), T.IQ4_NL: (0,), T.IQ4_XS: (0,),
}
DEQUANTIZABLE = [t for t in T if gq.can_dequantize(t.value)]
SIMPLE_QUANTS = [T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]
K_QUANTS = [T.Q4_K, T.Q5_K, T.Q6_K]


def random_blocks(qtype: T, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    _, block_bytes = gq.block_layout(qtype)
    raw = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
    for offset in HALF_FIELDS.get(qtype, ()):
        halves = rng.standard_normal(n_blocks).astype(np.float16)
        raw[:, offset:offset + 2] = halves.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(-1)


def quantize(values: np.ndarray, qtype: T) -> np.ndarray:
    block_elements, block_bytes = gq.block_layout(qtype)
    out = np.empty(values.size // block_elements * block_bytes, np.uint8)
    gq.quantize_into(np.ascontiguousarray(values, np.float32), qtype.value, out)
    return out


def gguf_decode(raw: np.ndarray, qtype: T) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(raw, qtype), np.float32).reshape(-1)


def test_layout_and_capabilities():
    assert gq.block_layout(T.Q4_K.value) == (256, 144)
    assert gq.block_layout(T.Q8_0.value) == (32, 34)
    assert gq.can_dequantize(T.IQ2_XXS.value) and not gq.can_dequantize(T.Q8_K.value)
    assert not gq.can_dequantize(12345)
    assert {t for t in T if gq.can_quantize(t.value)} == {
        T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # gguf's MXFP4 overflows on random scales
@pytest.mark.parametrize("qtype", DEQUANTIZABLE, ids=lambda t: t.name)
def test_dequantize_matches_gguf_bit_for_bit(qtype):
    rng = np.random.default_rng(qtype.value)
    block_elements, _ = gq.block_layout(qtype)
    for n_blocks in (1, 7, 33):
        raw = random_blocks(qtype, n_blocks * (256 if block_elements == 1 else 1), rng)
        out = np.full(raw.size // gq.block_layout(qtype)[1] * block_elements, np.nan, np.float32)
        gq.dequantize_into(raw, qtype.value, out)
        # Compared as bits: NaN payloads of random F16/BF16/F32 patterns must survive too.
        assert np.array_equal(out.view(np.uint32), gguf_decode(raw, qtype).view(np.uint32))


def test_bad_buffers_are_refused():
    with pytest.raises(ValueError):
        gq.dequantize_into(np.zeros(35, np.uint8), T.Q8_0.value, np.empty(32, np.float32))
    with pytest.raises(ValueError):
        gq.quantize_into(np.zeros(48, np.float32), T.Q8_0.value, np.empty(51, np.uint8))
    with pytest.raises(ValueError):
        gq.quantize_into(np.zeros(256, np.float32), T.Q2_K.value, np.empty(84, np.uint8))
    with pytest.raises(ValueError):
        gq.quantize_into(np.zeros(64, np.float64), T.Q8_0.value, np.empty(68, np.uint8))


def simple_datasets() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    n = 32 * 64
    zeros = rng.standard_normal(n).astype(np.float32)
    zeros[64:256] = 0.0  # whole blocks of zeros: d == 0, the reciprocal must be 0, not inf
    half_steps = rng.integers(-16, 17, n).astype(np.float32) / 2
    half_steps[::32] = -8.0  # Q4_0: d = 1 exactly, so x + 8.5 lands on integers
    ties_q8 = rng.integers(-254, 255, n).astype(np.float32) / 2
    ties_q8[::32] = 127.0  # Q8_0: d = 1 exactly, every odd value is a .5 tie for roundf
    ties_q5 = rng.integers(-32, 33, n).astype(np.float32) / 2
    ties_q5[::32] = -16.0  # Q5_0: d = 1 exactly
    return {
        "normal": rng.standard_normal(n).astype(np.float32),
        "weights": (rng.standard_normal(n) * 0.02).astype(np.float32),
        "zero_blocks": zeros,
        "tiny": (rng.standard_normal(n) * 1e-7).astype(np.float32),  # f16 d underflows
        "tiny_f32": (rng.standard_normal(n) * 1e-36).astype(np.float32),  # 1/d still finite
        "huge": (rng.standard_normal(n) * 1e6).astype(np.float32),  # f16 d overflows
        "half_steps": half_steps,
        "ties_q8": ties_q8,
        "ties_q5": ties_q5,
        "positive": np.abs(rng.standard_normal(n)).astype(np.float32) + 1,
    }


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # gguf's float16 casts overflow on "huge"
@pytest.mark.parametrize("qtype", SIMPLE_QUANTS, ids=lambda t: t.name)
def test_quantize_matches_gguf_bytes(qtype):
    for name, values in simple_datasets().items():
        expected = np.asarray(gguf.quants.quantize(values, qtype)).view(np.uint8).reshape(-1)
        assert np.array_equal(quantize(values, qtype), expected), name


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy warns on float16 overflow
@pytest.mark.parametrize("qtype", [T.F16, T.BF16], ids=lambda t: t.name)
def test_float_encodings_match_gguf_on_special_values(qtype):
    rng = np.random.default_rng(3)
    bits = np.concatenate([rng.integers(0, 2**32, 4096, dtype=np.uint64),
                           np.arange(0, 2**32, 65537, dtype=np.uint64)]).astype(np.uint32)
    bits[:8] = [0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFA00000, 0x7F7FFFFF,
                0x477FF000, 0x33000001]  # inf, NaNs (quiet, signalling), max, rounding edges
    values = bits.view(np.float32)
    expected = np.asarray(gguf.quants.quantize(values, qtype)).view(np.uint8).reshape(-1)
    assert np.array_equal(quantize(values, qtype), expected)


def test_f32_quantize_is_a_copy():
    values = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    assert np.array_equal(quantize(values, T.F32).view(np.float32), values)


def llama_cpp_synthetic(offset: float, n: int = 32 * 128) -> np.ndarray:
    """generate_data of llama.cpp's tests/test-quantize-fns.cpp: 0.1 + 2 cos(i + offset)."""
    angles = np.arange(n, dtype=np.float32) + np.float32(offset)
    return (0.1 + 2.0 * np.cos(angles).astype(np.float32)).astype(np.float32)


def llama_cpp_rmse(a: np.ndarray, b: np.ndarray) -> float:
    """array_rmse of test-quantize-fns.cpp (sqrt of the summed squares, divided by n)."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    return float(np.sqrt(np.sum(diff * diff)) / diff.size)


@pytest.mark.parametrize("qtype", K_QUANTS + [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1],
                         ids=lambda t: t.name)
def test_llama_cpp_total_quantization_error(qtype):
    # MAX_QUANTIZATION_TOTAL_ERROR of test-quantize-fns.cpp for these types.
    values = llama_cpp_synthetic(0.0)
    assert llama_cpp_rmse(values, gguf_decode(quantize(values, qtype), qtype)) < 0.002


# Relative RMS error bounds on N(0, 1) data. A uniform grid of step s has RMS error s/sqrt(12);
# the expected range of 32 normal samples is 4.12 sigma, so Q4_K's 15 steps give 0.079 and
# Q5_K's 31 steps 0.038; Q6_K spans +-max|x| of 16 samples (2 x 2.0 sigma) in 63 steps: 0.018.
# The fitted grids do a little better (measured: 0.071, 0.036, 0.0175); the bounds are the
# plain-grid estimates plus a margin, so a broken fit (or lost scale bits) fails them.
REL_RMS_BOUND = {T.Q4_K: 0.080, T.Q5_K: 0.040, T.Q6_K: 0.019}


def test_k_quant_error_on_normal_data_is_bounded_and_ordered():
    values = np.random.default_rng(11).standard_normal(QK_K * 512).astype(np.float32)
    errors = {}
    for qtype in K_QUANTS:
        decoded = gguf_decode(quantize(values, qtype), qtype)
        errors[qtype] = float(np.linalg.norm(decoded - values) / np.linalg.norm(values))
        assert errors[qtype] < REL_RMS_BOUND[qtype], (qtype.name, errors[qtype])
    assert errors[T.Q6_K] < errors[T.Q5_K] < errors[T.Q4_K]


def unpack_k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """6-bit scales and mins of Q4_K / Q5_K from their 12 bytes (n_blocks, 12), by the layout
    of ggml's block_q4_K rather than by gguf's code."""
    packed = packed.astype(np.int64)
    scales = np.empty((packed.shape[0], 8), np.int64)
    mins = np.empty((packed.shape[0], 8), np.int64)
    for j in range(8):
        if j < 4:
            scales[:, j] = packed[:, j] & 63
            mins[:, j] = packed[:, j + 4] & 63
        else:
            scales[:, j] = (packed[:, j + 4] & 0xF) | ((packed[:, j - 4] >> 6) << 4)
            mins[:, j] = (packed[:, j + 4] >> 4) | ((packed[:, j] >> 6) << 4)
    return scales, mins


def half(raw: np.ndarray, offset: int) -> np.ndarray:
    return raw[:, offset:offset + 2].copy().view(np.float16).astype(np.float64).reshape(-1)


def k_codes(raw: np.ndarray, qtype: T) -> np.ndarray:
    """Integer codes (n_blocks, 256) in element order, from the documented bit layouts."""
    n = raw.shape[0]
    codes = np.empty((n, QK_K), np.int64)
    if qtype == T.Q6_K:
        ql, qh = raw[:, :128].astype(np.int64), raw[:, 128:192].astype(np.int64)
        for h in range(2):
            low, high = ql[:, 64 * h:64 * h + 64], qh[:, 32 * h:32 * h + 32]
            for k, (nibbles, shift) in enumerate(((low[:, :32], 0), (low[:, 32:], 0),
                                                  (low[:, :32], 4), (low[:, 32:], 4))):
                codes[:, 128 * h + 32 * k:128 * h + 32 * k + 32] = (
                    ((nibbles >> shift) & 0xF) | (((high >> (2 * k)) & 3) << 4)) - 32
        return codes
    qs_at = 16 if qtype == T.Q4_K else 48
    qs = raw[:, qs_at:qs_at + 128].astype(np.int64)
    qh = raw[:, 16:48].astype(np.int64)
    for g in range(4):
        for k in range(2):
            part = (qs[:, 32 * g:32 * g + 32] >> (4 * k)) & 0xF
            if qtype == T.Q5_K:
                part |= ((qh >> (2 * g + k)) & 1) << 4
            codes[:, 64 * g + 32 * k:64 * g + 32 * k + 32] = part
    return codes


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda t: t.name)
def test_k_quant_fields_reproduce_the_decoding_and_codes_are_nearest(qtype):
    rng = np.random.default_rng(5)
    values = np.concatenate([
        rng.standard_normal(QK_K * 64) * 0.02,
        rng.standard_t(3, QK_K * 32),
        np.abs(rng.standard_normal(QK_K * 16)) + 0.5,  # all positive: min clamps to 0
    ]).astype(np.float32)
    _, block_bytes = gq.block_layout(qtype)
    raw = quantize(values, qtype).reshape(-1, block_bytes)
    codes = k_codes(raw, qtype)
    x = values.astype(np.float64).reshape(-1, QK_K)
    if qtype == T.Q6_K:
        group_scale = half(raw, 208)[:, None] * raw[:, 192:208].view(np.int8).astype(np.float64)
        step = np.repeat(group_scale, 16, axis=1)
        offset = np.zeros_like(step)
        lowest, highest = -32, 31
    else:
        scales, mins = unpack_k_scales(raw[:, 4:16])
        step = np.repeat(half(raw, 0)[:, None] * scales, 32, axis=1)
        offset = np.repeat(half(raw, 2)[:, None] * mins, 32, axis=1)
        lowest, highest = 0, 15 if qtype == T.Q4_K else 31
    reconstruction = step * codes - offset
    # Our float64 reading of the fields agrees with gguf's float32 decoding of the same bytes.
    decoded = gguf_decode(raw.reshape(-1), qtype).reshape(-1, QK_K)
    np.testing.assert_allclose(decoded, reconstruction, rtol=1e-6, atol=1e-6 * np.abs(x).max())
    # Given the stored scales, every code is the nearest level (up to float32 ties).
    live = step > 0
    ideal = np.clip((x + offset)[live] / step[live], lowest, highest)
    assert np.all(np.abs(codes[live] - ideal) <= 0.5 + 1e-4)


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda t: t.name)
def test_k_quant_degenerate_blocks(qtype):
    blocks = np.zeros((5, QK_K), np.float32)
    blocks[1] = 3.25  # constant block
    blocks[2, 17] = -1.5  # one non-zero value
    blocks[3] = np.float32(1e-30) * np.arange(QK_K)  # below float16 resolution
    blocks[4, ::2] = 1.0
    decoded = gguf_decode(quantize(blocks.reshape(-1), qtype), qtype).reshape(5, QK_K)
    assert np.all(np.isfinite(decoded))
    assert np.all(decoded[0] == 0.0)
    assert np.max(np.abs(decoded - blocks)) <= 0.05 * np.max(np.abs(blocks), axis=None)


# SHA-256 of our bytes for fixed inputs. At the time of writing these bytes were identical,
# block for block, to llama.cpp's quantize_row_q{4,5,6}_K_ref compiled with gcc -O2
# -ffp-contract=off; the pins catch any later drift in the float32 arithmetic.
PINNED_SHA256 = {
    T.Q4_K: "6f2e037cb013092052967925c090087d8bddd0f383cf60dd1b3fffb42c290de7",
    T.Q5_K: "be3a9c1ab92b689b648323706dd2cc77cb34612da973464bfa4205098e9db85b",
    T.Q6_K: "d42bceccd46883f3eb0c2a1abba833276860cb0a5434bc30d4e9a22be49907ad",
}


def pinned_input() -> np.ndarray:
    """Deterministic data from integer arithmetic only (no numpy generator or libm, whose
    float32 results may change between versions and CPUs): LCG noise, a different scale and
    offset per 32 values, so blocks have both signs, skews and outliers."""
    state = 12345
    draws = np.empty(QK_K * 16 * 2, np.float64)
    for i in range(draws.size):
        state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
        draws[i] = (state >> 40) / 2**24 - 0.5
    noise, shape = draws[:QK_K * 16], draws[QK_K * 16:].reshape(-1, 32)
    scale = np.repeat(0.01 + 0.04 * np.abs(shape[:, 0]), 32)
    offset = np.repeat(0.02 * shape[:, 1], 32)
    values = noise * scale + offset
    values[::97] *= 8.0  # outliers
    return values.astype(np.float32)


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda t: t.name)
def test_k_quant_bytes_are_pinned(qtype):
    digest = hashlib.sha256(quantize(pinned_input(), qtype).tobytes()).hexdigest()
    assert digest == PINNED_SHA256[qtype]


# ---------------------------------------------------------------- quantization mixes

N_LAYERS = 32
# Layers with more bits in the _M mixes (use_more_bits, 32 layers): the first and last
# eighth (0-3, 28-31) and every third layer from 4 on (6, 9, ..., 27).
MORE_BITS = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}

SHAPES = {
    "token_embd.weight": (32000, 4096),
    "output.weight": (32000, 4096),
    "output_norm.weight": (4096,),
    "blk.{i}.attn_norm.weight": (4096,),
    "blk.{i}.attn_q.weight": (4096, 4096),
    "blk.{i}.attn_k.weight": (1024, 4096),
    "blk.{i}.attn_v.weight": (1024, 4096),
    "blk.{i}.attn_output.weight": (4096, 4096),
    "blk.{i}.attn_q.bias": (4096,),
    "blk.{i}.ffn_gate.weight": (11008, 4096),
    "blk.{i}.ffn_up.weight": (11008, 4096),
    "blk.{i}.ffn_down.weight": (4096, 11008),
}


def expected_type(file_type: str, name: str, layer: int) -> T:
    """The rules of llama-quant.cpp, applied by hand for a 32-layer llama (untied output)."""
    if name.endswith(("norm.weight", ".bias")):
        return T.F32
    default = {"Q4_K_M": T.Q4_K, "Q4_K_S": T.Q4_K, "Q5_K_S": T.Q5_K, "Q6_K": T.Q6_K,
               "Q8_0": T.Q8_0}[file_type]
    if name == "output.weight":
        return T.Q8_0 if default == T.Q8_0 else T.Q6_K
    if "attn_v" in name or "ffn_down" in name:
        if file_type == "Q4_K_M" and layer in MORE_BITS:
            return T.Q6_K
        if file_type == "Q4_K_S" and layer < (4 if "attn_v" in name else N_LAYERS // 8):
            return T.Q5_K
    return default


@pytest.mark.parametrize("file_type", ["Q4_K_M", "Q4_K_S", "Q5_K_S", "Q6_K", "Q8_0"])
def test_mix_table_for_a_32_layer_llama(file_type):
    for pattern, shape in SHAPES.items():
        for layer in range(N_LAYERS) if "{i}" in pattern else [0]:
            name = pattern.format(i=layer)
            got = gguf_mixes.tensor_type(file_type, name, shape, N_LAYERS)
            assert got == expected_type(file_type, name, layer).value, (file_type, name)


def test_mix_spot_values_from_llama_quant_rules():
    q4km = "q4_k_m"
    assert gguf_mixes.tensor_type(q4km, "blk.5.attn_v.weight", (1024, 4096), 32) == T.Q4_K
    assert gguf_mixes.tensor_type(q4km, "blk.6.attn_v.weight", (1024, 4096), 32) == T.Q6_K
    assert gguf_mixes.tensor_type("Q5_K_M", "blk.6.ffn_down.weight", (4096, 11008), 32) == T.Q6_K
    assert gguf_mixes.tensor_type("Q5_K_M", "blk.7.ffn_down.weight", (4096, 11008), 32) == T.Q5_K
    assert gguf_mixes.tensor_type("Q4_K", "blk.6.ffn_down.weight", (4096, 11008), 32) == T.Q6_K
    # Tied embeddings: token_embd doubles as the output matrix and gets its type.
    assert gguf_mixes.tensor_type(q4km, "token_embd.weight", (32000, 4096), 32) == T.Q4_K
    assert gguf_mixes.tensor_type(q4km, "token_embd.weight", (32000, 4096), 32,
                                  tied_embeddings=True) == T.Q6_K
    # Q4_0 and friends also give the output matrix Q6_K; Q8_0 keeps Q8_0.
    assert gguf_mixes.tensor_type("Q4_0", "output.weight", (32000, 4096), 32) == T.Q6_K
    assert gguf_mixes.tensor_type("Q4_0", "blk.0.attn_v.weight", (1024, 4096), 32) == T.Q4_0
    # 70B (80 layers, grouped-query attention): Q4_K attn_v is bumped to Q5_K.
    assert gguf_mixes.tensor_type(q4km, "blk.10.attn_v.weight", (1024, 8192), 80,
                                  is_70b=True) == T.Q5_K
    assert gguf_mixes.tensor_type(q4km, "blk.10.attn_v.weight", (1024, 8192), 80) == T.Q4_K
    assert gguf_mixes.is_70b("llama", 80, 64, 8) and not gguf_mixes.is_70b("llama", 80, 64, 64)
    assert gguf_mixes.is_70b("qwen2", 80, 64, 8) and not gguf_mixes.is_70b("qwen2", 64, 40, 8)
    # 8 experts (Mixtral-style): attn_v and attn_k to Q8_0, attn_output to Q5_K.
    assert gguf_mixes.tensor_type(q4km, "blk.1.attn_k.weight", (1024, 4096), 32,
                                  n_expert=8) == T.Q8_0
    assert gguf_mixes.tensor_type(q4km, "blk.1.attn_output.weight", (4096, 4096), 32,
                                  n_expert=8) == T.Q5_K
    # Float file types: every matrix in that type, vectors in F32, no block constraints.
    assert gguf_mixes.tensor_type("BF16", "output.weight", (32000, 100), 32) == T.BF16
    assert gguf_mixes.tensor_type("f16", "blk.0.ffn_norm.weight", (4096,), 32) == T.F32
    assert gguf_mixes.tensor_type("F32", "blk.0.ffn_up.weight", (11008, 4096), 32) == T.F32
    # A (1, n) matrix is 1-D to ggml (its ne[1] is 1): not quantized.
    assert gguf_mixes.tensor_type(q4km, "blk.0.ffn_up.weight", (1, 4096), 32) == T.F32


@pytest.mark.parametrize(("file_type", "name", "expected"), [
    # row length: 11008 (= 43 x 256), 4096, 4128 (= 129 x 32, not x 256), 100 (not x 32)
    ("Q4_K_M", "blk.7.ffn_up.weight", {11008: T.Q4_K, 4096: T.Q4_K, 4128: T.Q5_0, 100: T.F16}),
    ("Q5_K_S", "blk.7.ffn_up.weight", {11008: T.Q5_K, 4096: T.Q5_K, 4128: T.Q5_1, 100: T.F16}),
    ("Q6_K", "blk.7.ffn_up.weight", {11008: T.Q6_K, 4096: T.Q6_K, 4128: T.Q8_0, 100: T.F16}),
    ("Q4_K_M", "blk.6.ffn_down.weight",
     {11008: T.Q6_K, 4096: T.Q6_K, 4128: T.Q8_0, 100: T.F16}),
    ("Q8_0", "blk.7.ffn_up.weight", {11008: T.Q8_0, 4096: T.Q8_0, 4128: T.Q8_0, 100: T.F16}),
    ("Q4_0", "blk.7.ffn_up.weight", {11008: T.Q4_0, 4096: T.Q4_0, 4128: T.Q4_0, 100: T.F16}),
    # The output matrix takes Q8_0 when the default block does not divide its rows.
    ("Q4_K_M", "output.weight", {11008: T.Q6_K, 4096: T.Q6_K, 4128: T.Q8_0, 100: T.F16}),
    ("Q4_0", "output.weight", {11008: T.Q6_K, 4096: T.Q6_K, 4128: T.Q8_0, 100: T.F16}),
])
def test_mix_fallback_on_row_length(file_type, name, expected):
    for row_length, qtype in expected.items():
        got = gguf_mixes.tensor_type(file_type, name, (64, row_length), 32)
        assert got == qtype.value, (file_type, name, row_length, T(got).name)


def test_file_type_names():
    assert gguf_mixes.parse_file_type(" q4_k ") == "Q4_K_M"
    assert gguf_mixes.parse_file_type("Q5_K") == "Q5_K_M"
    assert gguf_mixes.FILE_TYPES["Q4_K_M"] == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert gguf_mixes.FILE_TYPES["BF16"] == gguf.LlamaFileType.MOSTLY_BF16
    assert gguf_mixes.default_type("Q5_K_S") == T.Q5_K
    with pytest.raises(MergeError, match="unknown GGUF file type 'Q3_K_M'.*Q4_K_M.*Q6_K"):
        gguf_mixes.parse_file_type("Q3_K_M")
    with pytest.raises(MergeError, match="valid"):
        gguf_mixes.tensor_type("IQ2_XXS", "output.weight", (10, 4096), 32)
