"""A merge survives SIGKILL, Ctrl-C and a full disk, and resumes to identical bytes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lowmem_merge import merge
from lowmem_merge.errors import MergeError
from lowmem_merge.io.output_folder import OutputFolder
from lowmem_merge.synthetic import LlamaShape, write_experts

SHAPE = LlamaShape(hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=2, vocab_size=1000)
TENSORS = 39
CHUNK = 65536


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("survival")
    _, paths = write_experts(root, SHAPE, 2, dtype="F32", spread=1.0)
    merge(paths, "karcher", root / "reference" / "merged", chunk_elements=CHUNK)
    merge(paths, "karcher", root / "reference" / "merged.gguf", dtype="q8_0",
          chunk_elements=CHUNK)
    return root, paths


def merge_script(paths, out: Path, resume: bool = False) -> str:
    return textwrap.dedent(f"""
        from lowmem_merge import merge
        merge({[str(p) for p in paths]!r}, "karcher", {str(out)!r}, chunk_elements={CHUNK},
              checkpoint_bytes=1, resume={resume}, dtype={"q8_0" if out.suffix else None!r})
        """)


def journal_lines(staging: Path) -> int:
    try:
        return len((staging / "journal.jsonl").read_text().splitlines()) - 1
    except (FileNotFoundError, ValueError):
        return -1


def staged_size(staging: Path) -> int:
    try:
        return sum(f.stat().st_size for f in staging.glob("*.safetensors"))
    except FileNotFoundError:  # renamed into place at that moment
        return 0


def run_until(script: str, staging: Path, checkpoints: int, sig: int,
              timeout: float = 120, staged_bytes: int = 0) -> subprocess.Popen:
    """Start a merge in a child process and signal it once the journal has that many
    checkpoints (-1: as soon as its staging folder exists) and its output file holds
    staged_bytes."""
    child = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        if staging.is_dir() and journal_lines(staging) >= checkpoints \
                and staged_size(staging) >= staged_bytes:
            child.send_signal(sig)
            break
        time.sleep(0.001)
    child.wait(timeout)
    return child


def files_of(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("output", ["merged", "merged.gguf"])
@pytest.mark.parametrize("checkpoints", [-1, 1, 9, 30])
def test_sigkill_at_any_point_then_resume_is_bit_identical(experts, tmp_path, output,
                                                           checkpoints):
    root, paths = experts
    out = tmp_path / output
    staging = tmp_path / f".{output}.partial"
    child = run_until(merge_script(paths, out), staging, checkpoints, signal.SIGKILL)
    if child.returncode == 0:
        pytest.fail("the merge finished before it could be killed")
    assert child.returncode == -signal.SIGKILL
    assert not out.exists()  # nothing that looks finished
    saved = max(journal_lines(staging), 0)
    assert saved >= max(checkpoints, 0)
    report = merge(paths, "karcher", out, chunk_elements=CHUNK, resume=True,
                   dtype="q8_0" if out.suffix else None)
    assert report.tensors_resumed == saved
    assert report.tensors_merged == TENSORS - saved
    assert files_of(out) == files_of(root / "reference" / output)
    assert not staging.exists()


def test_ctrl_c_keeps_the_work_and_says_how_to_resume(experts, tmp_path):
    root, paths = experts
    out = tmp_path / "merged"
    script = textwrap.dedent(f"""
        import sys
        from lowmem_merge_cli.main import main
        sys.argv = ["lowmem-merge", "merge", *{[str(p) for p in paths]!r}, "-o", {str(out)!r},
                    "-m", "karcher", "--max-memory", "300MiB"]
        main()
        """)
    staging = tmp_path / ".merged.partial"
    # Its checkpoints come every 256 MiB: stop it by the bytes it has written instead.
    child = run_until(script, staging, -1, signal.SIGINT, staged_bytes=1 << 20)
    message = child.stderr.read().decode()
    assert child.returncode == 130, message
    assert "--resume" in message and str(staging) in message
    assert not out.exists() and staging.is_dir()
    merge(paths, "karcher", out, resume=True)
    assert files_of(out) == files_of(root / "reference" / "merged")


def test_resume_refuses_a_different_plan(experts, tmp_path):
    _, paths = experts
    out = tmp_path / "merged"
    run_until(merge_script(paths, out), tmp_path / ".merged.partial", 3, signal.SIGKILL)
    with pytest.raises(MergeError, match="different plan"):
        merge(paths, "karcher", out, weights=[0.2, 0.8], resume=True)
    merge(paths, "karcher", out, weights=[0.2, 0.8])  # without --resume: starts over
    assert out.is_dir() and not (tmp_path / ".merged.partial").exists()


def test_a_second_merge_into_the_same_output_is_refused(experts, tmp_path):
    _, paths = experts
    holder = OutputFolder(tmp_path / "merged")
    try:
        with pytest.raises(MergeError, match="another lowmem-merge"):
            merge(paths, "karcher", tmp_path / "merged", resume=True)
    finally:
        holder.abort()


def test_journal_longer_than_the_file_is_refused(experts, tmp_path):
    _, paths = experts
    out = tmp_path / "merged"
    staging = tmp_path / ".merged.partial"
    run_until(merge_script(paths, out), staging, 9, signal.SIGKILL)
    shard = staging / "model.safetensors"
    with open(shard, "r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(MergeError, match="shorter than its journal"):
        merge(paths, "karcher", out, chunk_elements=CHUNK, resume=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (needs root and mount(2); skipped where that is not allowed)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_full_disk_is_one_clear_error_and_nothing_looks_finished(experts, small_disk):
    _, paths = experts
    out = small_disk / "merged"
    with pytest.raises(MergeError) as caught:
        merge(paths, "karcher", out, chunk_elements=CHUNK)
    message = str(caught.value)
    assert "No space left on device" in message and "--resume" in message
    assert not out.exists()
    assert [p.name for p in small_disk.iterdir()] == [".merged.partial"]
    assert json.loads((small_disk / ".merged.partial" / "journal.jsonl").read_text()
                      .splitlines()[0])["fingerprint"]


LIMIT = 384 * 1024**2


def test_merge_under_a_real_cgroup_memory_limit_is_bit_identical(tmp_path):
    """Inputs 2.5 times the limit; the budget comes from the cgroup (no --max-memory)."""
    from memory_cgroup import CgroupUnavailable, MemoryCgroup

    try:
        group = MemoryCgroup.create(LIMIT)
    except CgroupUnavailable as reason:
        pytest.skip(f"cannot create a memory cgroup here: {reason}")
    try:
        shape = LlamaShape(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                           num_attention_heads=8, num_key_value_heads=2, vocab_size=8000)
        _, paths = write_experts(tmp_path / "in", shape, 3, dtype="F32")
        inputs = sum(f.stat().st_size for p in paths for f in p.glob("*.safetensors"))
        assert inputs > 2.5 * LIMIT
        merge(paths, "karcher", tmp_path / "reference")
        child = subprocess.run(
            [sys.executable, "-m", "lowmem_merge_cli.main", "merge", *map(str, paths), "-o",
             str(tmp_path / "capped")], preexec_fn=group.enter, capture_output=True,
            timeout=600)
        output = child.stdout.decode() + child.stderr.decode()
        assert child.returncode == 0, output
        assert group.oom_kills() == 0
        assert "(budget 307.2 MiB" in output  # 80% of the cgroup's limit
        assert files_of(tmp_path / "capped") == files_of(tmp_path / "reference")
        peak = group.peak()
        assert peak is None or peak <= LIMIT
    finally:
        group.remove()


def test_a_journal_torn_while_being_created_means_start_over(experts, tmp_path):
    root, paths = experts
    out = tmp_path / "merged"
    staging = tmp_path / ".merged.partial"
    staging.mkdir()
    (staging / "journal.jsonl").write_text('{"fingerpr')  # killed mid-write
    report = merge(paths, "karcher", out, chunk_elements=CHUNK, resume=True)
    assert report.tensors_resumed == 0
    assert files_of(out) == files_of(root / "reference" / "merged")
