"""Overlapped streaming: a reader thread, the kernels on the calling thread, a writer thread.

Memory is bounded by two pools of reused buffers: input chunks (all inputs'
values for one element range) and output chunks. The reader runs ahead by at
most the input pool, the writer lags by at most the output pool.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .. import kernels
from ..errors import MergeError
from ..io import RangeReader
from ..io.sequential_files import SequentialFileWriter
from ..kernels.dispatch import running_on
from ..methods import Chunk, OutChunk
from .devices import CPU_ONLY, DevicePlan
from .tensors import TensorTask
from .values import (
    ENCODINGS,
    STORAGE,
    encode_output,
    is_direct,
    raw_bytes_per_element,
    read_values,
)

log = logging.getLogger(__name__)
ALL_PASSES = -1
POOL_SIZE = 2


class _Stopped(Exception):
    """Another stage failed; this one stops quietly."""


@dataclass
class InputBuffers:
    stack: np.ndarray  # uint8, experts x chunk at the widest value width
    base: np.ndarray  # uint8, one chunk of the base
    scratch: np.ndarray  # uint8, one input chunk's raw bytes awaiting decoding
    spare: np.ndarray  # uint8, the same bytes put in row order (permuted q/k weights)


@dataclass
class OutputBuffers:
    values: np.ndarray  # uint8, one chunk of merged values
    encoded: np.ndarray  # uint8, the same chunk block-quantized (GGUF output)


@dataclass
class Loaded:
    task: TensorTask
    pass_index: int
    start: int
    count: int
    last: bool
    buffers: InputBuffers
    chunk: Chunk | None = None
    raw: memoryview | None = None
    bytes_read: int = 0


@dataclass
class BufferWidths:
    """Bytes per chunk element of each buffer, the widest over all tasks."""

    stack: float = 4
    base: float = 1
    scratch: float = 0
    spare: float = 0
    values: float = 4
    encoded: float = 0

    def per_element(self) -> float:
        return POOL_SIZE * (self.stack + self.base + self.scratch + self.spare + self.values
                            + self.encoded)


def _itemsize(encoding: int) -> int:
    return np.dtype(STORAGE[encoding]).itemsize


def buffer_widths(tasks: list[TensorTask], n_experts: int) -> BufferWidths:
    widths = BufferWidths()
    for task in tasks:
        if task.merge is None:
            continue
        encoding = task.stack_encoding
        widths.stack = max(widths.stack, n_experts * _itemsize(encoding))
        inputs = task.experts + ([task.base] if task.base is not None else [])
        if task.base is not None:
            widths.base = max(widths.base, _itemsize(task.base_encoding))
        for info in inputs:
            own = task.base_encoding if info is task.base else encoding
            if not is_direct(info, own):
                widths.scratch = max(widths.scratch, raw_bytes_per_element(info))
            if info.permute_heads:
                widths.spare = max(widths.spare, raw_bytes_per_element(info))
        widths.values = max(widths.values, _itemsize(task.out_encoding))
        if task.output.dtype not in ENCODINGS:
            widths.encoded = max(widths.encoded, task.output.nbytes / max(task.numel, 1))
    return widths


def bytes_per_element(tasks: list[TensorTask], n_experts: int) -> int:
    """Buffer bytes one chunk element costs across both pools."""
    return math.ceil(buffer_widths(tasks, n_experts).per_element())


class NonFiniteCheck:
    """NaN and Inf in the inputs: counted on each tensor's first read, then reported.

    "warn" logs one warning per input tensor that holds any; "error" stops the
    merge at the first one.
    """

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.counts: dict[tuple[str, str], int] = {}

    def check(self, loaded: Loaded) -> None:
        chunk, task = loaded.chunk, loaded.task
        rows = [(info, row, chunk.encoding) for info, row in zip(task.experts, chunk.experts)]
        if chunk.base is not None:
            rows.append((task.base, chunk.base, chunk.base_encoding))
        for info, row, encoding in rows:
            count = kernels.count_nonfinite(row, encoding)
            if count:
                if self.policy == "error":
                    raise MergeError(f"{info.path}: tensor {info.name} holds NaN or Inf values"
                                     " (--nan-policy error)")
                key = (str(info.path), info.name)
                self.counts[key] = self.counts.get(key, 0) + count
        if loaded.last:  # the reader finishes one tensor's first pass before the next
            for (path, name), count in self.counts.items():
                log.warning("%s: tensor %s holds %d NaN or Inf values; the merge carries"
                            " them into the output (--nan-policy error stops instead)",
                            path, name, count)
            self.counts.clear()


class Pipeline:
    def __init__(self, tasks: list[TensorTask], chunk: int, n_experts: int,
                 writer: SequentialFileWriter, on_progress: Callable[[Loaded], None],
                 nan_policy: str = "warn", devices: DevicePlan = CPU_ONLY) -> None:
        self.tasks = tasks
        self.devices = devices
        self.nonfinite = NonFiniteCheck(nan_policy)
        self.chunk = chunk
        self.reader = RangeReader()
        self.writer = writer
        self.on_progress = on_progress
        self.stop = threading.Event()
        self.failures: list[BaseException] = []
        # Copies of non-float tensors pass through the stack buffer as raw bytes (4 per element).
        widths = buffer_widths(tasks, n_experts)
        self.free_inputs: queue.Queue[InputBuffers] = queue.Queue()
        for _ in range(POOL_SIZE):
            self.free_inputs.put(InputBuffers(
                self._buffer(chunk, widths.stack), self._buffer(chunk, widths.base),
                self._buffer(chunk, widths.scratch), self._buffer(chunk, widths.spare)))
        self.free_outputs: queue.Queue[OutputBuffers] = queue.Queue()
        for _ in range(POOL_SIZE):
            self.free_outputs.put(OutputBuffers(self._buffer(chunk, widths.values),
                                                self._buffer(chunk, widths.encoded)))
        self.loaded: queue.Queue[Loaded | None] = queue.Queue()
        self.to_write: queue.Queue[tuple[memoryview, Callable[[], None]] | None] = queue.Queue()

    def _buffer(self, chunk: int, width: float) -> np.ndarray:
        return self.devices.host_buffer(math.ceil(chunk * width))

    # -- plumbing ------------------------------------------------------------

    def _get(self, source: queue.Queue):
        while True:
            try:
                return source.get(timeout=0.05)
            except queue.Empty:
                if self.stop.is_set():
                    raise _Stopped from None

    def _guarded(self, body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except _Stopped:
                pass
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self.failures.append(exc)
                self.stop.set()
        return run

    def run(self) -> None:
        threads = [threading.Thread(target=self._guarded(self._read_all), daemon=True),
                   threading.Thread(target=self._guarded(self._write_all), daemon=True)]
        for thread in threads:
            thread.start()
        try:
            self._compute_all()
            self.to_write.put(None)
            while threads[1].is_alive() and not self.stop.is_set():
                threads[1].join(0.05)
        except _Stopped:
            pass
        except BaseException:
            self.stop.set()
            raise
        finally:
            self.stop.set()
            for thread in threads:
                thread.join()
            self.reader.close()
        if self.failures:
            raise self.failures[0]

    # -- reading -------------------------------------------------------------

    def _schedule(self) -> Iterator[tuple[TensorTask, int, int, int, bool]]:
        for task in self.tasks:
            if task.merge is None:
                item = task.copy_from.nbytes // max(task.numel, 1)
                step = self.chunk * 4 // max(item, 1)
                yield from ((task, ALL_PASSES, s, min(step, task.numel - s), s + step >= task.numel)
                            for s in range(0, max(task.numel, 1), step))
                continue
            starts = list(range(0, max(task.numel, 1), task.chunk))
            passes = [ALL_PASSES] if len(starts) == 1 else range(task.merge.stat_passes + 1)
            for pass_index in passes:
                for i, start in enumerate(starts):
                    yield task, pass_index, start, min(task.chunk, task.numel - start), \
                        i == len(starts) - 1

    def _read_all(self) -> None:
        for task, pass_index, start, count, last in self._schedule():
            buffers = self._get(self.free_inputs)
            loaded = Loaded(task, pass_index, start, count, last, buffers)
            if task.merge is None:
                self._load_copy(loaded)
            else:
                self._load_chunk(loaded)
                if pass_index in (ALL_PASSES, 0):
                    self.nonfinite.check(loaded)
            self.loaded.put(loaded)
        self.loaded.put(None)

    def _load_copy(self, loaded: Loaded) -> None:
        info = loaded.task.copy_from
        item = info.nbytes // max(info.numel, 1)
        view = memoryview(loaded.buffers.stack)[: loaded.count * item]
        self.reader.read_into(info.path, info.offset + loaded.start * item, view)
        loaded.raw = view
        loaded.bytes_read = len(view)

    def _load_chunk(self, loaded: Loaded) -> None:
        task, count, buffers = loaded.task, loaded.count, loaded.buffers
        encoding = task.stack_encoding
        storage = STORAGE[encoding]
        n = len(task.experts)
        stack = buffers.stack[: n * count * _itemsize(encoding)].view(storage).reshape(n, count)
        for row, info in zip(stack, task.experts):
            loaded.bytes_read += read_values(self.reader, info, loaded.start, row, encoding,
                                             buffers.scratch, buffers.spare)
        base = None
        if task.merge.uses_base and task.base is not None:
            storage = STORAGE[task.base_encoding]
            base = buffers.base[: count * _itemsize(task.base_encoding)].view(storage)
            loaded.bytes_read += read_values(self.reader, task.base, loaded.start, base,
                                             task.base_encoding, buffers.scratch, buffers.spare)
        loaded.chunk = Chunk(stack, encoding, base, task.base_encoding, loaded.start)

    # -- computing -----------------------------------------------------------

    def _compute_all(self) -> None:
        while (loaded := self._get(self.loaded)) is not None:
            self.on_progress(loaded)
            if loaded.task.merge is None:
                self._emit(loaded.raw, loaded.buffers)
                continue
            with running_on(self.devices.backend_for(loaded.task)):
                self._compute(loaded)

    def _compute(self, loaded: Loaded) -> None:
        merge = loaded.task.merge
        if loaded.pass_index == ALL_PASSES:
            for pass_index in range(merge.stat_passes):
                merge.observe(pass_index, loaded.chunk)
                merge.end_pass(pass_index)
            self._apply(loaded)
        elif loaded.pass_index < merge.stat_passes:
            merge.observe(loaded.pass_index, loaded.chunk)
            self.free_inputs.put(loaded.buffers)
            if loaded.last:
                merge.end_pass(loaded.pass_index)
        else:
            self._apply(loaded)

    def _apply(self, loaded: Loaded) -> None:
        task = loaded.task
        buffers = self._get(self.free_outputs)
        out = buffers.values[: loaded.count * _itemsize(task.out_encoding)] \
            .view(STORAGE[task.out_encoding])
        task.merge.apply(loaded.chunk, OutChunk(out, task.out_encoding))
        self.free_inputs.put(loaded.buffers)
        if task.output.dtype not in ENCODINGS:
            length = task.output_bytes(loaded.count)
            out = encode_output(task.output.dtype, out, buffers.encoded[:length])
        self.to_write.put((memoryview(out), lambda: self.free_outputs.put(buffers)))

    def _emit(self, raw: memoryview, buffers: InputBuffers) -> None:
        self.to_write.put((raw, lambda: self.free_inputs.put(buffers)))

    # -- writing -------------------------------------------------------------

    def _write_all(self) -> None:
        while (item := self._get(self.to_write)) is not None:
            data, release = item
            self.writer.write(data)
            release()
