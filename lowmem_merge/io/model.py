"""A model on disk: a catalog of tensors over one or many safetensors shards."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputFileError, MergeError
from .gguf_reader import read_gguf_header, split_paths
from .gguf_values import Metadata
from .safetensors_reader import TensorInfo, read_safetensors_header

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files a merged model needs beside its weights, copied from the base or first model.
COMPANION_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "chat_template.json", "chat_template.jinja",
)
PICKLE_HINT = (
    "pickled PyTorch checkpoints are refused because loading them can run arbitrary code;"
    " convert it once in a trusted environment, for example with transformers:"
    " AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True)"
)


@dataclass
class Model:
    """Tensors of one model by name, in file order, plus its companion files."""

    label: str
    folder: Path | None
    tensors: dict[str, TensorInfo]
    is_folder: bool = True  # False when opened as a single file
    gguf_metadata: Metadata | None = None  # the first file's metadata for GGUF models

    @property
    def is_gguf(self) -> bool:
        return self.gguf_metadata is not None

    def companion_files(self) -> list[Path]:
        if self.folder is None or self.is_gguf:
            return []
        return [self.folder / name for name in COMPANION_FILES if (self.folder / name).is_file()]

    def config(self) -> dict:
        path = self.folder / "config.json" if self.folder else None
        if path is None or not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputFileError(path, f"not valid JSON ({exc})") from None


def open_local_model(path: Path, label: str | None = None) -> Model:
    """Open a .safetensors file or a folder of shards (with or without an index)."""
    label = label or str(path)
    if path.is_file() and path.suffix == ".gguf":
        return open_gguf_model(path, label)
    if path.is_file():
        _refuse_non_safetensors(path)
        tensors, _ = read_safetensors_header(path)
        return Model(label, path.parent, tensors, is_folder=False)
    if not path.is_dir():
        raise MergeError(f"{path}: no such file or folder")
    index = path / INDEX_NAME
    if index.is_file():
        return Model(label, path, _tensors_from_index(path, index))
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        pickled = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickled:
            raise InputFileError(path / pickled[0], PICKLE_HINT)
        raise MergeError(f"{path}: no .safetensors files in this folder")
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        shard_tensors, _ = read_safetensors_header(shard)
        for name, info in shard_tensors.items():
            if name in tensors:
                raise InputFileError(
                    shard, f"tensor {name!r} is also in {tensors[name].path.name}")
            tensors[name] = info
    return Model(label, path, tensors)


def _refuse_non_safetensors(path: Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise InputFileError(path, PICKLE_HINT)
    if path.suffix != ".safetensors":
        raise InputFileError(path, "expected a .safetensors or .gguf file or a model folder")


def open_gguf_model(path: Path, label: str) -> Model:
    """A GGUF file, or all files of a split GGUF given its first file."""
    tensors: dict[str, TensorInfo] = {}
    metadata = None
    for part in split_paths(path):
        header = read_gguf_header(part)
        metadata = metadata if metadata is not None else header.metadata
        for name, info in header.tensors.items():
            if name in tensors:
                raise InputFileError(part, f"tensor {name!r} is also in {tensors[name].path.name}")
            tensors[name] = info
    return Model(label, path.parent, tensors, is_folder=False, gguf_metadata=metadata)


def _tensors_from_index(folder: Path, index: Path) -> dict[str, TensorInfo]:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise InputFileError(index, f"not a valid index ({exc})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputFileError(index, "has no weight_map object")
    root = folder.resolve()
    headers: dict[str, dict[str, TensorInfo]] = {}
    tensors: dict[str, TensorInfo] = {}
    for name, file_name in weight_map.items():
        if not isinstance(file_name, str) or not file_name or "\x00" in file_name:
            raise InputFileError(index, f"weight_map[{name!r}] = {file_name!r} is not a file"
                                 " name")
        shard = (folder / file_name).resolve()
        if shard.parent != root:
            raise InputFileError(
                index, f"weight_map[{name!r}] = {file_name!r} points outside the model folder")
        if file_name not in headers:
            if not shard.is_file():
                raise InputFileError(index,
                                     f"weight_map[{name!r}] names missing file {file_name!r}")
            headers[file_name], _ = read_safetensors_header(folder / file_name)
        if name not in headers[file_name]:
            raise InputFileError(index, f"tensor {name!r} is not in {file_name}")
        tensors[name] = headers[file_name][name]
    return tensors
