"""One merge over Ray: the same bytes as a local run, through a killed worker and a
killed driver. Runs on a local Ray instance with two worker CPUs."""

from __future__ import annotations

import filecmp
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import lowmem_merge
from lowmem_merge.errors import MergeError
from lowmem_merge.synthetic import LlamaShape, write_experts

# Imported only when these tests run: Ray is heavy, and other tests measure this process.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="ray is not installed (the ray or test extra)")

SHAPE = LlamaShape(hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)
SHARD = "250KB"  # about ten output files


@pytest.fixture(scope="module")
def cluster():
    import ray

    context = ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    base, experts = write_experts(root, SHAPE, 3, seed=4)
    return base, experts


def _same_folders(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert len([n for n in names if n.endswith(".safetensors")]) > 4
    for name in names:
        assert filecmp.cmp(a / name, b / name, shallow=False), name


@pytest.mark.parametrize("method,params", [("karcher", {}), ("ties", {"density": 0.4}),
                                           ("dare_ties", {"density": 0.5, "seed": 9})])
def test_ray_output_equals_local(cluster, models, tmp_path, method, params):
    base, experts = models
    lowmem_merge.merge(experts, method, tmp_path / "local", base=base, shard_size=SHARD,
                       **params)
    report = lowmem_merge.merge(experts, method, tmp_path / "ray", base=base,
                                shard_size=SHARD, executor="ray", **params)
    _same_folders(tmp_path / "local", tmp_path / "ray")
    assert report.tensors_merged == len(SHAPE.tensors())
    assert report.bytes_read > 0


def _holders(path: Path) -> list[int]:
    """Processes (not this one) with ``path`` open."""
    pids = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == str(path) for fd in fd_dir.iterdir()):
                pids.append(int(fd_dir.parent.name))
        except OSError:
            continue
    return [pid for pid in pids if pid != os.getpid()]


def test_a_worker_killed_mid_task_is_retried_and_the_output_is_identical(cluster, models,
                                                                         tmp_path):
    base, experts = models
    lowmem_merge.merge(experts, "karcher", tmp_path / "local", base=base, shard_size=SHARD)
    staging = tmp_path / ".ray.partial"
    killed: list[int] = []
    done = threading.Event()

    def kill_first_writer() -> None:
        while not done.is_set() and not killed:
            for partial in staging.glob(".task-*"):
                for pid in _holders(partial.resolve()):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.001)

    watcher = threading.Thread(target=kill_first_writer)
    watcher.start()
    try:
        lowmem_merge.merge(experts, "karcher", tmp_path / "ray", base=base, shard_size=SHARD,
                           executor="ray")
    finally:
        done.set()
        watcher.join()
    assert killed, "no Ray worker was caught writing"
    _same_folders(tmp_path / "local", tmp_path / "ray")


def _driver(models, out: Path, address: str, *extra: str) -> subprocess.Popen:
    base, experts = models
    command = [sys.executable, "-m", "lowmem_merge_cli.main", "merge", *map(str, experts),
               "--base", str(base), "-m", "karcher", "-o", str(out), "--shard-size", SHARD,
               "--executor", "ray", "--ray-address", address, *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _journal(staging: Path) -> dict[str, dict]:
    try:
        lines = (staging / "files-journal.jsonl").read_text().splitlines()[1:]
    except FileNotFoundError:
        return {}
    entries = [json.loads(line) for line in lines if line.endswith("}")]
    return {entry["file"]: entry for entry in entries}


def test_resume_after_the_driver_is_killed_redoes_only_unfinished_files(cluster, models,
                                                                        tmp_path):
    base, experts = models
    lowmem_merge.merge(experts, "karcher", tmp_path / "local", base=base, shard_size=SHARD)
    out, staging = tmp_path / "ray", tmp_path / ".ray.partial"
    driver = _driver(models, out, cluster, "--quiet")
    deadline = time.monotonic() + 240
    while len(_journal(staging)) < 2 and driver.poll() is None:
        assert time.monotonic() < deadline, "the driver recorded no file in time"
        time.sleep(0.01)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    finished = _journal(staging)
    for name, entry in finished.items():  # what the tasks reported is what is on disk
        data = (staging / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["bytes"],
                                                                  entry["sha256"]), name
    shards = len(list((tmp_path / "local").glob("*.safetensors")))
    assert 2 <= len(finished) < shards, "the driver was not killed between files"
    before = {name: (staging / name).stat() for name in finished}
    time.sleep(2)  # tasks of the dead driver are cancelled by Ray; give them time to stop
    resumed = _driver(models, out, cluster, "--resume")
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    kept = sum(entry["tensors"] for entry in finished.values())
    assert f"{kept} done before --resume" in stdout
    assert f"{len(SHAPE.tensors()) - kept} merged" in stdout
    _same_folders(tmp_path / "local", out)
    for name, stat in before.items():
        after = (out / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), name


def test_ray_options_are_checked(models, tmp_path):
    base, experts = models
    with pytest.raises(MergeError, match="--ray-address and --ray-task-cpus need --executor"):
        lowmem_merge.merge(experts, "linear", tmp_path / "out", ray_address="auto")
    with pytest.raises(MergeError, match="--executor 'spark'"):
        lowmem_merge.merge(experts, "linear", tmp_path / "out", executor="spark")


def test_missing_ray_names_the_extra(models, tmp_path, monkeypatch):
    from lowmem_merge.config import plan

    base, experts = models
    monkeypatch.setattr(plan.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MergeError, match=r"pip install 'lowmem-merge\[ray\]'"):
        lowmem_merge.merge(experts, "linear", tmp_path / "out", executor="ray")
    assert not (tmp_path / "out").exists()
