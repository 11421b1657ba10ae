"""The Python API: one call, the same options as the command line."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import build_job, job_from_yaml
from .engine import MergeReport, run_merge


def merge(models: Sequence[str | Path], method: str = "karcher", out: str | Path = "merged",
          *, base: str | Path | None = None, weights: Sequence[float] | None = None,
          dtype: str | None = None, max_memory: str | int | None = None,
          threads: int | None = None, shard_size: str | int | None = None,
          force: bool = False, progress: bool = False, chunk_elements: int | None = None,
          output_format: str | None = None, resume: bool = False,
          checkpoint_bytes: int | None = None, nan_policy: str = "warn",
          device: str = "auto", max_gpu_memory: str | int | None = None,
          executor: str | None = None, ray_address: str | None = None,
          ray_task_cpus: int | None = None, **params: Any) -> MergeReport:
    """Merge models (folders, .safetensors or .gguf files, hub ids) into ``out``.

    ``out`` is a safetensors folder, or a GGUF file when it ends in .gguf or
    ``output_format="gguf"``; ``dtype`` may then be a llama.cpp file type such as q4_k_m.
    ``resume`` continues an interrupted merge of the same plan; ``checkpoint_bytes`` sets
    how much output is written between journal checkpoints. ``device`` is "auto" (a usable
    GPU takes large tensors), "cpu" or "cuda"; ``max_gpu_memory`` caps the GPU's memory.
    ``executor="ray"`` runs a task per output file on Ray (``ray_address``, or a local Ray
    with ``threads`` CPUs; each task asks for ``ray_task_cpus``).

    Method parameters are keyword arguments, e.g. ``merge([a, b], "slerp", "out", t=0.3)``;
    a list is a gradient over layers as in mergekit. ``chunk_elements`` fixes the chunk
    size (a multiple of 65536) instead of deriving it from ``max_memory``.
    """
    job = build_job(models, out, method=method, base=base, weights=weights, params=params,
                    dtype=dtype, max_memory=max_memory, threads=threads,
                    shard_size=shard_size, force=force, progress=progress,
                    chunk_elements=chunk_elements, output_format=output_format,
                    resume=resume, checkpoint_bytes=checkpoint_bytes, nan_policy=nan_policy,
                    device=device, max_gpu_memory=max_gpu_memory, executor=executor,
                    ray_address=ray_address, ray_task_cpus=ray_task_cpus)
    return run_merge(job)


def run_config(config: str | Path, out: str | Path, **options: Any) -> MergeReport:
    """Run a mergekit YAML config; options as merge's (max_memory, threads, force, seed...)."""
    return run_merge(job_from_yaml(config, out, **options))
