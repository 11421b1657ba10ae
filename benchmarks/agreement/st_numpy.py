"""A small safetensors reader on numpy memory maps, BF16 included.

safetensors' own numpy loader cannot return BF16, so tensors are kept as flat
views of their stored bits (floats as unsigned integers of their width) and
decoded exactly to float64 on demand: BF16 by shifting its 16 bits into the
high half of a float32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# dtype: (storage unsigned type, numpy float type or None, exponent bits, mantissa bits)
FLOATS = {"BF16": (np.uint16, None, 8, 7), "F16": (np.uint16, np.float16, 5, 10),
          "F32": (np.uint32, np.float32, 8, 23), "F64": (np.uint64, np.float64, 11, 52)}
OTHERS = {"I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
          "U8": np.uint8, "BOOL": np.uint8}


@dataclass
class Tensor:
    dtype: str
    shape: tuple[int, ...]
    raw: np.ndarray  # flat view of the stored bits (floats: unsigned ints of their width)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOATS

    def values(self) -> np.ndarray:
        """The elements as float64 (exact for every float dtype here)."""
        if self.dtype == "BF16":
            return (self.raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        if self.is_float:
            return self.raw.view(FLOATS[self.dtype][1]).astype(np.float64)
        return self.raw.astype(np.float64)

    def ulps(self) -> np.ndarray:
        """The spacing of the format at each element (float dtypes only).

        For a normal value x it is 2**(exponent(x) - mantissa bits); zeros and
        subnormals get the subnormal spacing (2**-133 for BF16).
        """
        _, _, exp_bits, man_bits = FLOATS[self.dtype]
        bias = (1 << (exp_bits - 1)) - 1
        exponent = (self.raw >> man_bits).astype(np.int64) & ((1 << exp_bits) - 1)
        return np.ldexp(1.0, np.maximum(exponent, 1) - bias - man_bits)


def _read_file(path: Path) -> dict[str, Tensor]:
    data = np.memmap(path, dtype=np.uint8, mode="r")
    size = int(data[:8].view("<u8")[0])
    header = json.loads(bytes(data[8:8 + size]))
    header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        begin, end = (8 + size + offset for offset in info["data_offsets"])
        dtype = info["dtype"]
        storage = FLOATS[dtype][0] if dtype in FLOATS else OTHERS[dtype]
        raw = data[begin:end].view(np.dtype(storage).newbyteorder("<"))
        tensors[name] = Tensor(dtype, tuple(info["shape"]), raw)
    return tensors


def read_model(folder: Path) -> dict[str, Tensor]:
    """Every tensor of every ``*.safetensors`` file in folder (shards included)."""
    tensors: dict[str, Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(_read_file(path))
    return tensors


# config.json keys compared (transformers versions write different sets of the rest)
CONFIG_KEYS = ("architectures", "model_type", "hidden_size", "intermediate_size",
               "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "vocab_size", "tie_word_embeddings", "dtype")


def read_config(folder: Path) -> dict[str, Any]:
    """The compared keys of config.json; ``dtype`` is also read from ``torch_dtype``."""
    path = folder / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    config.setdefault("dtype", config.get("torch_dtype"))
    return {key: config.get(key) for key in CONFIG_KEYS}
