"""Readers and writers: model catalogs, positioned reads, streaming shard writes."""

from .model import Model, open_local_model
from .output_folder import OutputFiles, OutputFolder, check_output_path
from .safetensors_reader import DTYPE_SIZES, RangeReader, TensorInfo, read_safetensors_header
from .safetensors_writer import OutputTensor, ShardedSafetensorsWriter
from .sources import open_model

__all__ = [
    "DTYPE_SIZES",
    "Model",
    "OutputFiles",
    "OutputFolder",
    "OutputTensor",
    "RangeReader",
    "ShardedSafetensorsWriter",
    "TensorInfo",
    "check_output_path",
    "open_local_model",
    "open_model",
    "read_safetensors_header",
]
