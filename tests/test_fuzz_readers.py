"""Property-based fuzzing of both readers: any bytes give a valid catalog or one clear error.

Runs a short campaign by default; set LOWMEM_FUZZ_EXAMPLES (e.g. 20000) for a long one:

    LOWMEM_FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz_readers.py
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowmem_merge.errors import InputFileError, MergeError
from lowmem_merge.io import open_local_model
from lowmem_merge.io.gguf_reader import read_gguf_header
from lowmem_merge.io.gguf_values import MetaValue
from lowmem_merge.io.gguf_writer import GGUFFileWriter
from lowmem_merge.io.safetensors_reader import RangeReader, read_safetensors_header
from lowmem_merge.io.safetensors_writer import OutputTensor

EXAMPLES = int(os.environ.get("LOWMEM_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 200,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def valid_safetensors() -> bytes:
    header = {"__metadata__": {"format": "pt"},
              "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]}}
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + bytes(range(32))


def valid_gguf(folder: Path) -> bytes:
    tensors = [OutputTensor("token_embd.weight", "F32", (2, 4), 32),
               OutputTensor("blk.0.attn_q.weight", "Q8_0", (1, 32), 34)]
    metadata = {"general.architecture": MetaValue.string("llama"),
                "tokenizer.ggml.tokens": MetaValue.array(MetaValue.string("x").type, ["a", "b"]),
                "llama.block_count": MetaValue.uint32(1)}
    writer = GGUFFileWriter(folder, "seed", tensors, metadata)
    writer.write(memoryview(bytes(66)))
    writer.finish()
    return (folder / "seed.gguf").read_bytes()


mutations = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8)


def mutate(data: bytes, flips, cut: int | None) -> bytes:
    buffer = bytearray(data)
    for position, value in flips:
        buffer[position % len(buffer)] = value
    return bytes(buffer[:cut] if cut is not None else buffer)


def check_catalog(path: Path, tensors) -> None:
    """A header that parsed describes data inside the file, readable without surprises."""
    size = path.stat().st_size
    reader = RangeReader()
    try:
        for info in tensors.values():
            assert info.offset >= 0 and info.offset + info.nbytes <= size
            reader.read_into(info.path, info.offset, memoryview(bytearray(info.nbytes)))
    finally:
        reader.close()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    return folder, valid_safetensors(), valid_gguf(folder)


@FUZZ
@given(flips=mutations, cut=st.one_of(st.none(), st.integers(0, 400)))
def test_mutated_safetensors(seeds, flips, cut):
    folder, seed, _ = seeds
    path = folder / "case.safetensors"
    path.write_bytes(mutate(seed, flips, cut))
    try:
        tensors, _ = read_safetensors_header(path)
    except InputFileError as error:
        assert str(path) in str(error)
        return
    check_catalog(path, tensors)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                               max_size=4),
    max_leaves=12)
entries = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "BF16", "F16", "I64", "U8", "Q4_K", "bogus"]) | json_values,
    "shape": st.lists(st.integers(-2, 2**40), max_size=4) | json_values,
    "data_offsets": st.lists(st.integers(-2, 2**40), max_size=3) | json_values,
}) | json_values


@FUZZ
@given(header=st.dictionaries(st.text(max_size=10), entries, max_size=5),
       data=st.binary(max_size=64), length_delta=st.integers(-3, 3))
def test_generated_safetensors_headers(seeds, header, data, length_delta):
    folder = seeds[0]
    path = folder / "generated.safetensors"
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", max(len(encoded) + length_delta, 0)) + encoded + data)
    try:
        tensors, _ = read_safetensors_header(path)
    except InputFileError as error:
        assert str(path) in str(error)
        return
    check_catalog(path, tensors)


@FUZZ
@given(weight_map=st.dictionaries(st.text(max_size=6), st.sampled_from(
    ["model.safetensors", "../model.safetensors", "/etc/passwd", "missing.safetensors", "",
     "sub/model.safetensors", "a\x00b"]) | json_values, max_size=4))
def test_generated_index_files(seeds, weight_map):
    folder = seeds[0] / "indexed"
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors").write_bytes(valid_safetensors())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    try:
        model = open_local_model(folder)
    except MergeError:
        return
    assert all(info.path.parent.resolve() == folder.resolve()
               for info in model.tensors.values())


@FUZZ
@given(flips=mutations, cut=st.one_of(st.none(), st.integers(0, 700)))
def test_mutated_gguf(seeds, flips, cut):
    folder, _, seed = seeds
    path = folder / "case.gguf"
    path.write_bytes(mutate(seed, flips, cut))
    try:
        header = read_gguf_header(path)
    except InputFileError as error:
        assert str(path) in str(error)
        return
    check_catalog(path, header.tensors)


@FUZZ
@given(version=st.sampled_from([2, 3]) | st.integers(0, 2**32 - 1),
       counts=st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
       body=st.binary(max_size=300))
def test_generated_gguf_headers(seeds, version, counts, body):
    path = seeds[0] / "generated.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", version, *counts) + body
                     + np.zeros(64, np.uint8).tobytes())
    try:
        header = read_gguf_header(path)
    except InputFileError as error:
        assert str(path) in str(error)
        return
    check_catalog(path, header.tensors)
