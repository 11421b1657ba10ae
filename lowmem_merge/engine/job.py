"""What the engine is asked to do: everything resolved except the tensors themselves."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io.sequential_files import CHECKPOINT_BYTES
from ..methods import MergeMethod

# (tensor name, position of its layer in [0, 1], slice index or None)
#   -> (method params, per-expert params)
ParamResolver = Callable[[str, float, int | None],
                         tuple[dict[str, Any], tuple[dict[str, Any], ...]]]


EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class SliceSource:
    """Layers [start, end) of one model, an input of an output slice."""

    model: str
    start: int
    end: int


@dataclass(frozen=True)
class OutputSlice:
    """Consecutive output layers merged from the same layers of each source."""

    sources: tuple[SliceSource, ...]
    base: SliceSource | None = None


@dataclass
class MergeJob:
    method: MergeMethod
    experts: list[str]
    base: str | None
    resolve_params: ParamResolver
    output: Path
    # Safetensors dtype (BF16, F16, F32), or for GGUF output a file type (Q4_K_M, ...);
    # None: as the input.
    out_dtype: str | None = None
    output_format: str = "safetensors"  # or "gguf"
    max_memory: int | None = None
    threads: int | None = None
    shard_size: int | None = None  # None: 5 GB shards of safetensors, one GGUF file
    force: bool = False
    progress: bool = False
    # Fixed chunk size in elements (a multiple of CHUNK_ALIGN), for tests and tuning;
    # None sizes chunks from max_memory.
    chunk_elements: int | None = None
    # mergekit-style slices (frankenmerges); None: every tensor from experts (and base).
    slices: tuple[OutputSlice, ...] | None = None
    # Model whose config and tokenizer files are copied; None: the base, else the first.
    companions_from: str | None = None
    # NaN or Inf in an input: "warn" (once per tensor) or "error" (stop, nothing written).
    nan_policy: str = "warn"
    # Where the kernels run: "auto" (a GPU for large tensors when one is usable), "cpu", "cuda".
    device: str = "auto"
    max_gpu_memory: int | None = None  # None: most of the GPU's free memory
    # "local", or "ray": a task per output file on a Ray cluster (engine/distributed.py).
    executor: str = "local"
    ray_address: str | None = None  # None: start a local Ray with `threads` CPUs
    ray_task_cpus: int = 1  # CPUs each Ray task asks for (and its compute threads)
    # Continue an interrupted merge of the same plan from its journal.
    resume: bool = False
    # Output bytes between journal checkpoints (each one syncs the data first).
    checkpoint_bytes: int = CHECKPOINT_BYTES


@dataclass
class MergeReport:
    method: str
    output: Path
    experts: int
    tensors_merged: int
    tensors_copied: int
    tensors_resumed: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss: int
    max_memory: int
    chunk_elements: int
    streamed_tensors: int
    device: str = "cpu"
    gpu_tensors: int = 0
    gpu_bytes_copied: int = 0
    executor: str = "local"

    def lines(self) -> list[str]:
        from ..units import format_bytes

        rate = self.bytes_read / self.seconds / 1e6 if self.seconds else 0.0
        return [
            f"method          {self.method} ({self.experts} expert"
            f"{'s' if self.experts != 1 else ''})",
            f"output          {self.output}",
            f"tensors         {self.tensors_merged} merged, {self.tensors_copied} copied,"
            f" {self.streamed_tensors} streamed in chunks"
            + (f", {self.tensors_resumed} done before --resume" if self.tensors_resumed else ""),
            f"read            {format_bytes(self.bytes_read)} ({rate:.3g} MB/s)",
            f"written         {format_bytes(self.bytes_written)}",
            f"time            {self.seconds:.2f} s",
            f"peak RSS        {format_bytes(self.peak_rss)}"
            f" (budget {format_bytes(self.max_memory)}, chunk {self.chunk_elements:,} elements)",
            f"device          {self.device}"
            + (f"; {self.gpu_tensors} tensors on the GPU, {format_bytes(self.gpu_bytes_copied)}"
               " copied to it" if self.gpu_tensors else ""),
        ] + ([f"executor        {self.executor} (a task per output file)"]
             if self.executor != "local" else [])
