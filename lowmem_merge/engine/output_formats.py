"""What each output format decides: tensor names, output types, files and metadata.

A new output format is one writer in io and one class here.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from gguf import GGMLQuantizationType, LlamaFileType

from .. import __version__
from ..errors import MergeError
from ..io import Model, OutputFiles, OutputFolder, ShardedSafetensorsWriter
from ..io.gguf_metadata import metadata_from_hf
from ..io.gguf_mixes import FILE_TYPES, tensor_type
from ..io.gguf_names import gguf_architecture
from ..io.gguf_reader import read_gguf_header
from ..io.gguf_values import Metadata, MetaValue
from ..io.gguf_writer import GGUFFileWriter, gguf_file_groups, gguf_file_names
from ..io.hf_config import config_from_gguf
from ..io.safetensors_reader import read_safetensors_header
from ..io.sequential_files import SequentialFileWriter
from .job import MergeJob
from .naming import GGUF, HF
from .tensors import TensorTask, layer_count
from .values import ENCODINGS

log = logging.getLogger(__name__)
TORCH_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
# Metadata of an input that no longer describes the merged file.
STALE_KEY_PREFIXES = ("split.", "quantize.", "general.file_type", "general.quantization_version",
                      "general.base_model.")


def provenance(job: MergeJob) -> dict[str, str]:
    return {"merged_by": f"lowmem-merge {__version__}", "merge_method": job.method.name,
            "merge_inputs": json.dumps({"experts": job.experts, "base": job.base})}


def metadata_source(job: MergeJob, models: dict[str, Model]) -> Model:
    """The model whose config, tokenizer or GGUF metadata the output takes."""
    return models[job.companions_from or job.base or job.experts[0]]


class _StagedOutput:
    """Output written in a staging folder (made when writing starts), kept for --resume
    after an interruption, removed after a failure."""

    def __init__(self, job: MergeJob, models: dict[str, Model]) -> None:
        self.job = job
        self.models = models
        self.staged: OutputFolder | OutputFiles | None = None
        self.writer: SequentialFileWriter | None = None

    @property
    def staging(self) -> Path:
        return self.staged.staging

    def keep(self) -> None:
        if self.staged is not None:
            self.staged.keep()

    def abort(self) -> None:
        if self.staged is not None:
            self.staged.abort()

    def verify(self) -> None:
        """Every file's header parses back to the planned tensors (sizes were checked)."""
        for planned in self.writer.files:
            path = self.staging / planned.name
            names = list(self._read_tensors(path))
            if sorted(names) != sorted(self._planned_names(planned)):
                raise MergeError(f"{path}: its header does not list the planned tensors")


class SafetensorsOutput(_StagedOutput):
    naming = HF

    def set_shape(self, n_layers: int, tied_embeddings: bool, seventy_b: bool) -> None:
        """Safetensors types do not depend on the model's shape."""

    def output_type(self, name: str, shape: tuple[int, ...], input_dtype: str) -> str:
        if self.job.out_dtype:
            return self.job.out_dtype
        if input_dtype in ENCODINGS:
            return input_dtype
        return "F32"  # decoded GGUF blocks are exact in float32

    def open_writer(self, tasks: list[TensorTask], resume: bool = False) -> SequentialFileWriter:
        self.staged = OutputFolder(self.job.output, resume)
        self.writer = self.planned_writer(tasks, self.staged.staging)
        return self.writer

    def planned_writer(self, tasks: list[TensorTask], folder: Path) -> SequentialFileWriter:
        """The files of the output, planned in ``folder`` (nothing is written yet)."""
        return ShardedSafetensorsWriter(
            folder, [t.output for t in tasks], self.job.shard_size or 5 * 1000**3,
            {"format": "pt", **provenance(self.job)})

    @staticmethod
    def _read_tensors(path: Path) -> dict:
        return read_safetensors_header(path)[0]

    def _planned_names(self, planned) -> list[str]:
        shard = next(s for s in self.writer.shards if s.file_name == planned.name)
        return [t.name for t in shard.tensors]

    def commit(self, tasks: list[TensorTask], layers: int | None) -> None:
        source = metadata_source(self.job, self.models)
        if source.is_gguf:
            _write_config_from_gguf(source, self.staged.staging, tasks)
        _copy_companions(source, self.staged.staging, tasks, layers)
        self.staged.commit()


def _write_config_from_gguf(source: Model, folder: Path, tasks: list[TensorTask]) -> None:
    """A config.json from a GGUF input's metadata (its tokenizer is not converted)."""
    names = {t.output.name for t in tasks}
    config = config_from_gguf(source.gguf_metadata, source.label,
                              tied_embeddings="lm_head.weight" not in names,
                              torch_dtype="float32")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    log.warning("%s: GGUF input: wrote config.json from its metadata; the tokenizer is not"
                " converted to Hugging Face files", source.label)


def _copy_companions(source: Model, folder: Path, tasks: list[TensorTask],
                     layers: int | None) -> None:
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


class GGUFOutput(_StagedOutput):
    naming = GGUF

    def __init__(self, job: MergeJob, models: dict[str, Model]) -> None:
        super().__init__(job, models)
        self.file_type = job.out_dtype or _input_file_type(metadata_source(job, models))
        if self.file_type not in FILE_TYPES:
            raise MergeError(f"cannot write GGUF file type {self.file_type}; choose --dtype from"
                             f" {', '.join(FILE_TYPES)}")
        self.n_layers = 0
        self.tied_embeddings = False
        self.seventy_b = False
        self.file_names: list[str] = []

    def output_type(self, name: str, shape: tuple[int, ...], input_dtype: str) -> str:
        qtype = tensor_type(self.file_type, name, shape, self.n_layers,
                            tied_embeddings=self.tied_embeddings, is_70b=self.seventy_b)
        return GGMLQuantizationType(qtype).name

    def set_shape(self, n_layers: int, tied_embeddings: bool, seventy_b: bool) -> None:
        """What the type mixes depend on (depth, a separate output matrix, llama.cpp's 70B
        rules); before planning."""
        self.n_layers = n_layers
        self.tied_embeddings = tied_embeddings
        self.seventy_b = seventy_b

    def open_writer(self, tasks: list[TensorTask], resume: bool = False) -> SequentialFileWriter:
        stem = self.job.output.name.removesuffix(".gguf")
        groups = gguf_file_groups([t.output for t in tasks], self.job.shard_size)
        _check_replaced(self.job.output.parent, gguf_file_names(stem, len(groups)),
                        self.job.force)
        self.staged = OutputFiles(self.job.output, resume)
        self.writer = self.planned_writer(tasks, self.staged.staging)
        self.file_names = self.writer.file_names
        return self.writer

    def planned_writer(self, tasks: list[TensorTask], folder: Path) -> SequentialFileWriter:
        """The files of the output, planned in ``folder`` (nothing is written yet)."""
        metadata = self._metadata(layer_count([t.output.name for t in tasks]))
        return GGUFFileWriter(folder, self.job.output.name.removesuffix(".gguf"),
                              [t.output for t in tasks], metadata, self.job.shard_size)

    @staticmethod
    def _read_tensors(path: Path) -> dict:
        return read_gguf_header(path).tensors

    def _planned_names(self, planned) -> list[str]:
        return self.writer.tensor_names[planned.name]

    def _metadata(self, layers: int) -> Metadata:
        source = metadata_source(self.job, self.models)
        if source.is_gguf:
            metadata = {k: v for k, v in source.gguf_metadata.items()
                        if not k.startswith(STALE_KEY_PREFIXES)}
            arch = metadata["general.architecture"].value
        else:
            arch = gguf_architecture(source.config(), source.label)
            metadata = metadata_from_hf(source.folder, source.config(), arch, "")
        metadata[f"{arch}.block_count"] = MetaValue.uint32(layers)
        metadata["general.name"] = MetaValue.string(self.job.output.name.removesuffix(".gguf"))
        metadata["general.file_type"] = MetaValue.uint32(FILE_TYPES[self.file_type])
        metadata["general.quantization_version"] = MetaValue.uint32(2)
        inputs = list(dict.fromkeys(self.job.experts + ([self.job.base] if self.job.base else [])))
        metadata["general.base_model.count"] = MetaValue.uint32(len(inputs))
        for index, reference in enumerate(inputs):
            metadata[f"general.base_model.{index}.name"] = MetaValue.string(str(reference))
        for key, value in provenance(self.job).items():
            metadata[f"lowmem_merge.{key}"] = MetaValue.string(value)
        return metadata

    def commit(self, tasks: list[TensorTask], layers: int | None) -> None:
        self.staged.commit(self.file_names)


def _input_file_type(model: Model) -> str:
    """A GGUF input's own file type (Q4_K_M, ...), or the float dtype of safetensors input."""
    if model.is_gguf and "general.file_type" in model.gguf_metadata:
        raw = model.gguf_metadata["general.file_type"].value
        try:
            name = LlamaFileType(raw).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            name = str(raw)
        if name in FILE_TYPES:
            return name
        raise MergeError(f"{model.label}: its GGUF file type {name} cannot be written; choose"
                         f" an output type with --dtype ({', '.join(FILE_TYPES)})")
    dtypes = {t.dtype for t in model.tensors.values() if t.dtype in ENCODINGS and t.numel > 1}
    if "BF16" in dtypes:
        return "BF16"
    return "F16" if "F16" in dtypes else "F32"


def _check_replaced(folder: Path, names: list[str], force: bool) -> None:
    for name in names:
        if (folder / name).exists() and not force:
            raise MergeError(f"{folder / name}: already exists; pass --force to replace it")


OutputFormat = SafetensorsOutput | GGUFOutput


def output_format(job: MergeJob, models: dict[str, Model]) -> OutputFormat:
    if job.output_format == "gguf":
        return GGUFOutput(job, models)
    return SafetensorsOutput(job, models)

