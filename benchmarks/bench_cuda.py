"""The CUDA path on a real GPU, in one go: kernels against the device's bandwidth, merges
against the I/O floor and against --device cpu.

Usage (on a machine with an NVIDIA GPU and ``pip install -e '.[cuda]'``)::

    python benchmarks/make_experts.py --out /data/bench --shape tinyllama --experts 3
    python benchmarks/bench_cuda.py --root /data/bench [--json cuda.json]
    NUMBA_ENABLE_CUDASIM=1 python benchmarks/bench_cuda.py --smoke   # checks the script only

Prints, as markdown:

1. the device, its device-to-device copy bandwidth and its host-to-device copy rate from
   pinned and from pageable memory;
2. each device kernel's throughput (bytes of input and output it moves per second, on data
   already on the device) as a share of the copy bandwidth, median of ``--repeat`` runs;
   the same through the backend (host chunk in, host result out, spans on two streams) as a
   share of the pinned host-to-device rate;
3. the size threshold for ``--device auto``: a Gram pass plus a weighted sum (karcher's work
   on one chunk) on the CPU and through the backend, for tensors of 2^16 to 2^26 elements,
   and the smallest size from which the GPU is faster (compare with GPU_MIN_ELEMENTS in
   lowmem_merge/engine/devices.py);
4. with ``--root``, the TinyLlama-shaped karcher and ties merges (bench_merge.py) with
   ``--device cuda`` and ``--device cpu``, each against the cold-read + write floor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def timed(run: Callable[[], None], repeat: int) -> float:
    """Median seconds of ``run`` over ``repeat`` runs, after one warm-up (compilation)."""
    from numba import cuda

    run()
    cuda.synchronize()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def gpu_budget() -> int:
    """Half the free device memory (the simulator reports infinity: 256 MiB then)."""
    from numba import cuda

    free = cuda.current_context().get_memory_info().free
    return int(free * 0.5) if free != float("inf") else 256 * 1024**2


def copy_rates(nbytes: int, repeat: int) -> dict[str, float]:
    """Bytes per second: device to device, pinned host to device, pageable host to device."""
    from numba import cuda

    source, target = cuda.device_array(nbytes, np.uint8), cuda.device_array(nbytes, np.uint8)
    pinned = cuda.pinned_array(nbytes, np.uint8)
    pageable = np.ones(nbytes, np.uint8)
    return {
        # A device copy reads and writes every byte.
        "device_to_device": 2 * nbytes / timed(lambda: target.copy_to_device(source), repeat),
        "pinned_to_device": nbytes / timed(lambda: target.copy_to_device(pinned), repeat),
        "pageable_to_device": nbytes / timed(lambda: target.copy_to_device(pageable), repeat),
    }


def kernel_cases(n_experts: int, elements: int) -> list[tuple[str, int, Callable, Callable]]:
    """(name, bytes moved, device run, backend run) for every dispatched kernel."""
    from gguf import GGMLQuantizationType
    from numba import cuda

    from lowmem_merge import kernels
    from lowmem_merge.kernels import sparse
    from lowmem_merge.kernels.cuda import arrays as dev
    from lowmem_merge.kernels.cuda import gguf_quants as dev_quants
    from lowmem_merge.kernels.cuda import sparse as dev_sparse
    from lowmem_merge.kernels.cuda.backend import CudaKernels
    from lowmem_merge.kernels.gguf_quants import block_layout

    rng = np.random.default_rng(0)
    values = rng.normal(0, 0.02, (n_experts, elements)).astype(np.float32)
    stack = (values.view(np.uint32) >> 16).astype(np.uint16)  # bf16 bits
    base = (rng.normal(0, 0.02, elements).astype(np.float32).view(np.uint32) >> 16
            ).astype(np.uint16)
    d_stack, d_base = cuda.to_device(stack), cuda.to_device(base)
    out = cuda.pinned_array(elements, np.uint16)
    d_out = cuda.device_array(elements, np.uint16)
    blocks = -(-elements // kernels.REDUCTION_BLOCK)
    partials = np.empty((blocks, n_experts, n_experts))
    d_partials = cuda.device_array(partials.shape)
    coefficients = np.full(n_experts, 1.0 / n_experts)
    d_coefficients = cuda.to_device(coefficients)
    backend = CudaKernels(gpu_budget())
    host_stack, host_base = cuda.pinned_array(stack.shape, np.uint16), \
        cuda.pinned_array(base.shape, np.uint16)
    host_stack[:], host_base[:] = stack, base
    bf16 = kernels.BF16
    selection = (np.full((n_experts, 2), sparse.NONE, np.int64), np.zeros((n_experts, 2),
                 np.int64), np.zeros((blocks, n_experts, 2), np.int64),
                 np.arange(1, n_experts + 1, dtype=np.uint64), np.full(n_experts, 0.5),
                 np.zeros(n_experts))
    d_selection = tuple(cuda.to_device(s) for s in selection)
    weights, scales = np.ones(n_experts), np.ones(n_experts)
    d_weights, d_scales = cuda.to_device(weights), cuda.to_device(scales)
    read = stack.nbytes + base.nbytes
    q_elements = elements // 256 * 256
    q_values = cuda.to_device(values[0, :q_elements])
    cases = [
        ("gram (float64)", read,
         lambda: dev.gram_blocks(d_stack, bf16, d_base, bf16, True, d_partials),
         lambda: backend.gram_blocks(host_stack, bf16, host_base, bf16, True, partials)),
        ("weighted sum", read + out.nbytes,
         lambda: dev.weighted_sum(d_stack, bf16, d_coefficients, d_base, bf16, 1.0, True,
                                  d_out, bf16),
         lambda: backend.weighted_sum(host_stack, bf16, coefficients, host_base, bf16, 1.0,
                                      True, out, bf16)),
        ("DARE merge (random drops)", read + out.nbytes,
         lambda: dev_sparse.task_vector_merge(
             d_stack, bf16, d_base, bf16, sparse.KEEP_AT_RANDOM, True, 0,
             kernels.REDUCTION_BLOCK, d_selection, d_weights, d_scales, True, 1.0, d_out, bf16),
         lambda: backend.task_vector_merge(
             host_stack, bf16, host_base, bf16, sparse.KEEP_AT_RANDOM, True, 0,
             kernels.REDUCTION_BLOCK, selection, weights, scales, True, 1.0, out, bf16)),
    ]
    histogram = np.zeros((1, n_experts, sparse.BINS), np.int64)
    d_histogram = cuda.to_device(histogram)
    cases.append(("radix-select histogram", read,
                  lambda: dev_sparse.magnitude_histogram(d_stack, bf16, d_base, bf16, None,
                                                         d_histogram),
                  lambda: backend.magnitude_histogram(host_stack, bf16, host_base, bf16, None,
                                                      histogram)))
    for name in ("Q8_0", "Q4_K", "Q6_K"):
        qtype = int(GGMLQuantizationType[name])
        block_elements, block_bytes = block_layout(qtype)
        q_out = cuda.device_array(q_elements // block_elements * block_bytes, np.uint8)
        host_q_out = np.empty(q_out.shape, np.uint8)
        host_values = values[0, :q_elements].copy()
        cases.append((f"quantize {name}", q_elements * 4 + q_out.nbytes,
                      lambda q=qtype, o=q_out: dev_quants.quantize_into(q_values, q, o),
                      lambda q=qtype, o=host_q_out, v=host_values: backend.quantize_into(v, q,
                                                                                       o)))
    return cases


def kernel_table(args: argparse.Namespace, rates: dict[str, float]) -> tuple[list[str], list]:
    rows = ["| kernel | on device GB/s | share of device copy | through the backend GB/s |"
            " share of pinned H2D |", "| --- | --: | --: | --: | --: |"]
    results = []
    for name, moved, on_device, through_backend in kernel_cases(args.experts, args.elements):
        device_rate = moved / timed(on_device, args.repeat)
        backend_rate = moved / timed(through_backend, args.repeat)
        results.append({"kernel": name, "bytes": moved, "device_Bps": device_rate,
                        "backend_Bps": backend_rate})
        rows.append(f"| {name} | {device_rate / 1e9:.1f} | "
                    f"{device_rate / rates['device_to_device']:.0%} | {backend_rate / 1e9:.1f} | "
                    f"{backend_rate / rates['pinned_to_device']:.0%} |")
    return rows, results


def threshold_table(args: argparse.Namespace) -> tuple[list[str], list]:
    """Karcher's kernels on one tensor, CPU against GPU, from small to large."""

    from lowmem_merge.kernels.cuda.backend import CudaKernels

    gpu = CudaKernels(gpu_budget())
    rows = ["| elements | CPU ms | GPU ms | GPU faster |", "| --: | --: | --: | --- |"]
    results, rng = [], np.random.default_rng(2)
    exponents = range(16, 27, 2) if not args.smoke else (12,)
    for exponent in exponents:
        n = 1 << exponent
        cpu_s, gpu_s = _karcher_times(args, n, gpu, rng)
        results.append({"elements": n, "cpu_s": cpu_s, "gpu_s": gpu_s})
        rows.append(f"| {n:,} | {cpu_s * 1e3:.2f} | {gpu_s * 1e3:.2f} | "
                    f"{'yes' if gpu_s < cpu_s else 'no'} |")
    faster = [r["elements"] for r in results if r["gpu_s"] < r["cpu_s"]]
    rows.append("")
    rows.append(f"smallest size measured where the GPU wins: {faster[0]:,} elements" if faster
                else "the GPU won at no size measured")
    return rows, results


def _karcher_times(args: argparse.Namespace, n: int, gpu, rng) -> tuple[float, float]:
    """Seconds of one Gram pass and one weighted sum of n elements: CPU, then GPU."""
    from numba import cuda

    from lowmem_merge import kernels
    from lowmem_merge.kernels import dispatch

    stack = cuda.pinned_array((args.experts, n), np.uint16)
    stack[:] = rng.integers(0x3C00, 0x3D00, stack.shape, dtype=np.uint16)
    out = cuda.pinned_array(n, np.uint16)
    partials = np.empty((-(-n // kernels.REDUCTION_BLOCK), args.experts, args.experts))
    weights = np.full(args.experts, 1.0 / args.experts)

    def karcher_work() -> None:
        kernels.gram_blocks(stack, kernels.BF16, stack[0], kernels.BF16, False, partials)
        kernels.weighted_sum(stack, kernels.BF16, weights, stack[0], kernels.BF16, 0.0, False,
                             out, kernels.BF16)

    def on_gpu() -> None:
        with dispatch.running_on(gpu):
            karcher_work()

    return timed(karcher_work, args.repeat), timed(on_gpu, args.repeat)


def merge_table(args: argparse.Namespace) -> tuple[list[str], list]:
    """bench_merge.py for karcher and ties on each device; its JSON gives the floor."""
    import bench_merge

    rows = ["| merge | device | time s | floor s | merge / floor |",
            "| --- | --- | --: | --: | --: |"]
    results = []
    for method, extra in (("karcher", []), ("ties", ["--base", "--param", "density=0.5"])):
        for device in ("cuda", "cpu"):
            out = args.json_dir / f"merge-{method}-{device}.json"
            bench_merge.main(["--root", str(args.root), "--method", method, "--device", device,
                              "--repeat", str(args.merge_repeat), "--max-memory",
                              args.max_memory, "--json", str(out), *extra])
            median = json.loads(out.read_text())["results"][0]["median"]
            results.append({"method": method, "device": device, **median})
            rows.append(f"| {method} | {device} | {median['merge_s']:.1f} | "
                        f"{median['floor_s']:.1f} | {median['ratio']:.2f} |")
    return rows, results


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, help="make_experts.py output: run the merges")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--elements", type=int, default=64 * 1024**2,
                        help="elements per expert in the kernel runs")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--merge-repeat", type=int, default=3)
    parser.add_argument("--max-memory", default="4GiB")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, to check the script (under NUMBA_ENABLE_CUDASIM=1)")
    args = parser.parse_args()
    if args.smoke:
        args.elements, args.repeat = 1100, 1
    args.json_dir = (args.json or Path("cuda.json")).resolve().parent
    return args


def main() -> None:
    from numba import cuda

    args = parse_args()
    device = cuda.get_current_device()
    name = getattr(device, "name", b"simulator")
    name = name.decode() if isinstance(name, bytes) else str(name)
    rates = copy_rates(min(args.elements * 2, 1 << 30), args.repeat)
    lines = [f"device: {name}; device-to-device copy {rates['device_to_device'] / 1e9:.0f} GB/s,"
             f" host-to-device {rates['pinned_to_device'] / 1e9:.1f} GB/s pinned,"
             f" {rates['pageable_to_device'] / 1e9:.1f} GB/s pageable", ""]
    kernel_rows, kernels_measured = kernel_table(args, rates)
    threshold_rows, threshold = threshold_table(args)
    lines += [*kernel_rows, "", *threshold_rows]
    merges = []
    if args.root:
        merge_rows, merges = merge_table(args)
        lines += ["", *merge_rows]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"device": name, "copy_Bps": rates,
                                         "kernels": kernels_measured, "threshold": threshold,
                                         "merges": merges},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
