"""GGUF files: our writer read back by the gguf package's reader, and hostile headers refused."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from lowmem_merge.errors import InputFileError
from lowmem_merge.io.gguf_reader import read_gguf_header, split_paths
from lowmem_merge.io.gguf_values import MetaValue
from lowmem_merge.io.gguf_writer import GGUFFileWriter
from lowmem_merge.io.safetensors_writer import OutputTensor

VT = gguf.GGUFValueType


def _write(folder: Path, tensors: dict[str, np.ndarray], metadata=None, split_size=None,
           types=None) -> GGUFFileWriter:
    outputs = [OutputTensor(name, (types or {}).get(name, "F32"), array.shape, array.nbytes)
               for name, array in tensors.items()]
    writer = GGUFFileWriter(folder, "model", outputs, metadata or {}, split_size)
    for array in tensors.values():
        data = memoryview(array.tobytes())
        for start in range(0, len(data), 7):  # odd write sizes cross tensor boundaries
            writer.write(data[start:start + 7])
    writer.finish()
    return writer


def test_written_file_reads_back_with_the_gguf_package(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": rng.standard_normal((5, 3)).astype(np.float32),
               "blk.0.attn_norm.weight": rng.standard_normal(3).astype(np.float16),
               "empty": np.zeros((0, 4), np.float32),
               "ids": np.arange(9, dtype=np.int32).reshape(3, 3)}
    metadata = {"general.architecture": MetaValue.string("llama"),
                "llama.block_count": MetaValue.uint32(1),
                "f": MetaValue.float32(0.5), "b": MetaValue.boolean(True),
                "tokens": MetaValue.array(VT.STRING, ["a", "é", ""]),
                "scores": MetaValue.array(VT.FLOAT32, [0.25, -1.0]),
                "i64": MetaValue(VT.INT64, -(2**40))}
    _write(tmp_path, tensors, metadata,
           types={"blk.0.attn_norm.weight": "F16", "ids": "I32"})
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["tokens"].contents() == ["a", "é", ""]
    assert reader.fields["scores"].contents() == [0.25, -1.0]
    assert reader.fields["i64"].contents() == -(2**40)
    assert reader.fields["b"].contents() is True
    read = {t.name: t for t in reader.tensors}
    for name, array in tensors.items():
        assert list(read[name].shape[::-1]) == list(array.shape) or array.size == 0
        np.testing.assert_array_equal(np.asarray(read[name].data).reshape(array.shape), array)
    ours = read_gguf_header(tmp_path / "model.gguf")
    assert ours.metadata == metadata
    assert {n: (t.dtype, t.shape) for n, t in ours.tensors.items()} == {
        "token_embd.weight": ("F32", (5, 3)), "blk.0.attn_norm.weight": ("F16", (3,)),
        "empty": ("F32", (0, 4)), "ids": ("I32", (3, 3))}


def test_split_files_follow_gguf_split_naming_and_keys(tmp_path):
    tensors = {f"t{i}": np.full((64,), i, np.float32) for i in range(5)}
    writer = _write(tmp_path, tensors, {"general.architecture": MetaValue.string("llama")},
                    split_size=600)
    assert writer.file_names == [f"model-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    first = gguf.GGUFReader(tmp_path / writer.file_names[0])
    assert first.fields["split.count"].contents() == 3
    assert first.fields["split.tensors.count"].contents() == 5
    assert first.fields["general.architecture"].contents() == "llama"
    second = gguf.GGUFReader(tmp_path / writer.file_names[1])
    assert second.fields["split.no"].contents() == 1
    assert "general.architecture" not in second.fields
    assert split_paths(tmp_path / writer.file_names[0]) == [tmp_path / n
                                                            for n in writer.file_names]
    with pytest.raises(InputFileError, match="not the first file"):
        split_paths(tmp_path / writer.file_names[1])
    (tmp_path / writer.file_names[2]).unlink()
    with pytest.raises(InputFileError, match="missing"):
        split_paths(tmp_path / writer.file_names[0])


def _header(version=3, tensor_count=1, kv_count=1, kv=None, tensor=None) -> bytes:
    kv = kv if kv is not None else _kv("general.architecture", VT.STRING, _str("llama"))
    tensor = tensor if tensor is not None else _tensor_entry("w", (4, 2), 0, 0)
    return b"GGUF" + struct.pack("<IQQ", version, tensor_count, kv_count) + kv + tensor


def _str(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


def _kv(key: str, value_type, payload: bytes) -> bytes:
    return _str(key) + struct.pack("<I", value_type) + payload


def _tensor_entry(name: str, dims, ggml_type: int, offset: int) -> bytes:
    return _str(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


def _file(tmp_path: Path, header: bytes, data_bytes: int = 32) -> Path:
    path = tmp_path / "bad.gguf"
    header += bytes(-len(header) % 32)
    path.write_bytes(header + bytes(data_bytes))
    return path


HOSTILE = {
    "wrong magic": (lambda: b"GGUX" + _header()[4:], "not a GGUF file"),
    "version 1": (lambda: _header(version=1), "version 1 is not supported"),
    "version 99": (lambda: _header(version=99), "version 99"),
    "huge tensor count": (lambda: _header(tensor_count=2**60), "tensor count"),
    "huge metadata count": (lambda: _header(kv_count=2**40), "metadata count"),
    "string past the end": (lambda: _header(kv=_str("k")[:8] + struct.pack("<Q", 2**50)),
                            "truncated|metadata key"),
    "unknown value type": (lambda: _header(kv=_kv("k", 99, b"")), "unknown value type 99"),
    "array length past end": (lambda: _header(
        kv=_kv("k", VT.ARRAY, struct.pack("<IQ", VT.UINT32, 2**40))), "length of 'k'"),
    "unknown ggml type": (lambda: _header(tensor=_tensor_entry("w", (4, 2), 250, 0)),
                          "unknown ggml type 250"),
    "five dimensions": (lambda: _header(tensor=_tensor_entry("w", (1, 1, 1, 1, 1), 0, 0)),
                        "5 dimensions"),
    "offset outside": (lambda: _header(tensor=_tensor_entry("w", (4, 2), 0, 4096)),
                       "beyond the end of the file"),
    "misaligned offset": (lambda: _header(tensor=_tensor_entry("w", (2, 1), 0, 4)),
                          "not a multiple of the alignment"),
    "partial block": (lambda: _header(tensor=_tensor_entry("w", (16, 1), 8, 0)),
                      "not whole Q8_0 blocks"),
    "overlap": (lambda: _header(tensor_count=2, tensor=_tensor_entry("a", (4,), 0, 0)
                                + _tensor_entry("b", (4,), 0, 0)), "overlap"),
    "duplicate tensor": (lambda: _header(tensor_count=2, tensor=_tensor_entry("a", (4,), 0, 0)
                                         + _tensor_entry("a", (4,), 0, 32)), "appears twice"),
    "bad alignment": (lambda: _header(kv=_kv("general.alignment", VT.UINT32,
                                             struct.pack("<I", 24))), "general.alignment"),
    "invalid utf-8 key": (lambda: _header(kv=struct.pack("<Q", 2) + b"\xff\xfe"
                                          + struct.pack("<I", VT.UINT8) + b"\x00"), "UTF-8"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers_get_one_clear_error_naming_the_file(tmp_path, case):
    make, message = HOSTILE[case]
    path = _file(tmp_path, make())
    with pytest.raises(InputFileError, match=message) as error:
        read_gguf_header(path)
    assert str(path) in str(error.value)


def test_truncated_file_is_refused_at_every_cut(tmp_path):
    tensors = {"a": np.ones((4, 8), np.float32), "b": np.ones(16, np.float32)}
    _write(tmp_path, tensors, {"general.architecture": MetaValue.string("llama"),
                               "tokens": MetaValue.array(VT.STRING, ["x", "yy"])})
    whole = (tmp_path / "model.gguf").read_bytes()
    cut_path = tmp_path / "cut.gguf"
    for cut in range(0, len(whole) - 1, 5):
        cut_path.write_bytes(whole[:cut])
        with pytest.raises(InputFileError):
            read_gguf_header(cut_path)
