"""CUDA array kernels against the CPU kernels and float64 references written here.

Runs on Numba's CUDA simulator (tests/conftest.py sets NUMBA_ENABLE_CUDASIM) unless
LOWMEM_TEST_REAL_CUDA=1. The simulator runs a Python thread per CUDA thread, so arrays are
small. Equality is bitwise except where a NaN's sign or payload is free: a GPU's float64
arithmetic returns canonical NaNs, so NaN outputs of sums need only be NaN. Every case is
checked against a reference written here and the first two of each kind against the CPU
kernel too: each CPU variant costs seconds of compilation on a cold cache.
"""

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (CUDA path)")

from lowmem_merge import kernels  # noqa: E402
from lowmem_merge.kernels import BF16, F16, F32, REDUCTION_BLOCK  # noqa: E402
from lowmem_merge.kernels.cuda import arrays as device  # noqa: E402

# The simulator runs the kernels' float casts in NumPy, which warns where a GPU saturates.
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")]

STORAGE = {BF16: np.uint16, F16: np.uint16, F32: np.uint32}
NAMES = {BF16: "bf16", F16: "f16", F32: "f32"}


# -- independent references ----------------------------------------------------------------

def reference_decode(raw: np.ndarray, encoding: int) -> np.ndarray:
    """float32 values of stored bits (NumPy's f16 conversion may quiet NaNs)."""
    if encoding == BF16:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if encoding == F16:
        return raw.view(np.float16).astype(np.float32)
    return raw.view(np.float32)


def reference_encode(values: np.ndarray, encoding: int) -> np.ndarray:
    """Stored bits of float64 values, each rounded once to nearest even (NaNs: any NaN)."""
    values = np.asarray(values, np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        if encoding == F32:
            return values.astype(np.float32).view(np.uint32)
        if encoding == F16:
            return values.astype(np.float16).view(np.uint16)
        # bf16 keeps 8 significant bits down to 2**-126, then a fixed quantum of 2**-133.
        _, exponent = np.frexp(values)
        quantum = np.maximum(exponent - 1, -126) - 7
        rounded = np.ldexp(np.rint(np.ldexp(values, -quantum)), quantum)
        rounded = np.where(np.isfinite(values), rounded, values)
        return (rounded.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def decoded64(raw: np.ndarray, encoding: int) -> np.ndarray:
    return reference_decode(raw, encoding).astype(np.float64)


def assert_same_bits(actual: np.ndarray, expected: np.ndarray, encoding: int) -> None:
    """Bitwise equal, except that where both are NaN the NaN's bits are free."""
    both_nan = np.isnan(reference_decode(actual, encoding)) & np.isnan(
        reference_decode(expected, encoding))
    assert np.isnan(reference_decode(actual, encoding)).sum() == both_nan.sum()
    assert np.array_equal(actual[~both_nan], expected[~both_nan])


# -- inputs --------------------------------------------------------------------------------

def bit_patterns(encoding: int, n_random: int = 200) -> np.ndarray:
    """Every sign and exponent boundary, edge mantissas (NaN payloads, subnormals), random."""
    exponent_bits, mantissa_bits = {BF16: (8, 7), F16: (5, 10), F32: (8, 23)}[encoding]
    top = (1 << exponent_bits) - 1
    exponents = np.array([0, 1, 2, top // 2, top // 2 + 1, top - 2, top - 1, top])
    edge = (1 << mantissa_bits) - 1
    mantissas = np.array([0, 1, 2, 3, edge >> 1, (edge >> 1) + 1, (edge >> 1) + 2, edge - 1,
                          edge])
    sign = np.array([0, 1 << (exponent_bits + mantissa_bits)])
    grid = (sign[:, None, None] | (exponents[None, :, None] << mantissa_bits)
            | mantissas[None, None, :]).ravel()
    dtype = STORAGE[encoding]
    random = np.random.default_rng(encoding).integers(0, np.iinfo(dtype).max, n_random,
                                                      dtype=dtype, endpoint=True)
    return np.concatenate([grid.astype(dtype), random])


def representable(encoding: int) -> np.ndarray:
    """Some finite values of the encoding, as float64, sorted and distinct."""
    patterns = bit_patterns(encoding, 400)
    values = decoded64(patterns, encoding)
    return np.unique(values[np.isfinite(values)])


def rounding_cases(encoding: int) -> np.ndarray:
    """float64 values that a double rounding, or a wrong tie, overflow or underflow, gets wrong."""
    grid = representable(encoding)
    low, high = grid[:-1], grid[1:]
    middle = low + (high - low) / 2
    hair = (high - low) * 2.0**-30
    largest = {BF16: (2 - 2.0**-7) * 2.0**127, F16: 65504.0, F32: (2 - 2.0**-23) * 2.0**127}
    unit = {BF16: 2.0**-7, F16: 2.0**-10, F32: 2.0**-23}[encoding] * 2.0
    smallest = {BF16: 2.0**-133, F16: 2.0**-24, F32: 2.0**-149}[encoding]
    near_edges = np.array([
        largest[encoding], largest[encoding] * (1 + unit / 4), largest[encoding] * (1 + unit / 4)
        * (1 - 2.0**-40), largest[encoding] * (1 + unit / 4) * (1 + 2.0**-40), 1e300,
        smallest, smallest / 2, smallest / 2 * (1 + 2.0**-40), smallest * 1.5, smallest * 2.5,
        1e-300, 0.0, np.inf, np.nan])
    nans = np.array([0x7FF0000000000001, 0xFFF8000000000000, 0x7FFC0000DEADBEEF,
                     0xFFF00000F0000000], np.uint64).view(np.float64)
    random = np.random.default_rng(7).standard_normal(100) * 3
    values = np.concatenate([middle, np.nextafter(middle, np.inf), np.nextafter(middle, -np.inf),
                             middle + hair, middle - hair, near_edges, random])
    return np.concatenate([values, -values, nans])


def raw_values(values: np.ndarray, encoding: int) -> np.ndarray:
    return reference_encode(values, encoding)


def expert_rows(n_experts: int, size: int, encoding: int, seed: int) -> np.ndarray:
    """Random experts near a common point, as stored bits, with specials sprinkled in."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((n_experts, size)) * 0.5 + 1.0
    specials = [-0.0, 0.0, 3e-41, -7e-8, 2.5, -1.0]
    for row in range(n_experts):
        slots = rng.choice(size, min(size, len(specials)), replace=False)
        values[row, slots] = specials[:len(slots)]
    return raw_values(values, encoding)


# -- decode, encode, transcode, count -------------------------------------------------------

@pytest.mark.parametrize("encoding", [BF16, F16, F32], ids=NAMES.get)
def test_decode_array_matches_cpu_and_numpy(encoding: int) -> None:
    raw = bit_patterns(encoding)
    out = np.empty(raw.size, np.float32)
    device.decode_array(raw, encoding, out)
    cpu = np.empty(raw.size, np.float32)
    kernels.decode_array(raw, encoding, cpu)
    assert np.array_equal(out.view(np.uint32), cpu.view(np.uint32))  # NaN payloads too
    expected = reference_decode(raw, encoding)
    nan = np.isnan(expected)
    assert np.array_equal(out[~nan].view(np.uint32), expected[~nan].view(np.uint32))
    assert np.isnan(out[nan]).all()


def test_decode_array_into_float64() -> None:
    raw = bit_patterns(F16, 50)
    out = np.empty(raw.size, np.float64)
    device.decode_array(raw, F16, out)
    expected = decoded64(raw, F16)
    assert np.array_equal(out, expected, equal_nan=True)


@pytest.mark.parametrize("encoding", [BF16, F16, F32], ids=NAMES.get)
def test_encode_array_rounds_once_like_the_cpu(encoding: int) -> None:
    values = rounding_cases(encoding)
    out = np.empty(values.size, STORAGE[encoding])
    device.encode_array(values, out, encoding)
    cpu = np.empty_like(out)
    with np.errstate(over="ignore", invalid="ignore"):
        kernels.encode_array(values, cpu, encoding)
    assert np.array_equal(out, cpu)  # NaN signs and payloads too
    assert_same_bits(out, reference_encode(values, encoding), encoding)


def test_encode_array_from_float32() -> None:
    values = decoded64(bit_patterns(F32, 100), F32).astype(np.float32)
    out = np.empty(values.size, np.uint16)
    device.encode_array(values, out, BF16)
    cpu = np.empty_like(out)
    kernels.encode_array(values, cpu, BF16)
    assert np.array_equal(out, cpu)


@pytest.mark.parametrize("encoding", [BF16, F16, F32], ids=lambda e: "from_" + NAMES[e])
@pytest.mark.parametrize("out_encoding", [BF16, F16, F32], ids=lambda e: "to_" + NAMES[e])
def test_transcode_matches_cpu(encoding: int, out_encoding: int) -> None:
    raw = bit_patterns(encoding, 60)
    out = np.empty(raw.size, STORAGE[out_encoding])
    device.transcode(raw, encoding, out, out_encoding)
    cpu = np.empty_like(out)
    kernels.transcode(raw, encoding, cpu, out_encoding)
    assert np.array_equal(out, cpu)  # signalling NaNs stay signalling
    assert_same_bits(out, reference_encode(decoded64(raw, encoding), out_encoding), out_encoding)


@pytest.mark.parametrize("encoding", [BF16, F16, F32], ids=NAMES.get)
def test_count_nonfinite(encoding: int) -> None:
    raw = bit_patterns(encoding, 100)
    expected = int((~np.isfinite(reference_decode(raw, encoding))).sum())
    assert expected > 0
    assert device.count_nonfinite(raw, encoding) == expected
    assert kernels.count_nonfinite(raw, encoding) == expected


# -- weighted sums -------------------------------------------------------------------------

def reference_weighted(stack: np.ndarray, encoding: int, coefficients: np.ndarray,
                       base: np.ndarray, base_encoding: int, base_coefficient: float,
                       around_base: bool) -> np.ndarray:
    """The CPU's float64 sum, term by term in the same order (NumPy never fuses)."""
    total = np.zeros(stack.shape[1])
    b = decoded64(base, base_encoding) if around_base else None
    for i in range(stack.shape[0]):
        x = decoded64(stack[i], encoding)
        total = total + coefficients[..., i] * (x - b if around_base else x)
    return total + base_coefficient * b if around_base else total


CPU_CHECKED = 2  # cases per table also compared with the CPU kernel

WEIGHTED = [  # encoding, base encoding, around base, out encoding, experts, size
    (BF16, BF16, True, BF16, 3, 255),
    (BF16, F32, True, F16, 2, 1),
    (F16, F16, False, F32, 1, 255),
    (F32, F32, True, BF16, 2, 200),
    (F16, F16, True, F16, 3, 70),
    (F32, F32, False, F32, 3, 64),
]


@pytest.mark.parametrize("case", WEIGHTED, ids=str)
def test_weighted_sum_equals_cpu_bytes(case: tuple) -> None:
    encoding, base_encoding, around_base, out_encoding, n_experts, size = case
    stack = expert_rows(n_experts, size, encoding, seed=size)
    if size > 1:  # one column of specials: inf - inf, inf * 0.7, NaN
        stack[:, 0] = raw_values(np.array([np.inf, np.nan, 1.0])[:n_experts], encoding)
    base = raw_values(np.linspace(0.5, 1.5, size), base_encoding)
    coefficients = np.array([0.7, -0.2, 0.45])[:n_experts]
    base_coefficient = 0.35
    args = (stack, encoding, coefficients, base if around_base else stack[0], base_encoding,
            base_coefficient, around_base)
    out = np.empty(size, STORAGE[out_encoding])
    device.weighted_sum(*args, out, out_encoding)
    if case in WEIGHTED[:CPU_CHECKED]:
        cpu = np.empty_like(out)
        kernels.weighted_sum(*args, cpu, out_encoding)
        assert_same_bits(out, cpu, out_encoding)
    expected = reference_encode(reference_weighted(*args), out_encoding)
    assert_same_bits(out, expected, out_encoding)


LINE_WEIGHTED = [  # encoding, base encoding, around base, by row, out encoding, experts, rows,
    # row length, first row
    (BF16, BF16, True, True, BF16, 3, 5, 7, 2),
    (F16, F16, False, False, F32, 2, 4, 9, 0),
    (F32, BF16, True, False, F16, 1, 1, 1, 0),
    (F32, F32, False, True, BF16, 2, 3, 11, 1),
]


@pytest.mark.parametrize("case", LINE_WEIGHTED, ids=str)
def test_line_weighted_sum_equals_cpu_bytes(case: tuple) -> None:
    encoding, base_encoding, around_base, by_row, out_encoding, n_experts, rows, length, first = \
        case
    size = rows * length
    stack = expert_rows(n_experts, size, encoding, seed=size)
    base = raw_values(np.linspace(-1, 1, size), base_encoding)
    lines = first + rows if by_row else length
    coefficients = np.random.default_rng(lines).uniform(-1, 1, (lines, n_experts))
    args = (stack, encoding, coefficients, base if around_base else stack[0], base_encoding,
            -0.25, around_base, length, by_row, first)
    out = np.empty(size, STORAGE[out_encoding])
    device.line_weighted_sum(*args, out, out_encoding)
    if case in LINE_WEIGHTED[:CPU_CHECKED]:
        cpu = np.empty_like(out)
        kernels.line_weighted_sum(*args, cpu, out_encoding)
        assert_same_bits(out, cpu, out_encoding)
    index = np.arange(size)
    per_element = coefficients[first + index // length if by_row else index % length]
    total = reference_weighted(stack, encoding, per_element, base, base_encoding, -0.25,
                               around_base)
    expected = reference_encode(total, out_encoding)
    assert_same_bits(out, expected, out_encoding)


# -- Gram statistics -----------------------------------------------------------------------

def sequential_sum(terms: np.ndarray) -> float:
    """Left to right from +0.0, as the kernels add (np.sum adds pairwise)."""
    return float(np.cumsum(np.concatenate([[0.0], terms]))[-1])


def lane_sum(products: np.ndarray) -> float:
    """The CPU Gram's order: four interleaved sums over whole quads, the tail in lane 0."""
    quads = products.size // 4 * 4
    lanes = [sequential_sum(products[lane:quads:4]) for lane in range(4)]
    lanes[0] = sequential_sum(np.concatenate([products[0:quads:4], products[quads:]]))
    return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3])


def reference_gram(stack: np.ndarray, encoding: int, base: np.ndarray, base_encoding: int,
                   subtract_base: bool, add: Callable[[np.ndarray], float]) -> np.ndarray:
    """Gram of the decoded rows (minus the base), each entry summed by ``add``."""
    values = np.stack([decoded64(row, encoding) for row in stack])
    if subtract_base:
        values = values - decoded64(base, base_encoding)
    n = values.shape[0]
    return np.array([[add(values[i] * values[k]) for k in range(n)] for i in range(n)])


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    scale = np.abs(expected).max(initial=1e-300)
    assert np.abs(actual - expected).max(initial=0.0) <= 1e-12 * scale


# Sums of products of bf16 or f16 values are mostly exact in float64 whatever the order, so
# the cases that test the summation order have f32 experts.
GRAMS = [  # encoding, base encoding, subtract base, experts, size
    (F32, BF16, True, 3, REDUCTION_BLOCK + 37),
    (F16, F16, False, 2, 255),
    (BF16, F32, True, 1, 1),
    (F32, F32, False, 2, 103),
]


@pytest.mark.parametrize("case", GRAMS, ids=str)
def test_gram_blocks_equal_cpu(case: tuple) -> None:
    encoding, base_encoding, subtract_base, n_experts, size = case
    stack = expert_rows(n_experts, size, encoding, seed=size + 1)
    base = raw_values(np.random.default_rng(size).standard_normal(size), base_encoding)
    n_blocks = -(-size // REDUCTION_BLOCK)
    args = (stack, encoding, base if subtract_base else stack[0], base_encoding, subtract_base)
    partials = np.full((n_blocks, n_experts, n_experts), np.nan)
    device.gram_blocks(*args, partials)
    if case in GRAMS[:CPU_CHECKED]:
        cpu = np.empty_like(partials)
        kernels.gram_blocks(*args, cpu)
        assert np.array_equal(partials, cpu)  # the CPU's summation order, exactly
    for block in range(n_blocks):
        span = slice(block * REDUCTION_BLOCK, (block + 1) * REDUCTION_BLOCK)
        picked = (stack[:, span], encoding, base[span], base_encoding, subtract_base)
        assert np.array_equal(partials[block], reference_gram(*picked, lane_sum))
        assert_close(partials[block], reference_gram(*picked, np.sum))


def test_gram_blocks_keep_the_cpu_summation_order() -> None:
    """Many short blocks of f32 values spread over many binades, so that nearly any other
    order (lanes, tail, how lanes combine) changes some of the sums."""
    rng = np.random.default_rng(11)
    for size in (37, 62, 91, 103, 130, 167):
        values = rng.standard_normal((3, size)) * 2.0 ** rng.integers(-12, 12, (3, size))
        stack = raw_values(values, F32)
        partials = np.empty((1, 3, 3))
        device.gram_blocks(stack, F32, stack[0], F32, False, partials)
        assert np.array_equal(partials[0], reference_gram(stack, F32, None, F32, False, lane_sum))


LINE_GRAMS = [  # encoding, base encoding, subtract base, by row, experts, rows, row length
    (F32, BF16, True, True, 3, 5, 7),
    (F16, F16, False, False, 2, 6, 9),
    (BF16, BF16, True, False, 1, 1, 1),
    (F32, F32, False, False, 2, 12, 5),
]


@pytest.mark.parametrize("case", LINE_GRAMS, ids=str)
def test_line_gram_equals_cpu(case: tuple) -> None:
    encoding, base_encoding, subtract_base, by_row, n_experts, rows, length = case
    stack = expert_rows(n_experts, rows * length, encoding, seed=rows)
    base = raw_values(np.random.default_rng(length).standard_normal(rows * length),
                      base_encoding)
    args = (stack, encoding, base if subtract_base else stack[0], base_encoding, subtract_base,
            length, by_row)
    # Column grams add to what is there; row grams overwrite it.
    start = np.random.default_rng(0).standard_normal((rows if by_row else length, n_experts,
                                                      n_experts))
    start = start + start.transpose(0, 2, 1)
    out = start.copy()
    device.line_gram(*args, out)
    if case in LINE_GRAMS[:CPU_CHECKED]:
        cpu = start.copy()
        kernels.line_gram(*args, cpu)
        assert np.array_equal(out, cpu)
    lines = stack.reshape(n_experts, rows, length)
    bases = base.reshape(rows, length)
    for line in range(out.shape[0]):
        pick = (slice(None), line) if by_row else (slice(None), slice(None), line)
        picked = (lines[pick], encoding, bases[pick[1:]], base_encoding, subtract_base)
        previous = 0.0 if by_row else start[line]
        assert np.array_equal(out[line], previous + reference_gram(*picked, sequential_sum))
        assert_close(out[line], previous + reference_gram(*picked, np.sum))


# -- device arrays, streams, empty arrays ---------------------------------------------------

def test_device_arrays_on_a_stream() -> None:
    stack = expert_rows(2, 150, BF16, seed=3)
    base = raw_values(np.linspace(0, 1, 150), BF16)
    stream = cuda.stream()
    d_stack, d_base = cuda.to_device(stack, stream=stream), cuda.to_device(base, stream=stream)
    d_out = cuda.device_array(150, np.uint16, stream=stream)
    device.weighted_sum(d_stack, BF16, cuda.to_device(np.array([0.5, 0.5])), d_base, BF16,
                        1.0, True, d_out, BF16, stream=stream)
    d_partials = cuda.device_array((1, 2, 2), np.float64, stream=stream)
    device.gram_blocks(d_stack, BF16, d_base, BF16, True, d_partials, stream=stream)
    out, partials = d_out.copy_to_host(stream=stream), d_partials.copy_to_host(stream=stream)
    stream.synchronize()
    # The same launchers on host arrays (checked against the CPU above) agree.
    host_out, host_partials = np.empty(150, np.uint16), np.empty((1, 2, 2))
    device.weighted_sum(stack, BF16, [0.5, 0.5], base, BF16, 1.0, True, host_out, BF16)
    device.gram_blocks(stack, BF16, base, BF16, True, host_partials)
    assert np.array_equal(out, host_out)
    assert np.array_equal(partials, host_partials)
    assert device.count_nonfinite(d_stack[1], BF16, stream=stream) == 0


def test_empty_arrays_launch_nothing() -> None:
    raw = np.empty(0, np.uint16)
    stack = np.empty((2, 0), np.uint16)
    device.decode_array(raw, BF16, np.empty(0, np.float32))
    device.encode_array(np.empty(0), raw, BF16)
    device.transcode(raw, BF16, raw, F16)
    assert device.count_nonfinite(raw, BF16) == 0
    device.gram_blocks(stack, BF16, raw, BF16, True, np.empty((0, 2, 2)))
    device.weighted_sum(stack, BF16, np.ones(2), raw, BF16, 1.0, True, raw, BF16)
    device.line_gram(stack, BF16, raw, BF16, True, 4, True, np.empty((0, 2, 2)))
    device.line_weighted_sum(stack, BF16, np.ones((1, 2)), raw, BF16, 1.0, True, 4, True, 0,
                             raw, BF16)


def test_package_import_leaves_numba_cuda_alone() -> None:
    """Users without numba-cuda import lowmem_merge and lowmem_merge.kernels.cuda."""
    code = ("import sys, lowmem_merge.api, lowmem_merge.kernels.cuda; "
            "assert not [m for m in sys.modules if m.startswith(('numba.cuda', 'numba_cuda'))]")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
