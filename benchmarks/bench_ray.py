"""A multi-shard merge on Ray with 1 and 2 local workers, against the I/O floor.

Usage::

    python benchmarks/make_experts.py --out /work/bench --shape tinyllama --experts 3
    python benchmarks/bench_ray.py --root /work/bench [--shard-size 500MB] [--repeat 3]

Runs bench_merge.py (cold inputs, the floor measured before each merge) for the same
karcher merge three ways: ``--executor local`` with 2 compute threads, and ``--executor
ray`` on a local Ray started with 1 and with 2 CPUs (one task per output shard, each task
computing on 1 thread), and prints one table of medians. The Ray rows include starting
Ray and its worker processes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_merge  # noqa: E402 - found through the path set above

RUNS = (("local, 2 threads", ["--executor", "local", "--threads", "2"]),
        ("ray, 1 worker", ["--executor", "ray", "--threads", "1"]),
        ("ray, 2 workers", ["--executor", "ray", "--threads", "2"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--shard-size", default="500MB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-memory", default="1GiB")
    parser.add_argument("--json", type=Path, default=Path("ray-bench.json"))
    args = parser.parse_args()
    rows = ["| run | merge s | floor s | merge / floor | peak RSS of the driver MiB |",
            "| --- | --: | --: | --: | --: |"]
    results = []
    for label, extra in RUNS:
        out = args.json.with_name(f"{args.json.stem}-{len(results)}.json")
        bench_merge.main(["--root", str(args.root), "--method", "karcher", "--base",
                          "--shard-size", args.shard_size, "--repeat", str(args.repeat),
                          "--max-memory", args.max_memory, "--json", str(out), *extra])
        median = json.loads(out.read_text())["results"][0]["median"]
        results.append({"run": label, **median})
        rows.append(f"| {label} | {median['merge_s']:.1f} | {median['floor_s']:.1f} | "
                    f"{median['ratio']:.2f} | {median['peak_rss_mib']:.0f} |")
    print("\n".join(rows))
    args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
