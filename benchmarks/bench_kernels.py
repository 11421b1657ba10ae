"""The CPU's merge kernels, one by one: time, throughput and a digest of the output.

Usage::

    python benchmarks/bench_kernels.py [--elements 16777216] [--experts 3] [--repeat 7]
                                       [--threads N]

Runs each dense and sparse kernel the merge methods call on the same seeded bf16 experts
(and a base), and prints, per kernel, the median time of ``--repeat`` runs after one warm-up
(compilation), the rate over the experts' bytes in MB/s, and the first 16 hex digits of the
output's SHA-256. Run it on two versions of the code, alternately, to compare them: equal
digests mean equal results. A checkout whose kernel sources changed compiles its kernels
again on its first run (kernels/compile_cache.py), in the untimed warm-up.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quantize import timed_row  # noqa: E402 - found through the path set above


def _cases(n: int, n_experts: int) -> dict[str, tuple[Callable[[], None], np.ndarray]]:
    from lowmem_merge.kernels import arrays, sparse
    from lowmem_merge.kernels.scalars import BF16

    rng = np.random.default_rng(0)
    values = rng.normal(0, 0.02, (n_experts + 1, n)).astype(np.float32)
    raw = (values.view(np.uint32) >> 16).astype(np.uint16)  # bf16 by truncation: any bits do
    stack, base = raw[1:], raw[0].copy()
    out = np.empty(n, np.uint16)
    merged = values[1].astype(np.float64)
    coefficients = np.full(n_experts, 1.0 / n_experts)
    partials = np.empty((-(-n // arrays.REDUCTION_BLOCK), n_experts, n_experts))
    histogram = np.zeros((2, n_experts, sparse.BINS), np.int64)
    n_blocks = -(-n // arrays.REDUCTION_BLOCK)
    no_ties = np.zeros((n_blocks, n_experts, 2), np.int64)
    # TIES keeps |delta| above 2**-7 (about 4 in 5 here): no lower rank bound, no ties kept.
    thresholds = np.tile(np.array([sparse.NONE, 0x3C000000], np.int64), (n_experts, 1))
    selection = (thresholds, np.zeros((n_experts, 2), np.int64), no_ties,
                 np.arange(1, n_experts + 1, dtype=np.uint64), np.full(n_experts, 0.5),
                 np.zeros(n_experts))
    ones = np.ones(n_experts)

    def merge(keep_kind: int, consensus: bool) -> Callable[[], None]:
        return lambda: sparse.task_vector_merge(stack, BF16, base, BF16, keep_kind, consensus,
                                                0, 1 << 16, selection, ones, ones, False, 1.0,
                                                out, BF16)

    return {
        "gram_blocks": (lambda: arrays.gram_blocks(stack, BF16, base, BF16, True, partials),
                        partials),
        "weighted_sum": (lambda: arrays.weighted_sum(stack, BF16, coefficients, base, BF16, 1.0,
                                                     True, out, BF16), out),
        "encode_array": (lambda: arrays.encode_array(merged, out, BF16), out),
        "transcode": (lambda: arrays.transcode(stack[0], BF16, out, BF16), out),
        "magnitude_histogram": (lambda: sparse.magnitude_histogram(stack, BF16, base, BF16, None,
                                                                   histogram), histogram),
        "dare merge": (merge(sparse.KEEP_AT_RANDOM, False), out),
        "ties merge": (merge(sparse.KEEP_BY_THRESHOLD, True), out),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elements", type=int, default=1 << 24, help="elements per expert")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per kernel")
    parser.add_argument("--threads", type=int, help="Numba threads (default: all cores)")
    args = parser.parse_args()
    if args.elements <= 0 or args.experts <= 0:
        parser.error("--elements and --experts must be positive")
    if args.threads:
        import numba

        numba.set_num_threads(args.threads)
    in_bytes = 2 * args.elements * args.experts
    print("| kernel | ms | MB/s in | sha256 |\n| --- | --: | --: | --- |")
    for name, (run, output) in _cases(args.elements, args.experts).items():
        output[...] = 0
        print(timed_row(name, run, output, in_bytes, args.repeat))


if __name__ == "__main__":
    main()
