"""CUDA sparse-merge kernels (TIES, DARE, breadcrumbs, DELLA) against the CPU kernels, bit for
bit, and against references written here: bincounts, stable ranks, splitmix64 draws, sums in
index order and float64 merges.

Runs on Numba's CUDA simulator (tests/conftest.py sets NUMBA_ENABLE_CUDASIM) unless
LOWMEM_TEST_REAL_CUDA=1. The simulator runs one Python thread per CUDA thread, so tensors
have a few hundred elements, in two chunks (running tie counts, chunk start offsets), with
sizes that the thread-block size does not divide and deltas on a coarse grid, so that many
magnitudes tie at the thresholds.
"""

from dataclasses import dataclass, field

import numpy as np
import pytest

cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (CUDA path)")

from lowmem_merge.kernels import BF16, F16, F32, REDUCTION_BLOCK  # noqa: E402
from lowmem_merge.kernels import sparse as cpu  # noqa: E402
from lowmem_merge.kernels.cuda import sparse as device  # noqa: E402

STORAGE = {BF16: np.uint16, F16: np.uint16, F32: np.uint32}
NAMES = {BF16: "bf16", F16: "f16", F32: "f32"}
MASK64 = (1 << 64) - 1


# -- inputs and independent references --------------------------------------------------------

def encode_exact(values: np.ndarray, encoding: int) -> np.ndarray:
    """Stored bits of float32 values (exact for the grid values used here)."""
    values = np.asarray(values, np.float32)
    if encoding == BF16:
        return (values.view(np.uint32) >> 16).astype(np.uint16)
    if encoding == F16:
        return values.astype(np.float16).view(np.uint16)
    return values.view(np.uint32).copy()


def decode64(raw: np.ndarray, encoding: int) -> np.ndarray:
    if encoding == BF16:
        return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if encoding == F16:
        return raw.view(np.float16).astype(np.float64)
    return raw.view(np.float32).astype(np.float64)


def make_inputs(encoding: int, n_experts: int, n: int, seed: int):
    """(stack (N, n), base) raw bits: half the deltas on a grid of 2**-8 (ties), half smooth."""
    rng = np.random.default_rng(seed)
    base = rng.integers(-120, 121, n) / 256
    steps = rng.integers(-4, 5, (n_experts, n)) / 256
    smooth = rng.standard_normal((n_experts, n)) * 0.01
    experts = base + np.where(rng.random((n_experts, n)) < 0.5, steps, smooth)
    return encode_exact(experts, encoding), encode_exact(base, encoding)


def deltas_of(stack, base, encoding: int) -> np.ndarray:
    return decode64(stack, encoding) - decode64(base, encoding)


def keys_of(deltas: np.ndarray) -> np.ndarray:
    return np.abs(deltas).astype(np.float32).view(np.uint32).astype(np.int64)


def stable_rank(keys: np.ndarray) -> np.ndarray:
    """Rank by key descending, ties by index ascending (0 = largest)."""
    order = np.lexsort((np.arange(keys.size), -keys))
    rank = np.empty(keys.size, np.int64)
    rank[order] = np.arange(keys.size)
    return rank


def splitmix_uniform(seed: int, index: np.ndarray) -> np.ndarray:
    out = np.empty(index.size)
    for n, j in enumerate(index.tolist()):
        z = (seed + j * 0x9E3779B97F4A7C15) & MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        z ^= z >> 31
        out[n] = (z >> 11) / 2.0**53
    return out


def threshold_for(keys: np.ndarray, k: int) -> tuple[int, int]:
    """The pipeline's (threshold, quota): the k-th largest key, and how many of its ties
    the top k take."""
    if k <= 0:
        return cpu.NONE, 0
    if k >= keys.size:
        return cpu.ALL, 0
    threshold = int(np.sort(keys)[::-1][k - 1])
    return threshold, k - int((keys > threshold).sum())


# -- one merge, chunk by chunk, on both sides --------------------------------------------------

@dataclass
class Case:
    encoding: int
    n_experts: int
    keep_kind: int
    consensus: bool
    normalize: bool
    chunks: tuple[int, ...]  # chunk sizes (threshold rule: each one reduction block)
    out: int = F32  # output encoding: F32 and F16 outputs are checked against numpy too
    block: int = REDUCTION_BLOCK
    first: int = 0  # global index of the first element (a later chunk of the tensor)
    top: tuple[float, ...] = (0.0,)  # threshold rule: fractions dropped from the top...
    keep: tuple[float, ...] = (0.5,)  # ...and kept below them; else the density
    epsilon: float = 0.1
    seed: int = 3
    weights: np.ndarray = field(default_factory=lambda: np.array([0.7, 0.4, 0.9]))
    scales: np.ndarray = field(default_factory=lambda: np.array([1.25, 1.0, 0.8]))

    def experts(self, values: tuple) -> np.ndarray:
        return np.resize(np.asarray(values, np.float64), self.n_experts)


def selection_for(case: Case, deltas: np.ndarray) -> tuple:
    """The kernels' selection tuple as sparse_task_vectors builds it (ties filled per chunk)."""
    n_experts, n = deltas.shape
    thresholds = np.empty((n_experts, 2), np.int64)
    quotas = np.zeros((n_experts, 2), np.int64)
    keys = keys_of(deltas)
    for i, (top, keep) in enumerate(zip(case.experts(case.top), case.experts(case.keep))):
        k_low, k_high = int(top * n), int(top * n) + int(keep * n)
        thresholds[i, 0], quotas[i, 0] = threshold_for(keys[i], k_low)
        thresholds[i, 1], quotas[i, 1] = threshold_for(keys[i], k_high)
    seeds = (np.arange(n_experts, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
             + np.uint64(case.seed))
    densities = case.experts(case.keep)
    return thresholds, quotas, None, seeds, densities, case.experts([case.epsilon])


def run_both(case: Case, stack, base):
    """Tie counts, L1 partials and merged bits of every chunk, CPU and device compared."""
    n_experts = stack.shape[0]
    thresholds, quotas, _, seeds, densities, epsilons = selection_for(
        case, deltas_of(stack, base, case.encoding))
    weights, scales = case.weights[:n_experts], case.scales[:n_experts]
    running = np.zeros((n_experts, 2), np.int64)
    partials, merged = [], []
    lo = 0
    for size in case.chunks:
        part, part_base = np.ascontiguousarray(stack[:, lo:lo + size]), base[lo:lo + size]
        ties = np.zeros((-(-size // REDUCTION_BLOCK), n_experts, 2), np.int64)
        if case.keep_kind == cpu.KEEP_BY_THRESHOLD:
            cpu.threshold_ties(part, case.encoding, part_base, case.encoding, thresholds, ties)
            on_device = np.full_like(ties, -1)
            device.threshold_ties(part, case.encoding, part_base, case.encoding, thresholds,
                                  on_device)
            assert np.array_equal(on_device, ties)
            ties, running = np.cumsum(ties, axis=0) - ties + running, running + ties.sum(0)
        selection = (thresholds, quotas, ties, seeds, densities, epsilons)
        start = case.first + lo
        blocks = -(-size // case.block)
        expected, actual = np.zeros((blocks, n_experts, 2)), np.full((blocks, n_experts, 2), -1.0)
        for kernels, sums in ((cpu, expected), (device, actual)):
            kernels.task_vector_l1(part, case.encoding, part_base, case.encoding, case.keep_kind,
                                   start, case.block, selection, sums)
        assert np.array_equal(actual, expected)
        outs = [np.zeros(size, STORAGE[case.out]), np.full(size, 0xABC, STORAGE[case.out])]
        for kernels, out in zip((cpu, device), outs):
            kernels.task_vector_merge(part, case.encoding, part_base, case.encoding,
                                      case.keep_kind, case.consensus, start, case.block,
                                      selection, weights, scales, case.normalize, 0.9, out,
                                      case.out)
        assert np.array_equal(outs[1], outs[0])
        partials.append(actual)
        merged.append(outs[1])
        lo += size
    return np.concatenate(partials), np.concatenate(merged)


def reference_mask(case: Case, deltas: np.ndarray) -> np.ndarray:
    """Which deltas each keep rule keeps, from ranks and draws computed here."""
    n_experts, n = deltas.shape
    thresholds, quotas, _, seeds, densities, epsilons = selection_for(case, deltas)
    keep = np.zeros(deltas.shape, bool)
    index = case.first + np.arange(n)
    for i in range(n_experts):
        if case.keep_kind == cpu.KEEP_BY_THRESHOLD:
            rank = stable_rank(keys_of(deltas[i]))
            k_low = int(case.experts(case.top)[i] * n)
            keep[i] = (rank >= k_low) & (rank < k_low + int(case.experts(case.keep)[i] * n))
            continue
        chance = np.full(n, densities[i])
        if case.keep_kind == cpu.KEEP_BY_ROW_RANK:
            for lo in range(0, n, case.block):
                row = deltas[i, lo:lo + case.block]
                order = np.argsort(np.abs(row), kind="stable")
                span = max(row.size - 1, 1)
                rank = np.empty(row.size)
                rank[order] = np.arange(row.size)
                chance[lo:lo + row.size] = (densities[i] - epsilons[i]
                                            + 2.0 * epsilons[i] * rank / span)
        keep[i] = splitmix_uniform(int(seeds[i]), index) < chance
    return keep


def reference_l1(case: Case, deltas: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Per block: sums of |delta| and |kept delta| in index order (the CPU's order)."""
    starts = np.cumsum((0,) + case.chunks[:-1])
    rows = []
    for lo, size in zip(starts, case.chunks):
        for b in range(lo, lo + size, case.block):
            hi = min(lo + size, b + case.block)
            sums = np.zeros((deltas.shape[0], 2))
            for i in range(deltas.shape[0]):
                for j in range(b, hi):
                    sums[i, 0] += abs(deltas[i, j])
                    sums[i, 1] += abs(deltas[i, j]) if keep[i, j] else 0.0
            rows.append(sums)
    return np.array(rows)


def reference_merge(case: Case, deltas: np.ndarray, keep: np.ndarray, base64: np.ndarray):
    """float64 merge element by element, each operation as the kernels order it."""
    n_experts = deltas.shape[0]
    weights, scales = case.weights[:n_experts], case.scales[:n_experts]
    kept = np.where(keep, deltas, 0.0)
    votes = np.zeros(deltas.shape[1])
    for i in range(n_experts):
        votes = votes + (weights[i] * scales[i]) * kept[i]
    weight_sum = 0.0
    for weight in weights:
        weight_sum += weight
    mixed, divisor = votes, np.full_like(votes, weight_sum if abs(weight_sum) >= 1e-8 else 1.0)
    if case.consensus:
        sign = np.where(votes >= 0.0, 1.0, -1.0)
        mixed, divisor = np.zeros_like(votes), np.zeros_like(votes)
        for i in range(n_experts):
            weighted = (weights[i] * scales[i]) * kept[i]
            agrees = weighted * sign > 0.0
            mixed = mixed + np.where(agrees, weighted, 0.0)
            divisor = divisor + np.where(agrees, weights[i], 0.0)
        divisor[divisor == 0.0] = 1.0
    merged = mixed / divisor if case.normalize else mixed
    return base64 + 0.9 * merged


def check_case(case: Case, seed: int) -> None:
    stack, base = make_inputs(case.encoding, case.n_experts, sum(case.chunks), seed)
    partials, merged = run_both(case, stack, base)
    deltas = deltas_of(stack, base, case.encoding)
    keep = reference_mask(case, deltas)
    assert np.array_equal(partials, reference_l1(case, deltas, keep))
    value = reference_merge(case, deltas, keep, decode64(base, case.encoding))
    # numpy narrows float64 to float32 and to float16 with one rounding to nearest even
    narrowed = value.astype(np.float32 if case.out == F32 else np.float16)
    assert np.array_equal(merged, narrowed.view(STORAGE[case.out]))


# -- tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding, n_experts", [(BF16, 3), (F16, 2), (F32, 1)],
                         ids=lambda v: NAMES.get(v, str(v)))
def test_histograms_match_cpu_and_bincount(encoding, n_experts):
    stack, base = make_inputs(encoding, n_experts, 517, seed=encoding)
    keys = keys_of(deltas_of(stack, base, encoding))
    rng = np.random.default_rng(1)
    # Counts accumulate across chunks: the kernels add to what the parts already hold.
    earlier = rng.integers(0, 5, (3, n_experts, cpu.BINS))
    expected, actual = earlier.copy(), earlier.copy()
    cpu.magnitude_histogram(stack, encoding, base, encoding, None, expected)
    device.magnitude_histogram(stack, encoding, base, encoding, None, actual)
    assert np.array_equal(actual.sum(0), expected.sum(0))
    for i in range(n_experts):
        added = np.bincount(keys[i] >> 16, minlength=cpu.BINS)
        assert np.array_equal(actual.sum(0)[i] - earlier.sum(0)[i], added)

    buckets = np.stack([keys[:, 7] >> 16, np.full(n_experts, -1)], axis=1)
    buckets[-1, 1] = keys[-1, 8] >> 16  # two buckets for the last expert, maybe the same
    earlier = rng.integers(0, 5, (2, n_experts, 2, cpu.BINS))
    expected, actual = earlier.copy(), earlier.copy()
    cpu.magnitude_histogram(stack, encoding, base, encoding, buckets, expected)
    device.magnitude_histogram(stack, encoding, base, encoding, buckets, actual)
    assert np.array_equal(actual.sum(0), expected.sum(0))
    for i in range(n_experts):
        for q in range(2):
            inside = keys[i][(keys[i] >> 16) == buckets[i, q]]
            added = np.bincount(inside & 0xFFFF, minlength=cpu.BINS)
            assert np.array_equal(actual.sum(0)[i, q] - earlier.sum(0)[i, q], added)


def test_tie_counts_over_reduction_blocks():
    n = REDUCTION_BLOCK + 301  # two reduction blocks, the second one partial
    stack, base = make_inputs(F16, 2, n, seed=9)
    keys = keys_of(deltas_of(stack, base, F16))
    common = []  # the most frequent key of each expert: many ties
    for row in keys:
        values, counts = np.unique(row, return_counts=True)
        common.append(int(values[counts.argmax()]))
    thresholds = np.array([[common[0], keys[0, 5]], [cpu.NONE, common[1]]], np.int64)
    expected = np.zeros((2, 2, 2), np.int64)
    cpu.threshold_ties(stack, F16, base, F16, thresholds, expected)
    actual = np.full_like(expected, -1)
    device.threshold_ties(stack, F16, base, F16, thresholds, actual)
    assert np.array_equal(actual, expected)
    for b, lo in enumerate((0, REDUCTION_BLOCK)):
        block = keys[:, lo:lo + REDUCTION_BLOCK]
        assert np.array_equal(actual[b], (block[:, :, None] == thresholds[:, None, :]).sum(1))
    assert actual[:, 0, 0].sum() > 10


# Each CPU kernel variant (encodings, rule, consensus, number of experts) costs Numba many
# seconds to compile, so most cases are bf16 to f32 with three experts, as in
# test_sparse_methods; f32 and f16 inputs, and one and two experts, have cases of their own.
THRESHOLD_CASES = {
    "ties_bf16": Case(BF16, 3, cpu.KEEP_BY_THRESHOLD, True, True, (180, 141),
                      keep=(0.3, 0.5, 0.2)),
    "breadcrumbs_bf16": Case(BF16, 3, cpu.KEEP_BY_THRESHOLD, False, False, (200, 161),
                             top=(0.1, 0.05, 0.0), keep=(0.6, 0.4, 0.5)),
    "top_k_f32_one_expert": Case(F32, 1, cpu.KEEP_BY_THRESHOLD, True, True, (150, 97),
                                 keep=(0.25,)),
}
RANDOM_CASES = {
    "dare_linear_bf16": Case(BF16, 3, cpu.KEEP_AT_RANDOM, False, False, (130, 101),
                             first=3 * REDUCTION_BLOCK + 5, keep=(0.3, 0.6, 0.5)),
    "dare_ties_bf16": Case(BF16, 3, cpu.KEEP_AT_RANDOM, True, True, (100, 77),
                           first=REDUCTION_BLOCK, keep=(0.5, 0.7, 0.2)),
    "dare_f16_two_experts": Case(F16, 2, cpu.KEEP_AT_RANDOM, False, True, (90, 61), out=F16,
                                 first=11, keep=(0.4, 0.8)),
}
RANK_CASES = {
    "della_bf16": Case(BF16, 3, cpu.KEEP_BY_ROW_RANK, True, True, (96, 144), block=48,
                       first=48 * 7, keep=(0.5, 0.4, 0.6), epsilon=0.2),
    "della_linear_bf16": Case(BF16, 3, cpu.KEEP_BY_ROW_RANK, False, False, (99, 66),
                              block=33, first=33, keep=(0.6, 0.3, 0.5)),
}


@pytest.mark.parametrize("name", THRESHOLD_CASES)
def test_threshold_rule_matches_cpu_and_ranks(name):
    """TIES and breadcrumbs: top-k by magnitude, ties at both thresholds in index order,
    the second chunk starting from the first chunk's tie counts."""
    check_case(THRESHOLD_CASES[name], seed=len(name))


@pytest.mark.parametrize("name", RANDOM_CASES)
def test_random_rule_matches_cpu_and_splitmix(name):
    """DARE: the draw of element j is uniform(seed, global index), whatever the chunking."""
    check_case(RANDOM_CASES[name], seed=len(name))


@pytest.mark.parametrize("name", RANK_CASES)
def test_row_rank_rule_matches_cpu_and_stable_sort(name):
    """DELLA: keep chances rise with the magnitude's rank in its row (a stable sort)."""
    check_case(RANK_CASES[name], seed=len(name))


def test_threshold_rule_with_small_blocks_and_bf16_output_matches_cpu():
    """Blocks smaller than a reduction block all start from its tie count, as on the CPU."""
    case = Case(BF16, 2, cpu.KEEP_BY_THRESHOLD, True, False, (301,), out=BF16, block=70,
                top=(0.02, 0.0), keep=(0.4, 0.3))
    stack, base = make_inputs(case.encoding, case.n_experts, 301, seed=4)
    run_both(case, stack, base)


def test_device_arrays_and_a_stream():
    case = RANDOM_CASES["dare_ties_bf16"]
    stack, base = make_inputs(BF16, 3, 90, seed=2)
    thresholds, quotas, _, seeds, densities, epsilons = selection_for(
        case, deltas_of(stack, base, BF16))
    selection = (thresholds, quotas, np.zeros((1, 3, 2), np.int64), seeds, densities, epsilons)
    expected = np.zeros(90, np.uint32)
    cpu.task_vector_merge(stack, BF16, base, BF16, cpu.KEEP_AT_RANDOM, True, 40, 64, selection,
                          case.weights, case.scales, True, 0.9, expected, F32)
    stream = cuda.stream()
    on_device = [cuda.to_device(a, stream=stream) for a in (stack, base, case.weights,
                                                             case.scales)]
    d_selection = tuple(cuda.to_device(a, stream=stream) for a in selection)
    d_out = cuda.device_array(90, np.uint32, stream=stream)
    device.task_vector_merge(on_device[0], BF16, on_device[1], BF16, cpu.KEEP_AT_RANDOM, True,
                             40, 64, d_selection, on_device[2], on_device[3], True, 0.9, d_out,
                             F32, stream=stream)
    assert np.array_equal(d_out.copy_to_host(stream=stream), expected)


def test_refused_shapes():
    base = np.zeros(8, np.uint16)
    selection = (np.zeros((65, 2), np.int64),) * 3 + (np.zeros(65, np.uint64),
                                                      np.ones(65), np.zeros(65))
    with pytest.raises(ValueError, match="at most 64 experts"):
        device.task_vector_l1(np.zeros((65, 8), np.uint16), BF16, base, BF16,
                              cpu.KEEP_AT_RANDOM, 0, 8, selection, np.zeros((1, 65, 2)))
    with pytest.raises(ValueError, match="2-D"):
        device.task_vector_merge(base, BF16, base, BF16, cpu.KEEP_AT_RANDOM, False, 0, 8,
                                 selection, np.ones(1), np.ones(1), False, 1.0, base, BF16)
