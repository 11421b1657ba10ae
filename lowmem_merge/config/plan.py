"""Merge arguments (from the CLI or the Python API) -> one validated MergeJob."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..engine import CHUNK_ALIGN, DEVICES, EXECUTORS, MergeJob
from ..errors import MergeError
from ..io.gguf_mixes import parse_file_type
from ..methods import REQUIRED, MergeMethod, get_method
from ..units import parse_size
from .settings import check_setting, resolve

DTYPE_NAMES = {
    "bfloat16": "BF16", "bf16": "BF16",
    "float16": "F16", "fp16": "F16", "f16": "F16", "half": "F16",
    "float32": "F32", "fp32": "F32", "f32": "F32", "float": "F32",
}


FORMATS = ("safetensors", "gguf")
NAN_POLICIES = ("warn", "error")


def choose_format(name: str | None, output: Path) -> str:
    """The requested format, or gguf for an output path ending in .gguf."""
    if name is None:
        return "gguf" if output.suffix.lower() == ".gguf" else "safetensors"
    if name.lower() not in FORMATS:
        raise MergeError(f"unknown output format {name!r}; use {' or '.join(FORMATS)}")
    return name.lower()


def output_dtype(name: str | None, format_name: str = "safetensors") -> str | None:
    """BF16/F16/F32 from any usual spelling; for GGUF also a llama.cpp file type (Q4_K_M...)."""
    if name is None:
        return None
    if name.lower() in DTYPE_NAMES:
        return DTYPE_NAMES[name.lower()]
    if format_name == "gguf":
        return parse_file_type(name)
    raise MergeError(f"unknown dtype {name!r}; use bfloat16, float16 or float32"
                     " (quantized types such as q4_k_m need GGUF output)")


def build_job(models: Sequence[str | Path], output: str | Path, *, method: str = "karcher",
              base: str | Path | None = None, weights: Sequence[float] | None = None,
              params: dict[str, Any] | None = None,
              model_params: Sequence[dict[str, Any]] | None = None,
              dtype: str | None = None, max_memory: str | int | None = None,
              threads: int | None = None, shard_size: str | int | None = None,
              output_format: str | None = None,
              force: bool = False, progress: bool = False,
              chunk_elements: int | None = None, seed: int | None = None,
              resume: bool = False, checkpoint_bytes: int | None = None,
              nan_policy: str = "warn", device: str = "auto",
              max_gpu_memory: str | int | None = None, executor: str | None = None,
              ray_address: str | None = None, ray_task_cpus: int | None = None) -> MergeJob:
    merge_method = get_method(method)
    experts = [str(m) for m in models]
    base_ref = str(base) if base is not None else None
    per_model = [dict(p) for p in model_params] if model_params else [{} for _ in experts]
    if len(per_model) != len(experts):
        raise MergeError(f"{len(per_model)} per-model parameter sets for {len(experts)} models")
    if weights is not None:
        if len(weights) != len(experts):
            raise MergeError(f"--weights has {len(weights)} values for {len(experts)} models")
        for scope, weight in zip(per_model, weights):
            scope["weight"] = weight
    if merge_method.base_goes_first and base_ref is not None:
        experts, per_model, base_ref = [base_ref, *experts], [{}, *per_model], None
    problem = merge_method.check_inputs(len(experts), base_ref is not None)
    if problem:
        raise MergeError(problem)
    global_params = dict(params or {})
    if seed is not None:
        if "seed" not in {p.name for p in merge_method.params}:
            raise MergeError(f"--seed: method {merge_method.name!r} draws nothing at random")
        global_params["seed"] = seed
    _check_params(merge_method, global_params, per_model)
    if chunk_elements is not None and (chunk_elements < CHUNK_ALIGN
                                       or chunk_elements % CHUNK_ALIGN):
        raise MergeError(f"chunk size must be a positive multiple of {CHUNK_ALIGN} elements,"
                         f" got {chunk_elements}")
    if nan_policy not in NAN_POLICIES:
        raise MergeError(f"--nan-policy {nan_policy!r}: use {' or '.join(NAN_POLICIES)}")
    if device not in DEVICES:
        raise MergeError(f"--device {device!r}: use {', '.join(DEVICES)}")
    executor = executor or "local"
    _check_executor(executor, ray_address, ray_task_cpus)
    if threads is not None and threads < 1:
        raise MergeError(f"--threads must be at least 1, got {threads}")
    format_name = choose_format(output_format, Path(output))
    return MergeJob(
        method=merge_method, experts=experts, base=base_ref,
        resolve_params=_resolver(merge_method, global_params, per_model, experts),
        output=Path(output), out_dtype=output_dtype(dtype, format_name),
        output_format=format_name,
        max_memory=parse_size(max_memory, "--max-memory") if max_memory is not None else None,
        threads=threads,
        shard_size=parse_size(shard_size, "--shard-size") if shard_size is not None else None,
        force=force,
        progress=progress, chunk_elements=chunk_elements, resume=resume, nan_policy=nan_policy,
        device=device, max_gpu_memory=parse_size(max_gpu_memory, "--max-gpu-memory")
        if max_gpu_memory is not None else None,
        executor=executor, ray_address=ray_address, ray_task_cpus=ray_task_cpus or 1,
        **({"checkpoint_bytes": checkpoint_bytes} if checkpoint_bytes else {}))


def _check_executor(executor: str, ray_address: str | None, task_cpus: int | None) -> None:
    if executor not in EXECUTORS:
        raise MergeError(f"--executor {executor!r}: use {' or '.join(EXECUTORS)}")
    if executor != "ray" and (ray_address or task_cpus):
        raise MergeError("--ray-address and --ray-task-cpus need --executor ray")
    if task_cpus is not None and task_cpus < 1:
        raise MergeError(f"--ray-task-cpus must be at least 1, got {task_cpus}")
    if executor == "ray" and importlib.util.find_spec("ray") is None:
        raise MergeError("--executor ray needs Ray, which is not installed:"
                         " pip install 'lowmem-merge[ray]'")


def _check_params(method: MergeMethod, global_params: dict[str, Any],
                  per_model: list[dict[str, Any]]) -> None:
    known = {p.name: p for p in method.params + method.model_params}
    for name, setting in global_params.items():
        if name not in known:
            raise MergeError(f"method {method.name!r} has no parameter {name!r};"
                             f" it takes: {', '.join(known) or 'none'}")
        check_setting(known[name], setting, f"parameter {name}")
    model_known = {p.name: p for p in method.model_params}
    for i, scope in enumerate(per_model):
        for name, setting in scope.items():
            if name not in model_known:
                raise MergeError(f"method {method.name!r} has no per-model parameter {name!r};"
                                 f" it takes: {', '.join(model_known) or 'none'}")
            check_setting(model_known[name], setting, f"model {i + 1}: parameter {name}")
    for param in method.params:
        if param.default is REQUIRED and param.name not in global_params:
            raise MergeError(f"method {method.name!r} needs parameter {param.name!r}"
                             f" (--param {param.name}=...)")


def _resolver(method: MergeMethod, global_params: dict[str, Any],
              per_model: list[dict[str, Any]], experts: list[str]):
    def resolve_for(tensor: str, position: float, slice_index: int | None = None):
        params = {p.name: resolve(p, [global_params], tensor, position, "parameters")
                  for p in method.params}
        model_params = tuple(
            {p.name: resolve(p, [scope, global_params], tensor, position, f"model {ref}")
             for p in method.model_params}
            for scope, ref in zip(per_model, experts))
        return params, model_params
    return resolve_for
