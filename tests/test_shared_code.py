"""Kernel code written once (kernels/shared_code.py): retargeted to another "device", the
same source gives the CPU's bits, and a retarget that would call CPU code fails at once."""

import numpy as np
import pytest

from lowmem_merge.kernels import primitives, quant_blocks, scalars, sparse
from lowmem_merge.kernels.arrays import decode_array
from lowmem_merge.kernels.scalars import BF16, F16, F32
from lowmem_merge.kernels.shared_code import PRIMITIVES, retarget

_MASK64 = (1 << 64) - 1
# NumPy warns where a narrowing overflows to infinity or meets a NaN: here that is the point.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")

# A third "device": plain Python on NumPy scalars, as the CUDA simulator runs kernels.
PYTHON_PRIMITIVES = {
    "bits_from_f32": lambda value: np.float32(value).view(np.uint32),
    "f32_bits_from_f64": lambda value: np.float32(value).view(np.uint32),
    "f32_from_bits": lambda bits: np.uint32(bits).view(np.float32),
    "floor32": lambda value: np.floor(np.float32(value)),
    "mul32": lambda a, b: np.float32(a) * np.float32(b),
    "sqrt32": lambda value: np.sqrt(np.float32(value)),
    "to_int64": lambda value: np.int64(value),
    "wrap_add64": lambda a, b: np.uint64((int(a) + int(b)) & _MASK64),
    "wrap_mul64": lambda a, b: np.uint64((int(a) * int(b)) & _MASK64),
}


def _python(fn):
    return fn


@pytest.fixture(scope="module")
def python_scalars():
    return retarget(scalars, PYTHON_PRIMITIVES, _python, "python_scalars")


def _nan64(sign: int, payload: int) -> float:
    return np.array([(sign << 63) | (0x7FF << 52) | payload], np.uint64).view(np.float64)[0]


# Values whose narrowing is hard: ties, subnormals, overflow, infinities, NaN payloads.
HARD_VALUES = [0.0, -0.0, 1.0, -1.5, 1.0 + 2.0**-8, 1.0 + 2.0**-9 + 2.0**-30, 65504.0,
               65520.0, -65519.99, 2.0**-24, 2.0**-25, 2.0**-25 + 2.0**-40, 3.0 * 2.0**-26,
               1e-45, 3.4028235e38, 3.5e38, float("inf"), float("-inf"),
               _nan64(0, 1 << 51), _nan64(1, (1 << 51) | 0x12345), _nan64(0, 1),
               _nan64(1, 0xABCDE << 29)]


def test_primitives_cover_the_cpu_module():
    assert set(PRIMITIVES) == set(primitives.__all__) == set(PYTHON_PRIMITIVES)


@pytest.mark.parametrize("encoding", [BF16, F16, F32])
def test_retargeted_encode_gives_the_cpu_bits(python_scalars, encoding):
    for value in HARD_VALUES:
        assert python_scalars.encode(np.float64(value), encoding) == \
            scalars.encode(np.float64(value), encoding), (value, encoding)


def test_encode_narrows_nan_payloads_as_the_cpu_converts():
    """Independent reference: NumPy's float64 -> float32 cast is the hardware's."""
    for value in HARD_VALUES[-4:]:
        expected = np.array([value]).astype(np.float32).view(np.uint32)[0]
        assert scalars.encode(np.float64(value), F32) == expected
        assert np.isnan(np.uint32(scalars.encode(np.float64(value), F32)).view(np.float32))


@pytest.mark.parametrize("encoding", [BF16, F16])
def test_retargeted_decode_gives_the_cpu_bits_for_every_pattern(python_scalars, encoding):
    patterns = np.arange(0, 1 << 16, 7, dtype=np.uint16)  # every 7th: keeps the test quick
    cpu = np.empty(len(patterns), np.float32)
    decode_array(patterns, encoding, cpu)  # in an array: no float64 boxing to quiet a NaN
    for raw, expected in zip(patterns, cpu.view(np.uint32)):
        assert python_scalars.decode_bits(raw, encoding) == expected, hex(raw)


def test_retargeted_random_draws_and_keys_equal_the_cpu(python_scalars):
    rules = retarget(sparse, PYTHON_PRIMITIVES, _python, "python_sparse",
                     links=(python_scalars,))
    seed = np.uint64(0xDEADBEEFCAFEF00D)
    for index in [0, 1, 8191, 8192, 2**31 + 5, 2**40 + 3]:
        assert rules.uniform(seed, index) == sparse.uniform(seed, index)
    for delta in [0.0, -1e-30, 0.5, -3.25, 7e38]:
        assert rules.magnitude_key(delta) == sparse.magnitude_key(delta)


def test_retarget_without_the_linked_module_names_the_function():
    with pytest.raises(ValueError, match="half_bits_to_f32 is a shared function of "
                                         "lowmem_merge.kernels.scalars"):
        retarget(quant_blocks, PYTHON_PRIMITIVES, _python, "unlinked")


def test_retarget_without_a_primitive_names_it(python_scalars):
    partial = {name: fn for name, fn in PYTHON_PRIMITIVES.items() if name != "sqrt32"}
    with pytest.raises(ValueError, match="sqrt32"):
        retarget(quant_blocks, partial, _python, "no_sqrt", links=(python_scalars,))
