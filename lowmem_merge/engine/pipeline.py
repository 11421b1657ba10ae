"""Overlapped streaming: a reader thread, the kernels on the calling thread, a writer thread.

Memory is bounded by two pools of reused buffers: input chunks (all inputs'
values for one element range) and output chunks. The reader runs ahead by at
most the input pool, the writer lags by at most the output pool.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .. import kernels
from ..io import RangeReader, ShardedSafetensorsWriter
from ..methods import Chunk, OutChunk
from .tensors import ENCODINGS, STORAGE, TensorTask

ALL_PASSES = -1
POOL_SIZE = 2


class _Stopped(Exception):
    """Another stage failed; this one stops quietly."""


@dataclass
class InputBuffers:
    stack: np.ndarray  # uint8, experts x chunk at the widest input width
    base: np.ndarray  # uint8, one chunk of the base
    scratch: np.ndarray  # uint8, one expert chunk awaiting conversion to float32


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


def input_bytes_per_element(tasks: list[TensorTask], n_experts: int) -> tuple[int, int, int]:
    """Widest element of the stack, the base and the conversion scratch over all tasks."""
    stack = base = scratch = 1
    for task in tasks:
        if task.merge is None:
            continue
        widths = {t.nbytes // max(t.numel, 1) for t in task.experts}
        stack = max(stack, max(widths) if len(widths) == 1 else 4)
        if len({t.dtype for t in task.experts}) > 1:
            scratch = 4
        if task.base is not None:
            base = max(base, 4 if task.base.dtype == "F32" else 2)
    return stack * n_experts, base, scratch


def bytes_per_element(tasks: list[TensorTask], n_experts: int) -> int:
    """Buffer bytes one chunk element costs across both pools."""
    stack_width, base_width, scratch_width = input_bytes_per_element(tasks, n_experts)
    out_width = max((t.output.nbytes // max(t.numel, 1) for t in tasks), default=4)
    return POOL_SIZE * (max(stack_width, 4) + base_width + scratch_width + out_width)


class Pipeline:
    def __init__(self, tasks: list[TensorTask], chunk: int, n_experts: int,
                 writer: ShardedSafetensorsWriter, on_progress: Callable[[Loaded], None]) -> None:
        self.tasks = tasks
        self.chunk = chunk
        self.reader = RangeReader()
        self.writer = writer
        self.on_progress = on_progress
        self.stop = threading.Event()
        self.failures: list[BaseException] = []
        stack_width, base_width, scratch_width = input_bytes_per_element(tasks, n_experts)
        out_width = max((t.output.nbytes // max(t.numel, 1) for t in tasks), default=4)
        # Copies of non-float tensors pass through the stack buffer as raw bytes.
        stack_bytes = max(chunk * stack_width, chunk * 4)
        self.free_inputs: queue.Queue[InputBuffers] = queue.Queue()
        for _ in range(POOL_SIZE):
            self.free_inputs.put(InputBuffers(np.empty(stack_bytes, np.uint8),
                                              np.empty(chunk * base_width, np.uint8),
                                              np.empty(chunk * scratch_width, np.uint8)))
        self.free_outputs: queue.Queue[np.ndarray] = queue.Queue()
        for _ in range(POOL_SIZE):
            self.free_outputs.put(np.empty(chunk * out_width, np.uint8))
        self.loaded: queue.Queue[Loaded | None] = queue.Queue()
        self.to_write: queue.Queue[tuple[memoryview, Callable[[], None]] | None] = queue.Queue()

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
        encodings = [ENCODINGS[t.dtype] for t in task.experts]
        encoding = encodings[0] if len(set(encodings)) == 1 else kernels.F32
        width = np.dtype(STORAGE[encoding]).itemsize
        n = len(task.experts)
        stack = buffers.stack[: n * count * width].view(STORAGE[encoding]).reshape(n, count)
        for row, info, input_encoding in zip(stack, task.experts, encodings):
            loaded.bytes_read += self._read_values(info, input_encoding, loaded.start, row,
                                                   encoding, buffers.scratch)
        base, base_encoding = None, kernels.F32
        if task.merge.uses_base and task.base is not None:
            base_encoding = ENCODINGS[task.base.dtype]
            storage = STORAGE[base_encoding]
            base = buffers.base[: count * np.dtype(storage).itemsize].view(storage)
            loaded.bytes_read += self._read_values(task.base, base_encoding, loaded.start, base,
                                                   base_encoding, buffers.scratch)
        loaded.chunk = Chunk(stack, encoding, base, base_encoding, loaded.start)

    def _read_values(self, info, encoding: int, start: int, target: np.ndarray,
                     target_encoding: int, scratch: np.ndarray) -> int:
        width = info.nbytes // max(info.numel, 1)
        if encoding == target_encoding:
            self.reader.read_into(info.path, info.offset + start * width, memoryview(target))
        else:
            storage = STORAGE[encoding]
            raw = scratch[: target.shape[0] * width].view(storage)
            self.reader.read_into(info.path, info.offset + start * width, memoryview(raw))
            kernels.transcode(raw, encoding, target, target_encoding)
        return target.shape[0] * width

    # -- computing -----------------------------------------------------------

    def _compute_all(self) -> None:
        while (loaded := self._get(self.loaded)) is not None:
            self.on_progress(loaded)
            merge = loaded.task.merge
            if merge is None:
                self._emit(loaded.raw, loaded.buffers)
                continue
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
        storage = STORAGE[task.out_encoding]
        buffer = self._get(self.free_outputs)
        width = np.dtype(storage).itemsize
        out = buffer[: loaded.count * width].view(storage)
        task.merge.apply(loaded.chunk, OutChunk(out, task.out_encoding))
        self.free_inputs.put(loaded.buffers)
        self.to_write.put((memoryview(out), lambda: self.free_outputs.put(buffer)))

    def _emit(self, raw: memoryview, buffers: InputBuffers) -> None:
        self.to_write.put((raw, lambda: self.free_inputs.put(buffers)))

    # -- writing -------------------------------------------------------------

    def _write_all(self) -> None:
        while (item := self._get(self.to_write)) is not None:
            data, release = item
            self.writer.write(data)
            release()
