"""CUDA GGUF quantizers against the CPU kernels (and gguf.quants), byte for byte.

Runs on Numba's CUDA simulator (tests/conftest.py sets NUMBA_ENABLE_CUDASIM) unless
LOWMEM_TEST_REAL_CUDA=1. The simulator runs one Python thread per CUDA thread, so inputs are
a few blocks: for the K-quants, three blocks of 256 per call.
"""


import gguf
import gguf.quants
import numpy as np
import pytest

cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (CUDA path)")

from lowmem_merge.kernels import gguf_quants as cpu  # noqa: E402
from lowmem_merge.kernels.cuda import gguf_quants as device  # noqa: E402

T = gguf.GGMLQuantizationType
QK_K = 256
SIMPLE = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]
K_QUANTS = [T.Q4_K, T.Q5_K, T.Q6_K]


def quantize_both(values: np.ndarray, qtype: T) -> tuple[np.ndarray, np.ndarray]:
    """(CPU bytes, device bytes) of the same float32 values."""
    block_elements, block_bytes = cpu.block_layout(qtype.value)
    size = values.size // block_elements * block_bytes
    expected = np.zeros(size, np.uint8)
    cpu.quantize_into(values, qtype.value, expected)
    actual = np.full(size, 0xA5, np.uint8)  # every byte must be written
    device.quantize_into(values, qtype.value, actual)
    return expected, actual


def assert_same_blocks(expected: np.ndarray, actual: np.ndarray, qtype: T) -> None:
    _, block_bytes = cpu.block_layout(qtype.value)
    wrong = np.flatnonzero((expected != actual).reshape(-1, block_bytes).any(axis=1))
    assert wrong.size == 0, f"{qtype.name}: blocks {wrong.tolist()} differ"


def simple_blocks(rng: np.random.Generator) -> np.ndarray:
    """32-value blocks: normal, zero, constant, one outlier, rounding ties, tiny, huge."""
    blocks = rng.standard_normal((10, 32)).astype(np.float32)
    blocks[1] = 0.0  # d == 0: the reciprocal must be 0, not inf
    blocks[2] = -0.75  # constant: Q4_1 / Q5_1 get d == 0 with a non-zero min
    blocks[3] = 0.001
    blocks[3, 9] = 50.0  # one outlier
    blocks[4] = rng.integers(-254, 255, 32) / 2
    blocks[4, 0] = 127.0  # Q8_0: d == 1, every odd value is a .5 tie
    blocks[5] = rng.integers(-16, 17, 32) / 2
    blocks[5, 0] = -8.0  # Q4_0: d == 1, so x + 8.5 lands on integers
    blocks[6] *= 1e-7  # the f16 scale underflows
    blocks[7] *= 1e-36  # 1/d is still finite in float32
    blocks[8] *= 1e6  # the f16 scale overflows
    blocks[9, ::2] = -0.0
    return blocks.reshape(-1)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # simulator scalars overflow on "huge"
@pytest.mark.parametrize("qtype", SIMPLE, ids=lambda t: t.name)
def test_simple_quantizers_match_cpu_and_gguf(qtype):
    values = simple_blocks(np.random.default_rng(5))
    expected, actual = quantize_both(values, qtype)
    assert_same_blocks(expected, actual, qtype)
    if qtype != T.F32:
        reference = np.asarray(gguf.quants.quantize(values, qtype)).view(np.uint8).reshape(-1)
        assert np.array_equal(actual, reference)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN and inf arithmetic in the simulator
@pytest.mark.parametrize("qtype", SIMPLE, ids=lambda t: t.name)
def test_special_values_match_cpu(qtype):
    """NaN, infinities, signalling NaN payloads, subnormals: the CPU's bytes, NaN included
    (x86's float-to-int conversion and numba's max are reproduced on the device)."""
    bits = np.array([0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFA00000, 0x7F7FFFFF,
                     0x477FF000, 0x33000001, 0x00000001, 0x80000000, 0x387FFFFF, 0x3F800000],
                    np.uint32)
    values = np.resize(bits, 96).view(np.float32).copy()
    values[32:64] = np.linspace(-3.0, 3.0, 32, dtype=np.float32)
    values[40] = np.inf  # one infinity in an otherwise finite block
    values[64:96] = np.linspace(-1.0, 2.0, 32, dtype=np.float32)
    values[70] = np.nan
    expected, actual = quantize_both(values, qtype)
    assert_same_blocks(expected, actual, qtype)


def k_blocks(kind: str, rng: np.random.Generator) -> np.ndarray:
    """Three 256-value blocks per kind, small enough for the simulator."""
    blocks = np.zeros((3, QK_K), np.float32)
    if kind == "normal":
        blocks[0] = rng.standard_normal(QK_K) * 0.02
        blocks[1] = rng.standard_normal(QK_K) * 0.02 + 0.05  # skewed: a non-zero min
        blocks[2] = np.abs(rng.standard_normal(QK_K)) + 1  # positive only
    else:
        blocks[0] = 0.0  # all zero: Q6_K writes a zero block
        blocks[1] = 3.25  # constant
        blocks[2] = rng.standard_normal(QK_K) * 1e-3
        blocks[2, 77] = -2.0  # one outlier
    return blocks.reshape(-1)


@pytest.mark.parametrize("kind", ["normal", "degenerate"])
@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda t: t.name)
def test_k_quantizers_match_cpu(qtype, kind):
    values = k_blocks(kind, np.random.default_rng(11))
    expected, actual = quantize_both(values, qtype)
    assert_same_blocks(expected, actual, qtype)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the simulator's overflowing grid scale
def test_k_quantizer_on_tiny_and_sparse_blocks():
    """Scales below float16 resolution and sub-blocks of one non-zero value (Q4_K: the
    grid's integer fallback, d == 0 sub-blocks keeping the fit's codes)."""
    blocks = np.zeros((2, QK_K), np.float32)
    blocks[0] = np.float32(1e-30) * np.arange(QK_K)
    blocks[1, 17] = -1.5
    blocks[1, 200] = 1e-38
    for qtype in (T.Q4_K, T.Q6_K):
        expected, actual = quantize_both(blocks.reshape(-1), qtype)
        assert_same_blocks(expected, actual, qtype)


def test_device_arrays_and_a_stream():
    values = simple_blocks(np.random.default_rng(2))[:128]
    expected = np.zeros(4 * 18, np.uint8)
    cpu.quantize_into(values, T.Q4_0.value, expected)
    stream = cuda.stream()
    d_values = cuda.to_device(values, stream=stream)
    d_out = cuda.device_array(expected.size, np.uint8, stream=stream)
    device.quantize_into(d_values, T.Q4_0.value, d_out, stream=stream)
    assert np.array_equal(d_out.copy_to_host(stream=stream), expected)


def test_capabilities_and_bad_buffers():
    assert {t for t in T if device.can_quantize_on_device(t.value)} == {
        t for t in T if cpu.can_quantize(t.value)}
    with pytest.raises(ValueError, match="cannot quantize"):
        device.quantize_into(np.zeros(256, np.float32), T.Q2_K.value, np.zeros(84, np.uint8))
    with pytest.raises(ValueError, match="float32"):
        device.quantize_into(np.zeros(32, np.float64), T.Q8_0.value, np.zeros(34, np.uint8))
    with pytest.raises(ValueError, match="do not encode"):
        device.quantize_into(np.zeros(48, np.float32), T.Q8_0.value, np.zeros(34, np.uint8))
    with pytest.raises(ValueError, match="do not encode"):
        device.quantize_into(np.zeros(32, np.float32), T.Q8_0.value, np.zeros(36, np.uint8))
    device.quantize_into(np.zeros(0, np.float32), T.Q6_K.value, np.zeros(0, np.uint8))
