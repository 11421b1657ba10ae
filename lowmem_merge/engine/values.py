"""Reading one chunk of one input tensor as values the kernels take.

Plain bf16/f16/f32 data is read straight into the stack when its encoding is
the stack's; anything else is read raw into scratch, put in row order when
the tensor is presented under the other format's names, and decoded there.
Block-quantized GGUF data decodes to float32.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from gguf import GGMLQuantizationType

from .. import kernels
from ..io import RangeReader, TensorInfo
from ..io.gguf_names import qk_row_order
from ..kernels.gguf_quants import (
    FALLBACK_WORKING_BYTES,
    decodes_in_numba,
    dequantize_into,
)

ENCODINGS = {"BF16": kernels.BF16, "F16": kernels.F16, "F32": kernels.F32}
# Stored bits of each encoding are held in unsigned integers of the same width.
STORAGE = {kernels.BF16: "uint16", kernels.F16: "uint16", kernels.F32: "uint32"}


def value_encoding(dtype: str) -> int:
    """Encoding of a dtype's values in the kernels: its own, or float32 for block formats."""
    return ENCODINGS.get(dtype, kernels.F32)


def decode_working_bytes(infos: list[TensorInfo]) -> int:
    """Memory the decoders need beside the buffers: gguf.quants' temporaries, if used."""
    slow = any(info.dtype not in ENCODINGS and not decodes_in_numba(GGMLQuantizationType[
        info.dtype]) for info in infos)
    return FALLBACK_WORKING_BYTES if slow else 0


def raw_bytes_per_element(info: TensorInfo) -> float:
    return info.bytes_per_block / info.block_elements


def is_direct(info: TensorInfo, encoding: int) -> bool:
    """Whether the tensor's bytes are already the values wanted, in order."""
    return ENCODINGS.get(info.dtype) == encoding and not info.permute_heads


@lru_cache(maxsize=64)
def _row_order(rows: int, heads: int, to_gguf: bool) -> np.ndarray:
    return qk_row_order(rows, heads, to_gguf)


def _in_row_order(info: TensorInfo, start: int, raw: np.ndarray, spare: np.ndarray) -> np.ndarray:
    """Stored rows of whole heads -> the presented row order (rows move within a head)."""
    rows, columns = info.shape[0], info.numel // max(info.shape[0], 1)
    row_bytes = columns // info.block_elements * info.bytes_per_block
    first, count = start // columns, raw.shape[0] // row_bytes
    local = _row_order(rows, info.permute_heads, info.permute_to_gguf)[first:first + count] - first
    ordered = spare[: raw.shape[0]].reshape(count, -1)
    np.take(raw.reshape(count, -1), local, axis=0, out=ordered)
    return ordered.reshape(-1)


def read_values(reader: RangeReader, info: TensorInfo, start: int, target: np.ndarray,
                encoding: int, scratch: np.ndarray, spare: np.ndarray) -> int:
    """Fill target (encoding's storage) with elements [start, start + len(target)) of info.

    Returns the bytes read from disk.
    """
    offset, length = info.byte_span(start, target.shape[0])
    if is_direct(info, encoding):
        reader.read_into(info.path, offset, memoryview(target))
        return length
    raw = scratch[:length]
    reader.read_into(info.path, offset, memoryview(raw))
    if info.permute_heads:
        raw = _in_row_order(info, start, raw, spare)
    if info.dtype in ENCODINGS:
        own = ENCODINGS[info.dtype]
        kernels.transcode(raw.view(STORAGE[own]), own, target, encoding)
    else:
        dequantize_into(raw, GGMLQuantizationType[info.dtype], target.view(np.float32))
    return length


def encode_output(dtype: str, values: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Block-quantize float32 values (stored as uint32 bits) into out; the bytes to write."""
    kernels.quantize_into(values.view(np.float32), GGMLQuantizationType[dtype], out)
    return out
