"""From opened models to the list of output tensors and how each is produced."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .. import kernels
from ..errors import MergeError
from ..io import Model, OutputTensor, TensorInfo
from ..kernels.gguf_quants import can_dequantize
from ..methods import MergeMethod, TensorContext, TensorMerge
from ..units import format_bytes
from .budget import CHUNK_ALIGN
from .job import ParamResolver
from .values import ENCODINGS, value_encoding

LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|blk)\.(\d+)\.")
# (tensor name, shape, dtype of its first input) -> dtype of the output tensor
OutputType = Callable[[str, tuple[int, ...], str], str]


@dataclass
class TensorTask:
    """One output tensor: its inputs and either a merge or a verbatim copy."""

    output: OutputTensor
    experts: list[TensorInfo]
    base: TensorInfo | None
    merge: TensorMerge | None  # None: copy the bytes of copy_from
    context: TensorContext | None = None
    copy_from: TensorInfo | None = None  # the base's (or first expert's) non-float tensor
    chunk: int = 0  # elements per chunk for this tensor, set once the budget is known
    device: str = "cpu"  # where its kernels run ("cuda": the GPU backend), see devices.py

    @property
    def numel(self) -> int:
        return self.experts[0].numel

    @property
    def out_encoding(self) -> int:
        """Encoding the method writes; block formats are quantized from float32 after it."""
        return value_encoding(self.output.dtype)

    @property
    def stack_encoding(self) -> int:
        """One encoding for all experts' values: their own if they share it, else float32."""
        encodings = {value_encoding(t.dtype) for t in self.experts}
        return encodings.pop() if len(encodings) == 1 else kernels.F32

    @property
    def base_encoding(self) -> int:
        return value_encoding(self.base.dtype) if self.base is not None else kernels.F32

    @property
    def passes(self) -> int:
        """Times the inputs are read: once if the tensor fits one chunk, else once per pass."""
        if self.merge is None or self.numel <= self.chunk:
            return 1
        return self.merge.stat_passes + 1

    @property
    def planned_read_bytes(self) -> int:
        if self.merge is None:
            return self.copy_from.nbytes
        once = sum(t.nbytes for t in self.experts)
        if self.merge.uses_base and self.base is not None:
            once += self.base.nbytes
        return once * self.passes

    def output_bytes(self, count: int) -> int:
        """Bytes of count output elements (whole blocks for block formats)."""
        block_elements, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[self.output.dtype]]
        return -(-count // block_elements) * block_bytes

    @property
    def alignment(self) -> int:
        """Elements a chunk must hold whole: permuted heads, output blocks."""
        units = [t.permuted_unit for t in self.experts + ([self.base] if self.base else [])]
        units.append(GGML_QUANT_SIZES[GGMLQuantizationType[self.output.dtype]][0]
                     if self.output.dtype in GGMLQuantizationType.__members__ else 1)
        return math.lcm(*units)


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


def layer_count(names: list[str]) -> int:
    """Number of repeated layers: the highest layer index in the names, plus one."""
    layers = [int(m.group(1)) for name in names if (m := LAYER_INDEX.search(name))]
    return max(layers, default=-1) + 1


def layer_positions(names: list[str]) -> dict[str, float]:
    """Each tensor's layer as a fraction of the depth (mergekit's gradient position).

    Tensors outside the repeated layers (embeddings, final norm, head) sit at 0.
    """
    layers = {name: int(m.group(1)) for name in names if (m := LAYER_INDEX.search(name))}
    count = max(layers.values(), default=0) + 1
    return {name: (layers[name] / (count - 1) if count > 1 else 1.0) if name in layers else 0.0
            for name in names}


def plan_tensors(experts: list[Model], base: Model | None, method: MergeMethod,
                 resolve: ParamResolver, output_type: OutputType) -> list[TensorTask]:
    """Every tensor of the first expert, merged from the same tensor of every input."""
    check_same_tensors(experts + ([base] if base else []))
    ordered = sorted(experts[0].tensors.values(), key=lambda t: (str(t.path), t.offset))
    positions = layer_positions([t.name for t in ordered])
    return [_task(info.name, [m.tensors[info.name] for m in experts],
                  base.tensors[info.name] if base else None, method,
                  resolve(info.name, positions[info.name], None), output_type)
            for info in ordered]


def assign_chunks(tasks: list[TensorTask], chunk: int, bytes_per_element: int,
                  spare: int) -> None:
    """Each tensor's chunk: the budget's, rounded down to what its method keeps together.

    spare is what the budget leaves beside the chunk buffers for methods' working memory.
    """
    for task in tasks:
        working = task.merge.working_bytes if task.merge is not None else 0
        if working > spare:
            raise MergeError(
                f"tensor {task.output.name}: the method needs {format_bytes(working)} of working"
                f" memory besides the chunk buffers; the budget leaves {format_bytes(spare)}:"
                " raise --max-memory")
        unit = task.merge.chunk_unit if task.merge is not None else None
        if unit is None and task.alignment == 1:
            task.chunk = chunk
            continue
        unit = math.lcm(unit or CHUNK_ALIGN, task.alignment)
        unit = min(unit, max(task.numel, 1))
        task.chunk = chunk // unit * unit
        if task.chunk == 0:
            need = unit * bytes_per_element
            raise MergeError(
                f"tensor {task.output.name}: the method needs {unit:,} elements of it in memory"
                f" at once ({format_bytes(need)} of buffers) but the budget allows chunks of"
                f" {chunk:,} elements; raise --max-memory")


def _layer_tensors(model: Model) -> tuple[dict[int, dict[str, TensorInfo]], list[TensorInfo],
                                          list[TensorInfo]]:
    """A model's tensors by layer (suffix-keyed: 'model.layers.{}.mlp...'), before, after."""
    layers: dict[int, dict[str, TensorInfo]] = {}
    before, after = [], []
    ordered = sorted(model.tensors.values(), key=lambda t: (str(t.path), t.offset))
    seen_layer = False
    for info in ordered:
        match = LAYER_INDEX.search(info.name)
        if match:
            template = info.name[:match.start(1)] + "{}" + info.name[match.end(1):]
            layers.setdefault(int(match.group(1)), {})[template] = info
            seen_layer = True
        elif "embed" in info.name or "embd" in info.name or not seen_layer:
            before.append(info)
        else:
            after.append(info)
    return layers, before, after


def plan_slices(models: dict[str, Model], slices, method: MergeMethod, resolve: ParamResolver,
                output_type: OutputType) -> tuple[list[TensorTask], int]:
    """Tasks of a frankenmerge and its number of output layers.

    Output layer k of a slice merges layer start + k of every source; tensors
    outside the layers come from the first slice's sources (embeddings) and
    the last slice's (final norm, head), as mergekit does.
    """
    split = {ref: _layer_tensors(model) for ref, model in models.items()}
    out_layer = 0
    layer_tasks: list[TensorTask] = []
    for index, piece in enumerate(slices):
        lengths = {s.end - s.start for s in piece.sources}
        if len(lengths) != 1:
            raise MergeError(f"slice {index + 1}: its sources have different layer counts"
                             f" {sorted(lengths)}")
        count = lengths.pop()
        for offset in range(count):
            position = offset / (count - 1) if count > 1 else 1.0
            for template in _source_layer(split, piece.sources[0], offset, index):
                inputs = [_source_layer(split, s, offset, index)[template]
                          for s in piece.sources]
                base = _source_layer(split, piece.base, offset, index)[template] \
                    if piece.base else None
                name = template.format(out_layer)
                layer_tasks.append(_task(name, inputs, base, method,
                                         resolve(name, position, index), output_type))
            out_layer += 1
    first, last = slices[0], slices[-1]
    before = _edge_tasks(models, split[first.sources[0].model][1], first, 0, method, resolve,
                         output_type)
    after = _edge_tasks(models, split[last.sources[0].model][2], last, len(slices) - 1, method,
                        resolve, output_type)
    return before + layer_tasks + after, out_layer


def _edge_tasks(models: dict[str, Model], infos: list[TensorInfo], piece, index: int,
                method: MergeMethod, resolve: ParamResolver,
                output_type: OutputType) -> list[TensorTask]:
    """Tensors outside the layers (embeddings, or final norm and head), merged over a slice's
    sources as if they were at the start of its gradient."""
    tasks = []
    for info in infos:
        inputs = [_tensor(models, s.model, info.name) for s in piece.sources]
        base = _tensor(models, piece.base.model, info.name) if piece.base else None
        tasks.append(_task(info.name, inputs, base, method, resolve(info.name, 0.0, index),
                           output_type))
    return tasks


def _tensor(models: dict[str, Model], ref: str, name: str) -> TensorInfo:
    if name not in models[ref].tensors:
        raise MergeError(f"{ref} has no tensor {name!r}")
    return models[ref].tensors[name]


def _source_layer(split, source, offset: int, index: int) -> dict[str, TensorInfo]:
    layers = split[source.model][0]
    layer = source.start + offset
    if layer not in layers:
        raise MergeError(f"slice {index + 1}: {source.model} has no layer {layer}"
                         f" (layer_range [{source.start}, {source.end}])")
    return layers[layer]


def _task(name: str, inputs: list[TensorInfo], base: TensorInfo | None, method: MergeMethod,
          params, output_type: OutputType) -> TensorTask:
    shapes = {t.shape for t in inputs + ([base] if base else [])}
    if len(shapes) != 1:
        raise MergeError(f"tensor {name}: its sources have different shapes {sorted(shapes)}")
    first = inputs[0]
    for info in inputs + ([base] if base else []):
        if info.block_elements > 1 and not is_float(info):
            raise MergeError(f"tensor {name}: cannot decode {info.dtype} data of {info.path}")
    if not all(is_float(t) for t in inputs + ([base] if base else [])):
        source = base or first
        output = OutputTensor(name, source.dtype, first.shape, source.nbytes)
        return TensorTask(output, inputs, base, None, copy_from=source)
    dtype = output_type(name, first.shape, first.dtype)
    context = TensorContext(name, first.shape, params[0], params[1], base is not None)
    output = OutputTensor(name, dtype, first.shape, output_nbytes(dtype, first.shape))
    return TensorTask(output, inputs, base, method.for_tensor(context), context)


def is_float(info: TensorInfo) -> bool:
    """Values the methods can merge: bf16/f16/f32 or a block format that decodes to float."""
    if info.dtype in ENCODINGS:
        return True
    qtype = GGMLQuantizationType.__members__.get(info.dtype)
    return qtype is not None and info.block_elements > 1 and can_dequantize(qtype)


def output_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    block_elements, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[dtype]]
    return math.prod(shape) // block_elements * block_bytes
