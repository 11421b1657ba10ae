"""Benchmark ``lowmem-merge merge`` against the I/O floor of the same machine.

Usage::

    python benchmarks/make_experts.py --out /work/bench --shape tinyllama --experts 3
    python benchmarks/bench_merge.py --root /work/bench --method karcher --repeat 3
    python benchmarks/bench_merge.py --root /work/bench --method task_arithmetic --base

ROOT holds ``base/`` and ``expert-1/`` .. ``expert-N/`` (from make_experts.py).
``--gguf-inputs TYPE`` first converts them (once, kept under ROOT/gguf-TYPE/) to
GGUF files of that type with ``lowmem-merge convert`` and merges those;
``--gguf-output TYPE`` writes a GGUF of that type (q8_0, q4_k_m, ...) instead
of a safetensors folder, and the floor then writes as many bytes as the merge
wrote in its warm-up run.
For each method, after one untimed warm-up merge (numba may compile and cache
kernels on a first run; ``--warmup 0`` skips it), each repetition measures:

* read cold: the input safetensors files (the experts, plus the base with
  ``--base``) are evicted from the page cache with
  ``posix_fadvise(POSIX_FADV_DONTNEED)`` (no root needed), then read once in
  64 MiB sequential reads;
* write+fsync: a file of the merged model's size (one expert's safetensors
  bytes) is written in 64 MiB blocks, fsynced and deleted;
* floor = read cold + write+fsync: a merge that reads every input once and
  writes its output once can hardly be faster;
* merge: the inputs are evicted again, then ``lowmem-merge merge --quiet
  --force`` runs as a child process into ROOT/bench-merged (deleted after
  each run). Its wall time includes interpreter start-up and imports; its
  peak RSS and CPU time come from ``os.wait4`` on that child.

Printed at the end: a markdown table per method, each repetition and the
median, with the ratio merge / floor. ``--json OUT`` also writes the numbers.
Page-cache eviction is checked with mincore(2); a virtual disk may still be
cached by its host, which this cannot see. Linux only (posix_fadvise, mincore).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

BLOCK = 64 * 1024**2
MIB = 1024**2
OUTPUT_NAME = "bench-merged"
FLOOR_FILE_NAME = ".bench-floor.tmp"
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mmap.restype = ctypes.c_void_p
_LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_LIBC.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


@dataclass
class Run:
    """One repetition: the I/O floor measured just before one timed merge."""

    repetition: int
    read_cold_s: float
    write_fsync_s: float
    merge_s: float
    peak_rss_mib: float
    cpu_s: float
    resident_before_merge: float  # fraction of input pages still cached after eviction

    @property
    def floor_s(self) -> float:
        return self.read_cold_s + self.write_fsync_s

    @property
    def ratio(self) -> float:
        return self.merge_s / self.floor_s

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "floor_s": self.floor_s, "ratio": self.ratio}


@dataclass
class MethodResult:
    method: str
    with_base: bool
    input_bytes: int
    output_bytes: int
    warmup_s: float | None
    runs: list[Run] = field(default_factory=list)

    def median(self) -> dict[str, float]:
        rows = [run.as_dict() for run in self.runs]
        return {key: statistics.median(row[key] for row in rows)
                for key in rows[0] if key != "repetition"}

    def as_dict(self) -> dict:
        return {"method": self.method, "with_base": self.with_base,
                "input_bytes": self.input_bytes, "output_bytes": self.output_bytes,
                "warmup_s": self.warmup_s, "runs": [run.as_dict() for run in self.runs],
                "median": self.median()}


# -- arguments and inputs ------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True,
                        help="folder with base/ and expert-N/ (make_experts.py --out)")
    parser.add_argument("--method", action="append",
                        help="merge method; repeat or comma-separate (default karcher)")
    parser.add_argument("--base", action="store_true", help="pass ROOT/base as --base")
    parser.add_argument("--max-memory", default="512MiB", help="merge budget (default 512MiB)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    parser.add_argument("--threads", type=int, help="passed to lowmem-merge --threads")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="method parameter passed to lowmem-merge --param; repeat")
    parser.add_argument("--gguf-inputs", metavar="TYPE",
                        help="merge GGUF conversions (this file type) of the models")
    parser.add_argument("--gguf-output", metavar="TYPE",
                        help="write a GGUF of this file type instead of safetensors")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"],
                        help="passed to lowmem-merge --device")
    parser.add_argument("--executor", choices=["local", "ray"],
                        help="passed to lowmem-merge --executor (ray: a local Ray with"
                        " --threads CPUs, one task per output shard)")
    parser.add_argument("--shard-size", help="passed to lowmem-merge --shard-size")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.gguf_output and args.warmup < 1:
        parser.error("--gguf-output needs a warm-up run (it measures the output size)")
    args.methods = [m.strip() for arg in args.method or ["karcher"]
                    for m in arg.split(",") if m.strip()]
    if args.repeat < 1 or args.warmup < 0:
        parser.error("--repeat must be at least 1 and --warmup at least 0")
    return args


def find_models(root: Path) -> tuple[Path, list[Path]]:
    """ROOT/base and ROOT/expert-1 .. expert-N in numeric order."""
    experts = sorted(root.glob("expert-*"), key=lambda p: int(p.name.split("-", 1)[1]))
    experts = [p for p in experts if (p / "config.json").is_file()]
    if not experts:
        raise SystemExit(f"{root}: no complete expert-N folders; run make_experts.py first")
    return root / "base", experts


def input_files(models: list[Path]) -> list[Path]:
    """The weight files of each model: a GGUF file itself, or a folder's safetensors."""
    return [path for model in models
            for path in ([model] if model.is_file() else sorted(model.glob("*.safetensors")))]


def gguf_conversions(args: argparse.Namespace, models: list[Path]) -> list[Path]:
    """Each model converted once to ROOT/gguf-TYPE/NAME.gguf (kept for later runs)."""
    folder = args.root / f"gguf-{args.gguf_inputs.lower()}"
    folder.mkdir(exist_ok=True)
    converted = []
    for model in models:
        target = folder / f"{model.name}.gguf"
        if not target.is_file():
            print(f"converting {model} to {target}", flush=True)
            run_child([*merge_executable(), "convert", str(model), str(target), "--dtype",
                       args.gguf_inputs, "--quiet"])
        converted.append(target)
    return converted


def output_path(args: argparse.Namespace) -> Path:
    return args.root / (OUTPUT_NAME + (".gguf" if args.gguf_output else ""))


def remove_output(path: Path) -> int:
    """Delete a merge's output (file or folder); the bytes it held."""
    if path.is_file():
        size = path.stat().st_size
        path.unlink()
        return size
    size = total_bytes(sorted(path.glob("*"))) if path.is_dir() else 0
    shutil.rmtree(path, ignore_errors=True)
    return size


def total_bytes(paths: list[Path]) -> int:
    return sum(path.stat().st_size for path in paths)


def merge_executable() -> list[str]:
    beside = Path(sys.executable).with_name("lowmem-merge")
    found = str(beside) if beside.is_file() else shutil.which("lowmem-merge")
    return [found] if found else [sys.executable, "-m", "lowmem_merge_cli.main"]


# -- page cache ----------------------------------------------------------------


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache (written back first if dirty)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _resident_pages(fd: int, size: int) -> int:
    address = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap failed")
    try:
        pages = np.zeros(-(-size // mmap.PAGESIZE), np.uint8)
        if _LIBC.mincore(address, size, pages.ctypes.data) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return int(np.count_nonzero(pages & 1))
    finally:
        _LIBC.munmap(address, size)


def resident_fraction(paths: list[Path]) -> float:
    """Fraction of the files' pages now in the page cache (mincore)."""
    resident = pages = 0
    for path in paths:
        size = path.stat().st_size
        if size == 0:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            resident += _resident_pages(fd, size)
        finally:
            os.close(fd)
        pages += -(-size // mmap.PAGESIZE)
    return resident / pages if pages else 0.0


# -- the I/O floor ---------------------------------------------------------------


def read_cold(paths: list[Path], buffer: bytearray) -> float:
    """Seconds to read every file once, sequentially, from an evicted page cache."""
    evict(paths)
    view = memoryview(buffer)
    started = time.perf_counter()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while os.readv(fd, [view]):
                pass
        finally:
            os.close(fd)
    return time.perf_counter() - started


def write_fsync(path: Path, nbytes: int, block: bytes) -> float:
    """Seconds to write nbytes to a new file and fsync it; the file is deleted after."""
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        remaining = nbytes
        while remaining:
            remaining -= os.write(fd, memoryview(block)[: min(remaining, len(block))])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - started
    path.unlink()
    return seconds


# -- merging -------------------------------------------------------------------


def merge_command(args: argparse.Namespace, method: str, experts: list[Path],
                  base: Path) -> list[str]:
    command = [*merge_executable(), "merge", *map(str, experts), "-o",
               str(output_path(args)), "-m", method, "--max-memory", args.max_memory,
               "--quiet", "--force"]
    if args.gguf_output:
        command += ["--dtype", args.gguf_output]
    if args.base:
        command += ["--base", str(base)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.device:
        command += ["--device", args.device]
    if args.executor:
        command += ["--executor", args.executor]
    if args.shard_size:
        command += ["--shard-size", args.shard_size]
    for param in args.param:
        command += ["--param", param]
    return command


def run_child(command: list[str]) -> tuple[float, float, float]:
    """Run a command: (wall seconds, peak RSS in MiB, user+system CPU seconds)."""
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    errors = child.stderr.read()
    child.stderr.close()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command)}\nfailed ({child.returncode}):\n"
                         f"{errors.decode(errors='replace')}")
    return seconds, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def timed_merge(command: list[str], inputs: list[Path],
                output: Path) -> tuple[float, float, float, float, int]:
    """Evict the inputs, merge, delete the output: run_child's numbers, residency, and the
    output's size."""
    evict(inputs)
    resident = resident_fraction(inputs)
    size = 0
    try:
        seconds, rss, cpu = run_child(command)
    finally:
        size = remove_output(output)
    return seconds, rss, cpu, resident, size


def startup_seconds() -> float:
    """Wall time of ``lowmem-merge --version``: interpreter start and imports."""
    return min(run_child([*merge_executable(), "--version"])[0] for _ in range(3))


# -- the benchmark ---------------------------------------------------------------


def bench_method(args: argparse.Namespace, method: str, base: Path,
                 experts: list[Path]) -> MethodResult:
    if args.gguf_inputs:
        experts = gguf_conversions(args, experts)
        base = gguf_conversions(args, [base])[0] if args.base else base
    inputs = input_files(experts + ([base] if args.base else []))
    output_bytes = total_bytes(input_files(experts[:1]))
    command = merge_command(args, method, experts, base)
    output = output_path(args)
    warmup = [timed_merge(command, inputs, output) for _ in range(args.warmup)]
    if args.gguf_output:
        output_bytes = warmup[0][4]
    result = MethodResult(method, args.base, total_bytes(inputs), output_bytes,
                          warmup[0][0] if warmup else None)
    buffer, block = bytearray(BLOCK), np.random.default_rng(0).bytes(BLOCK)
    for repetition in range(1, args.repeat + 1):
        read_s = read_cold(inputs, buffer)
        write_s = write_fsync(args.root / FLOOR_FILE_NAME, output_bytes, block)
        merge_s, rss, cpu, resident, _ = timed_merge(command, inputs, output)
        result.runs.append(Run(repetition, read_s, write_s, merge_s, rss, cpu, resident))
        print(f"{method} run {repetition}: merge {merge_s:.2f} s, floor {read_s + write_s:.2f} s"
              f" (read {read_s:.2f} + write {write_s:.2f}), peak RSS {rss:.0f} MiB", flush=True)
    return result


def markdown_table(results: list[MethodResult]) -> str:
    lines = ["| method | run | merge s | read cold s | write+fsync s | floor s | merge/floor"
             " | peak RSS MiB | child CPU s |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for result in results:
        name = result.method + (" --base" if result.with_base else "")
        rows = [(str(run.repetition), run.as_dict()) for run in result.runs]
        for label, row in [*rows, ("**median**", result.median())]:
            lines.append(f"| {name} | {label} | {row['merge_s']:.2f} | {row['read_cold_s']:.2f}"
                         f" | {row['write_fsync_s']:.2f} | {row['floor_s']:.2f}"
                         f" | {row['ratio']:.2f} | {row['peak_rss_mib']:.0f}"
                         f" | {row['cpu_s']:.1f} |")
    return "\n".join(lines)


def summary(args: argparse.Namespace, results: list[MethodResult], startup: float) -> str:
    first = results[0]
    resident = max(run.resident_before_merge for r in results for run in r.runs)
    warmups = ", ".join(f"{r.method} {r.warmup_s:.2f} s" for r in results if r.warmup_s)
    return (f"inputs {first.input_bytes / MIB:.0f} MiB, output {first.output_bytes / MIB:.0f}"
            f" MiB, --max-memory {args.max_memory}, threads {args.threads or 'all'}"
            f" ({os.cpu_count()} CPUs); start-up (lowmem-merge --version) {startup:.2f} s;"
            f" untimed warm-up: {warmups or 'none'}; inputs cached before merges at most"
            f" {resident:.1%}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    base, experts = find_models(args.root)
    if args.base and not (base / "config.json").is_file():
        raise SystemExit(f"{base}: no complete base model; run make_experts.py first")
    startup = startup_seconds()
    results = [bench_method(args, method, base, experts) for method in args.methods]
    print()
    print(summary(args, results, startup))
    print()
    print(markdown_table(results))
    if args.json:
        document = {"root": str(args.root), "max_memory": args.max_memory,
                    "threads": args.threads, "cpus": os.cpu_count(), "startup_s": startup,
                    "results": [result.as_dict() for result in results]}
        args.json.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
