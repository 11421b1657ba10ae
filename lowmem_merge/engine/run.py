"""Run a merge job: open inputs, plan tensors, stream them through the pipeline."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numba
import numpy as np

from .. import __version__, kernels
from ..errors import MergeError
from ..io import OutputFolder, ShardedSafetensorsWriter, check_output_path, open_model
from ..methods import Chunk, MergeMethod, OutChunk
from .budget import chunk_elements, current_rss, default_max_memory, peak_rss
from .job import MergeJob, MergeReport
from .pipeline import Loaded, Pipeline, bytes_per_element
from .progress import Progress
from .tensors import (
    ENCODINGS,
    STORAGE,
    TensorTask,
    assign_chunks,
    plan_slices,
    plan_tensors,
)

TORCH_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def run_merge(job: MergeJob) -> MergeReport:
    started = time.perf_counter()
    if job.threads:
        numba.set_num_threads(min(job.threads, numba.config.NUMBA_NUM_THREADS))
    models = {ref: open_model(ref) for ref in _references(job)}
    inputs = list(models.values())
    check_output_path(job.output, [t.path for m in inputs for t in m.tensors.values()],
                      [m.folder for m in inputs if m.is_folder], job.force)
    tasks, layers = _plan(job, models)
    n_experts = max((len(t.experts) for t in tasks), default=1)
    _warm_kernels(job.method, tasks)
    max_memory = job.max_memory or default_max_memory()
    chunk = _size_chunks(job, tasks, n_experts, max_memory)
    folder = OutputFolder(job.output)
    try:
        writer = ShardedSafetensorsWriter(folder.staging, [t.output for t in tasks],
                                          job.shard_size, _provenance(job))
        progress = Progress(tasks, enabled=job.progress)
        bytes_read = 0

        def on_progress(loaded: Loaded) -> None:
            nonlocal bytes_read
            bytes_read += loaded.bytes_read
            progress.advance(loaded)

        try:
            Pipeline(tasks, chunk, n_experts, writer, on_progress).run()
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        finally:
            progress.close()
        _copy_companions(models[job.companions_from or job.base or job.experts[0]],
                         folder.staging, tasks, layers)
        folder.commit()
    except BaseException:
        folder.abort()
        raise
    return MergeReport(
        method=job.method.name, output=job.output, experts=n_experts,
        tensors_merged=sum(t.merge is not None for t in tasks),
        tensors_copied=sum(t.merge is None for t in tasks),
        bytes_read=bytes_read, bytes_written=sum(t.output.nbytes for t in tasks),
        seconds=time.perf_counter() - started, peak_rss=peak_rss(), max_memory=max_memory,
        chunk_elements=chunk, streamed_tensors=sum(t.numel > t.chunk for t in tasks))


def _plan(job: MergeJob, models: dict) -> tuple[list[TensorTask], int | None]:
    """The output tensors, and the number of output layers of a frankenmerge."""
    if job.slices:
        return plan_slices(models, job.slices, job.method, job.resolve_params, job.out_dtype)
    tasks = plan_tensors([models[r] for r in job.experts],
                         models[job.base] if job.base else None, job.method,
                         job.resolve_params, job.out_dtype)
    return tasks, None


def _size_chunks(job: MergeJob, tasks: list[TensorTask], n_experts: int,
                 max_memory: int) -> int:
    """The budget's chunk size; each task's own chunk is set from it."""
    element_bytes = bytes_per_element(tasks, n_experts)
    working = max((t.merge.working_bytes for t in tasks if t.merge is not None), default=0)
    chunk = job.chunk_elements or _chunk_for(max_memory, working, element_bytes)
    spare = max(max_memory - current_rss() - chunk * element_bytes, 0)
    assign_chunks(tasks, chunk, element_bytes, spare)
    return chunk


def _chunk_for(max_memory: int, working: int, element_bytes: int) -> int:
    """Chunk elements leaving room for the largest working memory of a method, if it fits;
    otherwise the plain chunk, and assign_chunks names the tensor that does not fit."""
    try:
        return chunk_elements(max_memory - working, element_bytes)
    except MergeError:
        if not working:
            raise
        return chunk_elements(max_memory, element_bytes)


WARM_UP_SHAPE = (4, 64)


def _warm_kernels(method: MergeMethod, tasks: list[TensorTask]) -> None:
    """Compile (or load from cache) every kernel variant before memory is measured.

    Each kind of tensor merge runs once, whole, on a small zero tensor with the
    same parameters, dtypes and number of experts.
    """
    seen = set()
    for task in tasks:
        if task.merge is None:
            continue
        encodings = {ENCODINGS[t.dtype] for t in task.experts}
        encoding = encodings.pop() if len(encodings) == 1 else kernels.F32
        base_encoding = ENCODINGS[task.base.dtype] if task.base is not None else kernels.F32
        key = (type(task.merge), task.merge.stat_passes, task.merge.uses_base, encoding,
               base_encoding, task.out_encoding, len(task.experts))
        if key in seen:
            continue
        seen.add(key)
        merge = method.for_tensor(replace(task.context, shape=WARM_UP_SHAPE))
        size = int(np.prod(WARM_UP_SHAPE))
        stack = np.zeros((len(task.experts), size), STORAGE[encoding])
        base = np.zeros(size, STORAGE[base_encoding]) if merge.uses_base else None
        chunk = Chunk(stack, encoding, base, base_encoding, 0)
        for pass_index in range(merge.stat_passes):
            merge.observe(pass_index, chunk)
            merge.end_pass(pass_index)
        merge.apply(chunk, OutChunk(np.zeros(size, STORAGE[task.out_encoding]),
                                    task.out_encoding))


def _provenance(job: MergeJob) -> dict[str, str]:
    return {"format": "pt", "merged_by": f"lowmem-merge {__version__}",
            "merge_method": job.method.name,
            "merge_inputs": json.dumps({"experts": job.experts, "base": job.base})}


def _references(job: MergeJob) -> list[str]:
    """Every model the job reads, each once, in first-use order."""
    refs = list(job.experts) + ([job.base] if job.base else [])
    for piece in job.slices or ():
        refs += [s.model for s in piece.sources] + ([piece.base.model] if piece.base else [])
    if job.companions_from:
        refs.append(job.companions_from)
    return list(dict.fromkeys(refs))


def _copy_companions(source, folder: Path, tasks: list[TensorTask], layers: int | None) -> None:
    """Config and tokenizer files of one input; the config's dtype and depth updated."""
    for path in source.companion_files():
        shutil.copyfile(path, folder / path.name)
    config_path = folder / "config.json"
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text())
    dtypes = {t.output.dtype for t in tasks if t.merge is not None}
    if len(dtypes) == 1:
        name = TORCH_DTYPE_NAMES[dtypes.pop()]
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = name
    if layers is not None and "num_hidden_layers" in config:
        config["num_hidden_layers"] = layers
    config_path.write_text(json.dumps(config, indent=2) + "\n")
