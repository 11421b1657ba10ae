"""Inputs: folders, shards, indexes, bad files; each problem is one clear error, nothing written."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from helpers import read_safetensors, write_safetensors

import lowmem_merge
from lowmem_merge.errors import MergeError
from lowmem_merge.io import open_model

TENSORS = {"a.weight": np.arange(12.0).reshape(3, 4), "b.weight": np.ones(5)}


def raw_file(path, header: bytes | dict, data: bytes = b"", length: int | None = None):
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


ENTRY = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


@pytest.mark.parametrize("header, data, length, message", [
    (b"{}", b"", 10**12, "header length"),
    (b"{not json", b"", None, "not valid JSON"),
    (b"[1, 2]", b"", None, "not a JSON object"),
    ({"w": {**ENTRY, "dtype": "F17"}}, bytes(16), None, "unknown dtype 'F17'"),
    ({"w": {**ENTRY, "data_offsets": [0, 32]}}, bytes(16), None, "outside"),
    ({"w": {**ENTRY, "shape": [3, 2]}}, bytes(16), None, "needs 24 bytes"),
    ({"w": {**ENTRY, "shape": [2, -2]}}, bytes(16), None, "not a list of sizes"),
    ({"w": ENTRY, "v": {**ENTRY, "data_offsets": [8, 24]}}, bytes(24), None, "overlap"),
])
def test_bad_headers_name_the_file_and_problem(tmp_path, header, data, length, message):
    path = raw_file(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(MergeError) as caught:
        open_model(path)
    assert str(path) in str(caught.value) and message in str(caught.value)


def test_too_short_file(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"abc")
    with pytest.raises(MergeError, match="too short"):
        open_model(tmp_path / "x.safetensors")


def test_folder_of_shards_without_index(tmp_path):
    write_safetensors(tmp_path / "m" / "part1.safetensors", {"a.weight": TENSORS["a.weight"]})
    write_safetensors(tmp_path / "m" / "part2.safetensors", {"b.weight": TENSORS["b.weight"]})
    assert set(open_model(tmp_path / "m").tensors) == set(TENSORS)


def test_duplicate_tensor_across_shards(tmp_path):
    write_safetensors(tmp_path / "m" / "part1.safetensors", TENSORS)
    write_safetensors(tmp_path / "m" / "part2.safetensors", {"b.weight": np.ones(5)})
    with pytest.raises(MergeError, match="'b.weight' is also in part1"):
        open_model(tmp_path / "m")


def write_indexed(folder, weight_map):
    write_safetensors(folder / "s1.safetensors", {"a.weight": TENSORS["a.weight"]})
    write_safetensors(folder / "s2.safetensors", {"b.weight": TENSORS["b.weight"]})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_index_maps_tensors_to_shards(tmp_path):
    write_indexed(tmp_path, {"a.weight": "s1.safetensors", "b.weight": "s2.safetensors"})
    model = open_model(tmp_path)
    assert model.tensors["b.weight"].path.name == "s2.safetensors"


@pytest.mark.parametrize("target, message", [
    ("../s1.safetensors", "outside the model folder"),
    ("/etc/passwd", "outside the model folder"),
    ("missing.safetensors", "missing file"),
    ("s1.safetensors", "not in s1.safetensors"),
])
def test_bad_index_entries(tmp_path, target, message):
    folder = tmp_path / "m"
    write_indexed(folder, {"a.weight": "s1.safetensors", "b.weight": target})
    with pytest.raises(MergeError, match=message):
        open_model(folder)


def test_pickled_checkpoints_are_refused_with_a_conversion_hint(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    for target in (tmp_path / "m", tmp_path / "m" / "pytorch_model.bin"):
        with pytest.raises(MergeError, match="save_pretrained"):
            open_model(target)


def test_unknown_path_and_hub_like_name(tmp_path):
    with pytest.raises(MergeError, match="no such file"):
        open_model(tmp_path / "nothing" / "here")


def test_mismatched_tensors_name_them_and_write_nothing(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", TENSORS)
    write_safetensors(tmp_path / "b.safetensors", {"a.weight": np.ones((4, 3)),
                                                   "c.weight": np.ones(5)})
    out = tmp_path / "out"
    with pytest.raises(MergeError) as caught:
        lowmem_merge.merge([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], "linear",
                           out)
    message = str(caught.value)
    assert "'a.weight' has shape [3, 4]" in message and "[4, 3]" in message
    assert "'b.weight' is in" in message and "'c.weight' is in" in message
    assert "a.safetensors" in message and "b.safetensors" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


def test_output_inside_an_input_or_existing_is_refused(tmp_path):
    write_safetensors(tmp_path / "m" / "model.safetensors", TENSORS)
    with pytest.raises(MergeError, match="inside the input"):
        lowmem_merge.merge([tmp_path / "m"], "linear", tmp_path / "m" / "out")
    (tmp_path / "exists").mkdir()
    with pytest.raises(MergeError, match="--force"):
        lowmem_merge.merge([tmp_path / "m"], "linear", tmp_path / "exists")


def test_sharded_output_with_index_and_companion_files(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {f"model.layers.{i}.w": rng.standard_normal((64, 64)) for i in range(6)}
    for name in ("a", "b"):
        write_safetensors(tmp_path / name / "model.safetensors", tensors, "BF16")
    (tmp_path / "a" / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    (tmp_path / "a" / "tokenizer.json").write_text("{}")
    out = tmp_path / "out"
    lowmem_merge.merge([tmp_path / "a", tmp_path / "b"], "linear", out, shard_size="20KB",
                       dtype="float32")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-{i:05d}-of-00006.safetensors" for i in range(1, 7)]
    assert index["metadata"]["total_size"] == 6 * 64 * 64 * 4
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert (out / "tokenizer.json").read_text() == "{}"
    from safetensors import safe_open

    for shard in shards:
        with safe_open(out / shard, "numpy") as handle:
            assert handle.metadata()["format"] == "pt"
            for key in handle.keys():  # noqa: SIM118 - safe_open is not iterable
                np.testing.assert_allclose(handle.get_tensor(key),
                                           read_safetensors(tmp_path / "a")[0][key])


def test_weights_count_must_match(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", TENSORS)
    with pytest.raises(MergeError, match="--weights has 2 values for 1 models"):
        lowmem_merge.merge([tmp_path / "a.safetensors"], "linear", tmp_path / "o",
                           weights=[1, 2])


@pytest.mark.parametrize("method, kwargs, message", [
    ("slerp", {}, "needs parameter 't'"),
    ("linear", {"t": 0.5}, "has no parameter 't'"),
    ("karcher", {"max_iter": 2.5}, "max_iter must be int"),
    ("task_arithmetic", {}, "needs a base model"),
])
def test_parameter_errors_before_any_work(tmp_path, method, kwargs, message):
    write_safetensors(tmp_path / "a.safetensors", TENSORS)
    write_safetensors(tmp_path / "b.safetensors", TENSORS)
    with pytest.raises(MergeError, match=message):
        lowmem_merge.merge([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], method,
                           tmp_path / "o", **kwargs)
    assert not (tmp_path / "o").exists()


def test_writeback_flushes_windows_behind_the_writer(tmp_path):
    import os

    from lowmem_merge.io.writeback import WriteBack

    data = np.random.default_rng(1).bytes(100_000)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    writeback = WriteBack(fd, window=4096)
    for start in range(0, len(data), 777):
        os.write(fd, data[start:start + 777])
        writeback.wrote(min(start + 777, len(data)))
    os.close(fd)
    assert writeback.started == len(data) // 4096 * 4096
    assert writeback.dropped == writeback.started - 4096
    assert (tmp_path / "f").read_bytes() == data


def test_nan_and_inf_are_named_in_a_warning_or_stop_the_merge(tmp_path, caplog):
    rng = np.random.default_rng(0)
    clean = rng.standard_normal((4, 70000)).astype(np.float32)
    dirty = clean.copy()
    dirty[1, 5] = np.nan
    dirty[3, 69999] = np.inf  # in the second chunk of 65,536 elements
    write_safetensors(tmp_path / "a.safetensors", {"w": clean, "v": clean[0]})
    write_safetensors(tmp_path / "b.safetensors", {"w": dirty, "v": clean[0]})
    inputs = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    with caplog.at_level("WARNING"):
        lowmem_merge.merge(inputs, "linear", tmp_path / "out", chunk_elements=65536)
    warnings = [r.getMessage() for r in caplog.records if "NaN or Inf" in r.getMessage()]
    assert warnings == [f"{tmp_path / 'b.safetensors'}: tensor w holds 2 NaN or Inf values;"
                        " the merge carries them into the output (--nan-policy error stops"
                        " instead)"]
    with pytest.raises(MergeError, match=r"b\.safetensors: tensor w holds NaN or Inf"):
        lowmem_merge.merge(inputs, "linear", tmp_path / "stopped", chunk_elements=65536,
                           nan_policy="error")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors",
                                                          "out"]
