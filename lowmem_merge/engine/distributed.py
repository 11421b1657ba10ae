"""One merge spread over a Ray cluster: a task per output file, the driver finalises.

Each task rebuilds the plan from the job on its own node (opening the inputs there: a shared
path or that node's hub cache), checks that it plans the very same files as the driver,
merges the tensors of its one file into a temporary name in the staging folder (which
every node must reach at the same path), syncs it and renames it into place. Only the
file's name, size and SHA-256 travel back through Ray, never tensor data. The driver
journals each finished file, so --resume never redoes one, then checks every file, writes
the index and commits the output atomically, as a local run does. Both runs write the same
planned files through the same pipeline, so the bytes are the same.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import numba
from tqdm import tqdm

from ..errors import MergeError, TaskFailed
from ..io.journal import FileJournal
from ..io.output_folder import fsync_path
from ..io.sequential_files import PlannedFile, SequentialFileWriter
from .job import MergeJob
from .pipeline import Loaded, Pipeline
from .run import MergePlan, Written, plan_fingerprint, plan_merge, size_merge
from .tensors import TensorTask

log = logging.getLogger(__name__)
EXTRA = "pip install 'lowmem-merge[ray]'"
TEMPORARY_PREFIX = ".task-"
# Ray retries a task whose worker process or node died this many times.
TASK_RETRIES = 3


def produce_on_ray(job: MergeJob, plan: MergePlan, writer: SequentialFileWriter,
                   written: Written) -> tuple[list[TensorTask], int]:
    """Write every file the journal has not recorded, one Ray task each; then the index.

    Returns (the tasks of files finished before --resume, bytes the tasks read)."""
    ray = import_ray()
    staging = plan.output.staging
    journal = FileJournal(staging, plan_fingerprint(writer.files, plan.tasks), job.resume)
    try:
        _remove_temporaries(staging)
        finished = _finished_files(journal, staging, writer.files)
        resumed = [task for planned, tasks in _tasks_by_file(writer.files, plan.tasks)
                   if planned.name in finished for task in tasks]
        written.tensors = len(resumed)
        pending = [i for i, f in enumerate(writer.files) if f.name not in finished]
        bytes_read = 0
        if pending:
            connect(ray, job)
            bytes_read = _run_tasks(ray, job, writer.files, pending, staging, journal, written)
            _remove_temporaries(staging)  # left by workers that died mid-task
        writer.write_index()
        return resumed, bytes_read
    finally:
        journal.close()


def _tasks_by_file(files: list[PlannedFile], tasks: list[TensorTask]
                   ) -> list[tuple[PlannedFile, list[TensorTask]]]:
    """Each planned file with its tasks (files hold consecutive tasks, in plan order)."""
    grouped, first = [], 0
    for planned in files:
        grouped.append((planned, tasks[first:first + len(planned.sizes)]))
        first += len(planned.sizes)
    return grouped


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MergeError(f"--executor ray needs Ray, which is not installed: {EXTRA}") from None
    return ray


def connect(ray: Any, job: MergeJob) -> None:
    """Join the cluster at --ray-address, or start a local Ray with --threads CPUs."""
    if ray.is_initialized():
        return
    try:
        if job.ray_address:
            ray.init(address=job.ray_address, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=job.threads or os.cpu_count(), include_dashboard=False,
                     logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        # TaskFailed: with --resume, the files finished before are kept for the next try.
        where = job.ray_address or "a local Ray"
        raise TaskFailed(f"--executor ray: cannot start or reach {where}: {exc}") from None


def _finished_files(journal: FileJournal, staging: Path,
                    files: list[PlannedFile]) -> set[str]:
    """Files the journal lists that are still there at their recorded size."""
    finished = set()
    for planned in files:
        entry = journal.done.get(planned.name)
        path = staging / planned.name
        if entry and path.is_file() and path.stat().st_size == entry["bytes"]:
            finished.add(planned.name)
    return finished


def _remove_temporaries(staging: Path) -> None:
    """Partial files of tasks that died (their retries wrote under new names)."""
    for path in staging.glob(TEMPORARY_PREFIX + "*"):
        path.unlink(missing_ok=True)


def _run_tasks(ray: Any, job: MergeJob, files: list[PlannedFile], pending: list[int],
               staging: Path, journal: FileJournal, written: Written) -> int:
    resources = {"memory": job.max_memory} if job.max_memory else {}
    if job.device == "cuda":
        resources["num_gpus"] = 1
    remote = ray.remote(merge_file).options(num_cpus=job.ray_task_cpus, max_retries=TASK_RETRIES,
                                            retry_exceptions=False, **resources)
    digest = output_plan_digest(files)
    task_job = replace(job, executor="local", threads=job.ray_task_cpus, progress=False,
                       resume=False)
    running = {remote.remote(task_job, index, str(staging), digest): index for index in pending}
    bytes_read = 0
    bar = tqdm(total=len(files), initial=len(files) - len(pending), unit="file",
               desc="merging on Ray", dynamic_ncols=True, leave=False, disable=not job.progress)
    try:
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            index = running.pop(ready[0])
            entry = _result(ray, ready[0], files[index].name)
            journal.record(entry)
            written.tensors += entry["tensors"]
            bytes_read += entry["bytes_read"]
            bar.update(1)
            log.info("%s: written by a Ray task on %s (%d of %d files left)", entry["file"],
                     entry["node"], len(running), len(files))
    finally:
        bar.close()
        for ref in running:
            ray.cancel(ref, force=True)
    return bytes_read


def _result(ray: Any, ref: Any, name: str) -> dict:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, Exception) else exc
        raise TaskFailed(f"the Ray task writing {name} failed: {cause}") from None
    except ray.exceptions.RayError as exc:
        raise TaskFailed(f"the Ray task writing {name} was lost ({type(exc).__name__}:"
                         f" {exc})") from None


def output_plan_digest(files: list[PlannedFile]) -> str:
    """What every node must plan alike: the files' names, headers and tensor sizes."""
    digest = hashlib.sha256()
    for planned in files:
        digest.update(planned.name.encode() + b"\0" + planned.header
                      + repr((planned.sizes, planned.alignment)).encode())
    return digest.hexdigest()


def merge_file(job: MergeJob, index: int, staging: str, digest: str) -> dict:
    """A Ray task: merge the tensors of output file ``index`` into the staging folder."""
    numba.set_num_threads(min(job.threads or 1, numba.config.NUMBA_NUM_THREADS))
    plan = plan_merge(job)
    folder = Path(staging)
    files = plan.output.planned_writer(plan.tasks, folder).files
    if output_plan_digest(files) != digest:
        raise MergeError(f"node {socket.gethostname()} plans a different output from the same"
                         " job: its inputs differ from the driver's")
    sizing = size_merge(job, plan)
    planned, tasks = _tasks_by_file(files, plan.tasks)[index]
    temporary = replace(planned, name=f"{TEMPORARY_PREFIX}{uuid.uuid4().hex}-{planned.name}")
    digest = hashlib.sha256()  # of the bytes as written: no second read of the file
    file_writer = SequentialFileWriter(folder, [temporary], digest)
    bytes_read = 0

    def on_progress(loaded: Loaded) -> None:
        nonlocal bytes_read
        bytes_read += loaded.bytes_read

    try:
        file_writer.start(0, None, job.checkpoint_bytes, sizing.window)
        Pipeline(tasks, sizing.chunk, plan.n_experts, file_writer, on_progress, job.nan_policy,
                 plan.devices).run()
        file_writer.finish()
        file_writer.check_sizes()
    except BaseException:
        file_writer.abort()
        (folder / temporary.name).unlink(missing_ok=True)
        raise
    size = (folder / temporary.name).stat().st_size
    os.replace(folder / temporary.name, folder / planned.name)
    fsync_path(folder)
    return {"file": planned.name, "bytes": size, "sha256": digest.hexdigest(),
            "tensors": len(tasks),
            "bytes_read": bytes_read, "node": socket.gethostname()}

