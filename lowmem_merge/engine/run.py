"""Run a merge job: open inputs, plan tensors, stream them through the pipeline."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .. import __version__
from ..errors import Interrupted, MergeError, TaskFailed
from ..io import Model, check_output_path, open_model
from ..io.gguf_mixes import is_70b
from ..io.journal import Journal
from ..io.writeback import window_for
from ..kernels.gguf_quants import dequantize_into, quantize_into
from ..methods import Chunk, MergeMethod, OutChunk
from .budget import (
    CHUNK_ALIGN,
    RESERVE_BYTES,
    chunk_elements,
    current_rss,
    default_budget,
    peak_rss,
)
from .devices import CPU_ONLY, DevicePlan, plan_devices
from .job import MergeJob, MergeReport, ParamResolver
from .naming import filter_names, model_name_map, present
from .output_formats import OutputFormat, output_format
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


@dataclass
class MergePlan:
    """Everything decided before any data moves."""

    models: dict[str, Model]
    output: OutputFormat
    tasks: list[TensorTask]
    layers: int | None  # output layers of a frankenmerge
    n_experts: int
    devices: DevicePlan = CPU_ONLY


def plan_merge(job: MergeJob) -> MergePlan:
    """Open the inputs, check the output path, and plan every output tensor."""
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
    # Before sizing: a CUDA context adds to the process the budget is measured against.
    devices = plan_devices(tasks, job.device, job.max_gpu_memory)
    return MergePlan(opened, output, tasks, layers, n_experts, devices)


def run_merge(job: MergeJob) -> MergeReport:
    started = time.perf_counter()
    if job.threads:
        numba.set_num_threads(min(job.threads, numba.config.NUMBA_NUM_THREADS))
    plan = plan_merge(job)
    tasks = plan.tasks
    sizing = size_merge(job, plan)
    max_memory, chunk = sizing.max_memory, sizing.chunk
    resumed, bytes_read = _write_output(job, plan, sizing)
    done_before = {id(t) for t in resumed}
    fresh = [t for t in tasks if id(t) not in done_before]
    return MergeReport(
        method=job.method.name, output=job.output, experts=plan.n_experts,
        tensors_merged=sum(t.merge is not None for t in fresh),
        tensors_copied=sum(t.merge is None for t in fresh), tensors_resumed=len(resumed),
        bytes_read=bytes_read, bytes_written=sum(t.output.nbytes for t in fresh),
        seconds=time.perf_counter() - started, peak_rss=peak_rss(), max_memory=max_memory,
        chunk_elements=chunk, streamed_tensors=sum(t.numel > t.chunk for t in tasks),
        device=plan.devices.description,
        gpu_tensors=sum(t.device == "cuda" for t in fresh),
        gpu_bytes_copied=getattr(plan.devices.gpu, "copied_to_device", 0),
        executor=job.executor)


@dataclass
class Written:
    """How much of the output is durably on disk (for the message when a merge stops)."""

    tensors: int = 0


def _write_output(job: MergeJob, plan: MergePlan, sizing: Sizing
                  ) -> tuple[list[TensorTask], int]:
    """Produce the output's files (here, or on Ray), check them, then commit the output.

    Returns (the tasks found done by --resume, bytes read). An interruption, an I/O error
    (a full disk) or a failed distributed task keeps the work so far for --resume.
    """
    output, tasks = plan.output, plan.tasks
    writer, written = None, Written()
    try:
        writer = output.open_writer(tasks, job.resume)
        if job.executor == "ray":
            from .distributed import produce_on_ray
            resumed, bytes_read = produce_on_ray(job, plan, writer, written)
        else:
            resumed, bytes_read = _produce_here(job, plan, sizing, writer, written)
        writer.check_sizes()
        output.verify()
        output.commit(tasks, plan.layers)
        return resumed, bytes_read
    except (KeyboardInterrupt, OSError, TaskFailed) as exc:
        if writer is not None:
            writer.abort()
        if output.staged is None:  # nothing was made yet
            if isinstance(exc, (KeyboardInterrupt, TaskFailed)):
                raise
            raise MergeError(f"{exc.filename or job.output}: {exc.strerror or exc}") from None
        output.keep()
        kept = f"{written.tensors} of {len(tasks)} tensors are kept in {output.staging}"
        if isinstance(exc, KeyboardInterrupt):
            raise Interrupted(f"interrupted; {kept}: run the same command with --resume to"
                              " continue") from None
        cause = str(exc) if isinstance(exc, TaskFailed) \
            else f"{exc.filename or output.staging}: {exc.strerror or exc}"
        raise MergeError(f"{cause}; {kept}: fix this and run the same command with --resume,"
                         " or delete that folder") from None
    except BaseException:
        if writer is not None:
            writer.abort()
        output.abort()
        raise


def _produce_here(job: MergeJob, plan: MergePlan, sizing: Sizing, writer,
                  written: Written) -> tuple[list[TensorTask], int]:
    """Stream the tasks the journal has not recorded into the files, in this process."""
    tasks = plan.tasks
    journal = Journal(plan.output.staging, plan_fingerprint(writer.files, tasks), job.resume)
    written.tensors = resumed = journal.done

    def on_checkpoint(tensors: int) -> None:
        journal.record(tensors)
        written.tensors = tensors

    try:
        writer.start(resumed, on_checkpoint, job.checkpoint_bytes, sizing.window)
        return tasks[:resumed], _stream(job, tasks[resumed:], sizing.chunk, plan, writer)
    finally:
        journal.close()


def _stream(job: MergeJob, tasks: list[TensorTask], chunk: int, plan: MergePlan,
            writer) -> int:
    """Run the pipeline over tasks; the bytes read."""
    progress = Progress(tasks, enabled=job.progress)
    bytes_read = 0

    def on_progress(loaded: Loaded) -> None:
        nonlocal bytes_read
        bytes_read += loaded.bytes_read
        progress.advance(loaded)

    try:
        Pipeline(tasks, chunk, plan.n_experts, writer, on_progress, job.nan_policy,
                 plan.devices).run()
        writer.finish()
    finally:
        progress.close()
    return bytes_read


def plan_fingerprint(files, tasks: list[TensorTask]) -> str:
    """What determines the output's bytes: its headers, every task's inputs and parameters,
    and the input files' sizes and modification times."""
    digest = hashlib.sha256(__version__.encode())
    for planned in files:
        digest.update(planned.name.encode() + planned.header + repr(planned.sizes).encode())
    paths = set()
    for task in tasks:
        inputs = task.experts + ([task.base] if task.base else [])
        paths.update(info.path for info in inputs)
        context = task.context
        digest.update(repr((task.output, inputs, type(task.merge).__name__,
                            context.params if context else None,
                            context.model_params if context else None)).encode())
    for path in sorted(paths):
        stat = path.stat()
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _plan(job: MergeJob, models: dict, resolve: ParamResolver, output_type: OutputType
          ) -> tuple[list[TensorTask], int | None]:
    """The output tensors, and the number of output layers of a frankenmerge."""
    if job.slices:
        return plan_slices(models, job.slices, job.method, resolve, output_type)
    tasks = plan_tensors([models[r] for r in job.experts],
                         models[job.base] if job.base else None, job.method, resolve,
                         output_type)
    return tasks, None


def _output_shape(job: MergeJob, models: dict) -> tuple[int, bool, bool]:
    """The output's layer count, whether it lacks a separate output matrix (tied), and
    whether llama.cpp would call it a 70B (its type mixes treat those apart)."""
    first = models[job.slices[0].sources[0].model if job.slices else job.experts[0]]
    tied = not {"output.weight", "lm_head.weight"} & set(first.tensors)
    if job.slices:
        layers = sum(p.sources[0].end - p.sources[0].start for p in job.slices)
    else:
        layers = layer_count(list(first.tensors))
    try:
        names = model_name_map(first)
    except MergeError:
        return layers, tied, False
    return layers, tied, is_70b(names.architecture, layers, names.n_head, names.n_head_kv)


@dataclass
class Sizing:
    """The budget and what it buys: the chunk, and the memory the merge will hold."""

    max_memory: int
    budget_source: str
    chunk: int
    element_bytes: int  # buffer bytes per chunk element, both pools
    working: int  # methods' and decoders' memory beside the buffers
    rss: int  # the process with its kernels loaded, before any buffer
    window: int  # write-back window: the output keeps at most two dirty in the page cache

    @property
    def predicted_peak(self) -> int:
        """RSS plus the page cache the merge dirties."""
        return self.rss + RESERVE_BYTES + self.chunk * self.element_bytes + self.working \
            + 2 * self.window


def size_merge(job: MergeJob, plan: MergePlan) -> Sizing:
    """Load the kernels, then size chunks to what the budget leaves (sets each task's)."""
    tasks = plan.tasks
    _warm_kernels(job.method, tasks)
    _warm_codecs(tasks)
    max_memory, source = (job.max_memory, "--max-memory") if job.max_memory \
        else default_budget()
    element_bytes = bytes_per_element(tasks, plan.n_experts)
    working = max((t.merge.working_bytes for t in tasks if t.merge is not None), default=0)
    working += decode_working_bytes([info for t in tasks if t.merge is not None
                                     for info in t.experts + ([t.base] if t.base else [])])
    window = window_for(max_memory)
    dirty = 2 * window
    chunk = job.chunk_elements or _chunk_for(max_memory - dirty, working, element_bytes)
    # No buffer larger than the largest tensor needs.
    largest = max((t.numel for t in tasks), default=1)
    chunk = min(chunk, -(-largest // CHUNK_ALIGN) * CHUNK_ALIGN)
    spare = max(max_memory - dirty - current_rss() - chunk * element_bytes, 0)
    assign_chunks(tasks, chunk, element_bytes, spare)
    return Sizing(max_memory, source, chunk, element_bytes, working, current_rss(), window)


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
