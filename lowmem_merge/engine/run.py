"""Run a merge job: open inputs, plan tensors, stream them through the pipeline."""

from __future__ import annotations

import time
from dataclasses import replace

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import MergeError
from ..io import check_output_path, open_model
from ..kernels.gguf_quants import dequantize_into, quantize_into
from ..methods import Chunk, MergeMethod, OutChunk
from .budget import chunk_elements, current_rss, default_max_memory, peak_rss
from .job import MergeJob, MergeReport, ParamResolver
from .naming import filter_names, present
from .output_formats import output_format
from .pipeline import Loaded, Pipeline, bytes_per_element
from .progress import Progress
from .tensors import (
    OutputType,
    TensorTask,
    assign_chunks,
    layer_count,
    plan_slices,
    plan_tensors,
)
from .values import ENCODINGS, STORAGE, decode_working_bytes


def run_merge(job: MergeJob) -> MergeReport:
    started = time.perf_counter()
    if job.threads:
        numba.set_num_threads(min(job.threads, numba.config.NUMBA_NUM_THREADS))
    opened = {ref: open_model(ref) for ref in _references(job)}
    check_output_path(job.output, [t.path for m in opened.values() for t in m.tensors.values()],
                      [m.folder for m in opened.values() if m.is_folder], job.force)
    output = output_format(job, opened)
    models = {ref: present(model, output.naming) for ref, model in opened.items()}
    output.set_shape(*_output_shape(job, models))
    filter_name = filter_names(list(opened.values()), output.naming)

    def resolve(name: str, position: float, slice_index: int | None):
        return job.resolve_params(filter_name(name), position, slice_index)
    tasks, layers = _plan(job, models, resolve, output.output_type)
    n_experts = max((len(t.experts) for t in tasks), default=1)
    _warm_kernels(job.method, tasks)
    _warm_codecs(tasks)
    max_memory = job.max_memory or default_max_memory()
    chunk = _size_chunks(job, tasks, n_experts, max_memory)
    try:
        writer = output.open_writer(tasks)
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
        output.commit(tasks, layers)
    except BaseException:
        output.abort()
        raise
    return MergeReport(
        method=job.method.name, output=job.output, experts=n_experts,
        tensors_merged=sum(t.merge is not None for t in tasks),
        tensors_copied=sum(t.merge is None for t in tasks),
        bytes_read=bytes_read, bytes_written=sum(t.output.nbytes for t in tasks),
        seconds=time.perf_counter() - started, peak_rss=peak_rss(), max_memory=max_memory,
        chunk_elements=chunk, streamed_tensors=sum(t.numel > t.chunk for t in tasks))


def _plan(job: MergeJob, models: dict, resolve: ParamResolver, output_type: OutputType
          ) -> tuple[list[TensorTask], int | None]:
    """The output tensors, and the number of output layers of a frankenmerge."""
    if job.slices:
        return plan_slices(models, job.slices, job.method, resolve, output_type)
    tasks = plan_tensors([models[r] for r in job.experts],
                         models[job.base] if job.base else None, job.method, resolve,
                         output_type)
    return tasks, None


def _output_shape(job: MergeJob, models: dict) -> tuple[int, bool]:
    """The output's layer count, and whether it lacks a separate output matrix (tied)."""
    first = models[job.slices[0].sources[0].model if job.slices else job.experts[0]]
    tied = not {"output.weight", "lm_head.weight"} & set(first.tensors)
    if job.slices:
        return sum(p.sources[0].end - p.sources[0].start for p in job.slices), tied
    return layer_count(list(first.tensors)), tied


def _size_chunks(job: MergeJob, tasks: list[TensorTask], n_experts: int,
                 max_memory: int) -> int:
    """The budget's chunk size; each task's own chunk is set from it."""
    element_bytes = bytes_per_element(tasks, n_experts)
    working = max((t.merge.working_bytes for t in tasks if t.merge is not None), default=0)
    working += decode_working_bytes([info for t in tasks if t.merge is not None
                                     for info in t.experts + ([t.base] if t.base else [])])
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
        encoding, base_encoding = task.stack_encoding, task.base_encoding
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


def _warm_codecs(tasks: list[TensorTask]) -> None:
    """Compile the GGUF block decoders and encoders this merge uses, on one zero block."""
    block_types = {(t.dtype, t.block_elements, t.bytes_per_block)
                   for task in tasks if task.merge is not None
                   for t in task.experts + ([task.base] if task.base else [])
                   if t.dtype not in ENCODINGS}
    for dtype, elements, size in block_types:
        dequantize_into(np.zeros(size, np.uint8), GGMLQuantizationType[dtype],
                        np.empty(elements, np.float32))
    for dtype in {t.output.dtype for t in tasks if t.merge is not None} - set(ENCODINGS):
        elements, size = GGML_QUANT_SIZES[GGMLQuantizationType[dtype]]
        quantize_into(np.zeros(elements, np.float32), GGMLQuantizationType[dtype],
                      np.empty(size, np.uint8))


def _references(job: MergeJob) -> list[str]:
    """Every model the job reads, each once, in first-use order."""
    refs = list(job.experts) + ([job.base] if job.base else [])
    for piece in job.slices or ():
        refs += [s.model for s in piece.sources] + ([piece.base.model] if piece.base else [])
    if job.companions_from:
        refs.append(job.companions_from)
    return list(dict.fromkeys(refs))
