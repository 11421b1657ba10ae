"""The CPU's GGUF quantizers, type by type: time, throughput and a digest of the bytes.

Usage::

    python benchmarks/bench_quantize.py [--elements 8388608] [--repeat 5] [--threads N]

Quantizes the same seeded Gaussian float32 values (sd 0.02, as weights) to every type the
writer produces, and prints, per type, the median time of ``--repeat`` runs after one
warm-up (compilation), the input rate in MB/s, and the first 16 hex digits of the output's
SHA-256. Run it on two versions of the code, alternately, to compare them: equal digests
mean equal bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from collections.abc import Callable
from functools import partial

import gguf
import numpy as np

TYPES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


def timed_row(name: str, run: Callable[[], None], output: np.ndarray, in_bytes: int,
              repeat: int) -> str:
    """A table row: the median time of ``repeat`` runs after one warm-up, the input rate and
    the first 16 hex digits of the output's SHA-256."""
    run()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    digest = hashlib.sha256(output.tobytes()).hexdigest()[:16]
    return f"| {name} | {seconds * 1e3:.1f} | {in_bytes / seconds / 1e6:.0f} | {digest} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elements", type=int, default=1 << 23,
                        help="values to quantize, a multiple of 256 (default 8,388,608)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per type")
    parser.add_argument("--threads", type=int, help="Numba threads (default: all cores)")
    args = parser.parse_args()
    if args.elements <= 0 or args.elements % 256:
        parser.error("--elements must be a positive multiple of 256")
    if args.threads:
        import numba

        numba.set_num_threads(args.threads)
    from lowmem_merge.kernels.gguf_quants import block_layout, quantize_into

    values = np.random.default_rng(0).normal(0, 0.02, args.elements).astype(np.float32)
    print("| type | ms | MB/s in | sha256 |\n| --- | --: | --: | --- |")
    for name in TYPES:
        qtype = gguf.GGMLQuantizationType[name].value
        block_elements, block_bytes = block_layout(qtype)
        out = np.zeros(args.elements // block_elements * block_bytes, np.uint8)
        print(timed_row(name, partial(quantize_into, values, qtype, out), out, values.nbytes,
                        args.repeat))


if __name__ == "__main__":
    main()
