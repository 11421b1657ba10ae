"""Test helpers written independently of the package: raw safetensors files and references."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

WIDTH = {"BF16": 2, "F16": 2, "F32": 4, "I64": 8}


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 values to bf16 bits, nearest-even (NaN inputs not used here)."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_values(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def encode(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return bf16_bits(values.astype(np.float32))
    if dtype == "F16":
        return values.astype(np.float16)
    if dtype == "F32":
        return values.astype(np.float32)
    return values.astype(np.int64)


def decode(raw: bytes, dtype: str, shape) -> np.ndarray:
    if dtype == "BF16":
        return bf16_values(np.frombuffer(raw, np.uint16)).reshape(shape)
    numpy_dtype = {"F16": np.float16, "F32": np.float32, "I64": np.int64}[dtype]
    return np.frombuffer(raw, numpy_dtype).astype(np.float64).reshape(shape)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "F32",
                      dtypes: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """Write tensors (rounded to dtype); return the values as stored, in float64."""
    header, blobs, stored, offset = {}, [], {}, 0
    for name, values in tensors.items():
        kind = (dtypes or {}).get(name, dtype)
        data = encode(np.asarray(values), kind).tobytes()
        header[name] = {"dtype": kind, "shape": list(np.shape(values)),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        stored[name] = decode(data, kind, np.shape(values))
        offset += len(data)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))
    return stored


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of a file or model folder as float64, and their dtypes."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    values, dtypes = {}, {}
    for file in files:
        data = file.read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + length])
        header.pop("__metadata__", None)
        start = 8 + length
        for name, entry in header.items():
            lo, hi = entry["data_offsets"]
            values[name] = decode(data[start + lo:start + hi], entry["dtype"], entry["shape"])
            dtypes[name] = entry["dtype"]
    return values, dtypes


def bf16_ulp(values: np.ndarray) -> np.ndarray:
    """Spacing of bf16 numbers at each value's magnitude."""
    magnitude = np.maximum(np.abs(values), np.finfo(np.float32).tiny)
    return 2.0 ** (np.floor(np.log2(magnitude)) - 7)


def assert_bf16_rounded(actual: np.ndarray, reference: np.ndarray) -> None:
    """actual is the bf16 rounding of the float64 reference: within half an ulp of it."""
    error = np.abs(actual - reference)
    # A float64 computation in any order is off by ~1e-16 of the inputs; near zero that
    # noise is all there is.
    bound = 0.5 * bf16_ulp(reference) * (1 + 1e-9) + 1e-15 * np.max(np.abs(reference))
    worst = np.argmax(error / bound)
    assert np.all(error <= bound), (
        f"element {worst}: got {actual.flat[worst]!r}, reference {reference.flat[worst]!r}")


def assert_f32_close(actual: np.ndarray, reference: np.ndarray) -> None:
    bound = 1e-6 * np.abs(reference) + 1e-15 * np.max(np.abs(reference))
    error = np.abs(actual - reference)
    worst = np.argmax(error / np.maximum(bound, 1e-300))
    assert np.all(error <= bound), (
        f"element {worst}: got {actual.flat[worst]!r}, reference {reference.flat[worst]!r}")
