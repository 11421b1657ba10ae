"""Survival report: the RAM cap under a real cgroup, kills survived, hostile inputs refused.

Usage::

    python benchmarks/survival_report.py --root /work/bench [--kills 8]
        [--cgroup-limit 768MiB] [--fuzz-examples 5000]

ROOT holds expert-1 .. expert-N from make_experts.py. Steps:

1. reference: ``lowmem-merge merge`` of the experts with karcher at 512 MiB;
   the SHA-256 of every output file is kept.
2. cap: the same merge as a child inside a new memory cgroup of
   --cgroup-limit, with no --max-memory (the budget comes from the cgroup):
   limit, the cgroup's peak usage, OOM kills, and whether the output is
   bit-identical.
3. kills: the merge is started --kills times and SIGKILLed when its output
   has reached 1/(kills+1), 2/(kills+1), ... of its final size; each time it
   is resumed with --resume and its files are compared with the reference.
4. hostile inputs: the reader fuzz tests and the hostile-header tests run
   with --fuzz-examples examples per property.

Printed at the end as a markdown table: cap held (limit, peak), kills
survived (count and points), bad inputs tried, files lost or corrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT_DIR / "tests"))

from memory_cgroup import CgroupUnavailable, MemoryCgroup  # noqa: E402

from lowmem_merge.units import format_bytes, parse_size  # noqa: E402

FUZZ_PROPERTIES = 5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--cgroup-limit", default="768MiB")
    parser.add_argument("--fuzz-examples", type=int, default=5000)
    return parser.parse_args()


def digests(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    result = {}
    for file in files:
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            while block := handle.read(1 << 24):
                digest.update(block)
        result[file.name] = digest.hexdigest()
    return result


def merge_command(experts: list[Path], out: Path, *extra: str) -> list[str]:
    return [shutil.which("lowmem-merge") or "lowmem-merge", "merge", *map(str, experts),
            "-m", "karcher", "-o", str(out), "--quiet", *extra]


def staged_bytes(staging: Path) -> int:
    try:
        return sum(p.stat().st_size for p in staging.glob("*.safetensors"))
    except OSError:
        return 0


def kill_at(command: list[str], staging: Path, threshold: int) -> int:
    """Run, SIGKILL once the staged output reaches threshold bytes; the bytes staged then."""
    child = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    while child.poll() is None and staged_bytes(staging) < threshold:
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    return staged_bytes(staging)


def main() -> None:
    args = parse_args()
    experts = sorted(args.root.glob("expert-*"), key=lambda p: int(p.name.split("-")[1]))
    out = args.root / "survival-merged"
    staging = args.root / f".{out.name}.partial"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    subprocess.run(merge_command(experts, out, "--max-memory", "512MiB"), check=True)
    reference = digests(out)
    total = sum((out / name).stat().st_size for name in reference)
    shutil.rmtree(out)
    inputs = sum(f.stat().st_size for e in experts for f in e.glob("*.safetensors"))
    rows = []

    limit = parse_size(args.cgroup_limit, "--cgroup-limit")
    try:
        group = MemoryCgroup.create(limit)
    except CgroupUnavailable as reason:
        rows.append(("cap held", f"not measured: {reason}"))
    else:
        try:
            done = subprocess.run(merge_command(experts, out), preexec_fn=group.enter)
            same = done.returncode == 0 and digests(out) == reference
            rows.append(("cap held", f"limit {format_bytes(limit)}, inputs"
                         f" {format_bytes(inputs)}; cgroup peak"
                         f" {format_bytes(group.peak() or 0)} (page cache included),"
                         f" OOM kills {group.oom_kills()}, exit {done.returncode},"
                         f" output bit-identical: {same}"))
        finally:
            group.remove()
        shutil.rmtree(out, ignore_errors=True)

    lost, points = 0, []
    for k in range(1, args.kills + 1):
        staged = kill_at(merge_command(experts, out, "--max-memory", "512MiB"), staging,
                         total * k // (args.kills + 1))
        points.append(f"{staged / total:.0%}")
        subprocess.run(merge_command(experts, out, "--max-memory", "512MiB", "--resume"),
                       check=True)
        lost += digests(out) != reference
        shutil.rmtree(out)
    rows.append(("kills survived", f"{args.kills - lost} of {args.kills}, SIGKILL at"
                 f" {', '.join(points)} of the output written"))

    env = {**os.environ, "LOWMEM_FUZZ_EXAMPLES": str(args.fuzz_examples)}
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            str(ROOT_DIR / "tests" / "test_fuzz_readers.py"),
                            str(ROOT_DIR / "tests" / "test_gguf_files.py"),
                            str(ROOT_DIR / "tests" / "test_inputs.py")],
                           env=env, capture_output=True, text=True)
    tried = tests.stdout.count(".")
    summary = f"all {tried} tests passed" if tests.returncode == 0 else \
        (tests.stdout.strip().splitlines() or [tests.stderr])[-1]
    rows.append(("bad inputs tried", f"{FUZZ_PROPERTIES * args.fuzz_examples} fuzzed files"
                 f" and indexes plus the hostile-file tests: {summary}"))
    rows.append(("files lost or corrupted", str(lost)))
    print("\n| check | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
