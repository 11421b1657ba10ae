"""Peak memory against model size at a fixed budget, optionally under a real cgroup limit.

Usage::

    python benchmarks/bench_memory.py --root /work/memory-bench [--max-memory 512MiB]
        [--cgroup-limit 768MiB] [--shapes 0.5b,1b,3b,70b-slice]

For each shape, two bf16 experts are generated under ROOT/<shape>/ (kept for
later runs) and merged with karcher by a child ``lowmem-merge merge``. Printed:
parameters and input bytes, wall time, the child's peak RSS (wait4), and with
``--cgroup-limit`` the child runs inside a new memory cgroup of that limit
(v1 or v2) with no --max-memory, so its budget comes from the cgroup: the
cgroup's peak usage (page cache included on v1) and OOM kills are printed too.
The 70b-slice shape is a full Llama-3-70B embedding and head (128256 x 8192)
with one 70B decoder layer.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from memory_cgroup import CgroupUnavailable, MemoryCgroup  # noqa: E402

from lowmem_merge.synthetic import LlamaShape, write_model  # noqa: E402
from lowmem_merge.units import format_bytes, parse_size  # noqa: E402

SHAPES = {
    "0.5b": LlamaShape(896, 4864, 24, 14, 2, 151936),
    "1b": LlamaShape(2048, 5632, 22, 32, 4, 32000),
    "3b": LlamaShape(3072, 8192, 28, 24, 8, 128256),
    "70b-slice": LlamaShape(8192, 28672, 1, 64, 8, 128256),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--max-memory", default="512MiB")
    parser.add_argument("--cgroup-limit", help="also run each merge in a cgroup of this limit")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    return parser.parse_args()


def experts_of(root: Path, name: str) -> list[Path]:
    folders = [root / name / f"expert-{i}" for i in (1, 2)]
    for index, folder in enumerate(folders):
        if not (folder / "config.json").is_file():
            print(f"writing {folder}", flush=True)
            write_model(folder, SHAPES[name], seed=1, expert=index, dtype="BF16")
    return folders


def run(command: list[str], group: MemoryCgroup | None) -> tuple[float, float]:
    """(seconds, peak RSS in bytes) of a child command."""
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             preexec_fn=group.enter if group else None)
    errors = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{errors.decode(errors='replace')}")
    return time.perf_counter() - started, usage.ru_maxrss * 1024


def main() -> None:
    args = parse_args()
    executable = shutil.which("lowmem-merge") or "lowmem-merge"
    rows = []
    for name in args.shapes.split(","):
        experts = experts_of(args.root, name)
        params = sum(math.prod(shape) for _, shape in SHAPES[name].tensors())
        inputs = sum(f.stat().st_size for e in experts for f in e.glob("*.safetensors"))
        out = args.root / "merged"
        command = [executable, "merge", *map(str, experts), "-m", "karcher", "-o", str(out),
                   "--force", "--quiet"]
        seconds, rss = run([*command, "--max-memory", args.max_memory], None)
        row = [name, f"{params / 1e9:.2f}B", format_bytes(inputs), f"{seconds:.1f}",
               format_bytes(rss)]
        if args.cgroup_limit:
            try:
                group = MemoryCgroup.create(parse_size(args.cgroup_limit, "--cgroup-limit"))
            except CgroupUnavailable as reason:
                raise SystemExit(f"--cgroup-limit: {reason}") from None
            try:
                seconds, rss = run(command, group)
                row += [f"{seconds:.1f}", format_bytes(rss),
                        format_bytes(group.peak() or 0), str(group.oom_kills())]
            finally:
                group.remove()
        shutil.rmtree(out, ignore_errors=True)
        rows.append(row)
        print(" | ".join(row), flush=True)
    header = ["shape", "params/expert", "inputs", f"s at {args.max_memory}", "peak RSS"]
    if args.cgroup_limit:
        header += [f"s in {args.cgroup_limit} cgroup", "peak RSS", "cgroup peak", "OOM kills"]
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
