"""From opened models to the list of output tensors and how each is produced."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .. import kernels
from ..errors import MergeError
from ..io import DTYPE_SIZES, Model, OutputTensor, TensorInfo
from ..methods import MergeMethod, TensorContext, TensorMerge
from ..units import format_bytes
from .job import ParamResolver

ENCODINGS = {"BF16": kernels.BF16, "F16": kernels.F16, "F32": kernels.F32}
# Stored bits of each encoding are held in unsigned integers of the same width.
STORAGE = {kernels.BF16: "uint16", kernels.F16: "uint16", kernels.F32: "uint32"}
LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass
class TensorTask:
    """One output tensor: its inputs and either a merge or a verbatim copy."""

    output: OutputTensor
    experts: list[TensorInfo]
    base: TensorInfo | None
    merge: TensorMerge | None  # None: copy the bytes of copy_from
    context: TensorContext | None = None
    copy_from: tuple[int, TensorInfo] | None = None  # (source index, info); -1 is the base
    chunk: int = 0  # elements per chunk for this tensor, set once the budget is known

    @property
    def numel(self) -> int:
        return self.experts[0].numel

    @property
    def out_encoding(self) -> int:
        return ENCODINGS[self.output.dtype]


def check_same_tensors(models: list[Model]) -> None:
    """All inputs must hold the same tensor names with the same shapes."""
    first = models[0]
    problems: list[str] = []
    for other in models[1:]:
        missing = sorted(set(first.tensors) - set(other.tensors))
        extra = sorted(set(other.tensors) - set(first.tensors))
        problems += [f"{name!r} is in {first.label} but not in {other.label}" for name in missing]
        problems += [f"{name!r} is in {other.label} but not in {first.label}" for name in extra]
        for name in first.tensors.keys() & other.tensors.keys():
            a, b = first.tensors[name].shape, other.tensors[name].shape
            if a != b:
                problems.append(f"{name!r} has shape {list(a)} in {first.label}"
                                f" but {list(b)} in {other.label}")
    if problems:
        shown = "; ".join(sorted(problems)[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise MergeError(f"the models do not have the same tensors: {shown}{more}")


def layer_positions(names: list[str]) -> dict[str, float]:
    """Each tensor's layer as a fraction of the depth (mergekit's gradient position).

    Tensors outside the repeated layers (embeddings, final norm, head) sit at 0.
    """
    layers = {name: int(m.group(1)) for name in names if (m := LAYER_INDEX.search(name))}
    count = max(layers.values(), default=0) + 1
    return {name: (layers[name] / (count - 1) if count > 1 else 1.0) if name in layers else 0.0
            for name in names}


def plan_tensors(experts: list[Model], base: Model | None, method: MergeMethod,
                 resolve: ParamResolver, out_dtype: str | None) -> list[TensorTask]:
    models = experts + ([base] if base else [])
    check_same_tensors(models)
    ordered = sorted(experts[0].tensors.values(), key=lambda t: (str(t.path), t.offset))
    positions = layer_positions([t.name for t in ordered])
    tasks = []
    for info in ordered:
        inputs = [m.tensors[info.name] for m in experts]
        base_info = base.tensors[info.name] if base else None
        if all(t.dtype in ENCODINGS for t in inputs + ([base_info] if base_info else [])):
            dtype = out_dtype or info.dtype
            params, model_params = resolve(info.name, positions[info.name])
            context = TensorContext(info.name, info.shape, params, model_params, base is not None)
            output = OutputTensor(info.name, dtype, info.shape, info.numel * DTYPE_SIZES[dtype])
            tasks.append(TensorTask(output, inputs, base_info, method.for_tensor(context),
                                    context))
        else:
            source = (-1, base_info) if base_info else (0, inputs[0])
            output = OutputTensor(info.name, source[1].dtype, info.shape, source[1].nbytes)
            tasks.append(TensorTask(output, inputs, base_info, None, copy_from=source))
    return tasks


def assign_chunks(tasks: list[TensorTask], chunk: int, bytes_per_element: int) -> None:
    """Each tensor's chunk: the budget's, rounded down to what its method keeps together."""
    for task in tasks:
        unit = task.merge.chunk_unit if task.merge is not None else None
        if unit is None:
            task.chunk = chunk
            continue
        unit = min(unit, max(task.numel, 1))
        task.chunk = chunk // unit * unit
        if task.chunk == 0:
            need = unit * bytes_per_element
            raise MergeError(
                f"tensor {task.output.name}: the method needs {unit:,} elements of it in memory"
                f" at once ({format_bytes(need)} of buffers) but the budget allows chunks of"
                f" {chunk:,} elements; raise --max-memory")
