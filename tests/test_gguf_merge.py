"""GGUF in and out, end to end, against references written here.

Inputs in GGUF are written with the gguf package's own writer and quantizers;
names and the q/k row permutation come from a table and a numpy reshape
written in this file, independent of the package's name map.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from helpers import read_safetensors

from lowmem_merge import merge
from lowmem_merge.errors import MergeError
from lowmem_merge.synthetic import LlamaShape, write_experts

SHAPE = LlamaShape(hidden_size=512, intermediate_size=768, num_hidden_layers=2,
                   num_attention_heads=8, num_key_value_heads=2, vocab_size=300)
CHUNK = 65536
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[rest]}"


def permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter order of q/k rows: the two rotary halves of each head interleaved."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, -1).swapaxes(1, 2).reshape(weight.shape)


def to_gguf_layout(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, value in tensors.items():
        if name.endswith("q_proj.weight"):
            value = permute(value, SHAPE.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            value = permute(value, SHAPE.num_key_value_heads)
        out[gguf_name(name)] = value
    return out


def write_reference_gguf(path, tensors: dict[str, np.ndarray], qtype) -> dict[str, np.ndarray]:
    """A GGUF written by the gguf package (2-D tensors in qtype); returns the stored values."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(SHAPE.num_hidden_layers)
    writer.add_embedding_length(SHAPE.hidden_size)
    writer.add_feed_forward_length(SHAPE.intermediate_size)
    writer.add_head_count(SHAPE.num_attention_heads)
    writer.add_head_count_kv(SHAPE.num_key_value_heads)
    writer.add_context_length(256)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == gguf.GGMLQuantizationType.F32
                         else gguf.LlamaFileType.MOSTLY_Q8_0)
    stored = {}
    for name, value in to_gguf_layout(tensors).items():
        value = value.astype(np.float32)
        if value.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            raw = gguf.quants.quantize(value, qtype)
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
            stored[name] = gguf.quants.dequantize(raw, qtype).astype(np.float64)
        else:
            writer.add_tensor(name, value)
            stored[name] = value.astype(np.float64)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def read_gguf(path) -> tuple[dict[str, np.ndarray], dict[str, str], gguf.GGUFReader]:
    """Values (dequantized, float64) and ggml type names of a GGUF, by the gguf package."""
    reader = gguf.GGUFReader(path)
    values, types = {}, {}
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape))
        data = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
        values[tensor.name] = data.astype(np.float64).reshape(shape)
        types[tensor.name] = tensor.tensor_type.name
    return values, types, reader


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-experts")
    _, paths = write_experts(root, SHAPE, 2, dtype="F32", spread=0.5)
    return paths, [read_safetensors(p)[0] for p in paths]


def test_safetensors_to_gguf_f32_is_exact_with_converter_names_and_row_order(experts, tmp_path):
    (path, _), (values, _) = experts
    out = tmp_path / "one.gguf"
    merge([path], "passthrough", out, dtype="f32", chunk_elements=CHUNK)
    read, types, reader = read_gguf(out)
    expected = to_gguf_layout(values)
    assert sorted(read) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(read[name], value, err_msg=name)
    assert set(types.values()) == {"F32"}
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == 2
    assert fields["llama.attention.head_count_kv"] == 2
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert len(fields["tokenizer.ggml.tokens"]) == SHAPE.vocab_size
    assert fields["general.name"] == "one"


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0,
                                   gguf.GGMLQuantizationType.Q4_0])
def test_gguf_experts_merge_to_gguf_like_float64_math(experts, tmp_path, qtype):
    _, (first, second) = experts
    stored = [write_reference_gguf(tmp_path / f"e{i}.gguf", values, qtype)
              for i, values in enumerate((first, second))]
    out = tmp_path / "merged.gguf"
    merge([tmp_path / "e0.gguf", tmp_path / "e1.gguf"], "linear", out, weights=[0.3, 0.7],
          dtype="f32", chunk_elements=CHUNK)
    read, _, _ = read_gguf(out)
    for name, value in read.items():
        expected = (0.3 * stored[0][name] + 0.7 * stored[1][name]).astype(np.float32)
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-9, err_msg=name)


def test_mixed_formats_merge_in_either_output_format(experts, tmp_path):
    (hf_path, _), (first, second) = experts
    stored = write_reference_gguf(tmp_path / "e1.gguf", second, gguf.GGMLQuantizationType.Q8_0)
    merge([hf_path, tmp_path / "e1.gguf"], "linear", tmp_path / "hf", dtype="f32",
          chunk_elements=CHUNK)
    merged = read_safetensors(tmp_path / "hf")[0]
    for name, value in merged.items():
        other = stored[gguf_name(name)]
        if name.endswith("q_proj.weight"):
            other = unpermute(other, SHAPE.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            other = unpermute(other, SHAPE.num_key_value_heads)
        expected = ((first[name] + other) / 2).astype(np.float32)
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-9, err_msg=name)
    merge([hf_path, tmp_path / "e1.gguf"], "linear", tmp_path / "mixed.gguf", dtype="f32",
          chunk_elements=CHUNK)
    read, _, _ = read_gguf(tmp_path / "mixed.gguf")
    for name, value in to_gguf_layout(merged).items():
        np.testing.assert_array_equal(read[name], value, err_msg=name)


def test_round_trip_safetensors_gguf_safetensors_is_exact(experts, tmp_path):
    (path, _), (values, _) = experts
    merge([path], "passthrough", tmp_path / "a.gguf", dtype="f32", chunk_elements=CHUNK)
    merge([tmp_path / "a.gguf"], "passthrough", tmp_path / "b.gguf", chunk_elements=CHUNK)
    merge([tmp_path / "b.gguf"], "passthrough", tmp_path / "back", chunk_elements=CHUNK)
    back = read_safetensors(tmp_path / "back")[0]
    assert sorted(back) == sorted(values)
    for name, value in values.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    original = json.loads((path / "config.json").read_text())
    rebuilt = json.loads((tmp_path / "back" / "config.json").read_text())
    for key in ("architectures", "model_type", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "rms_norm_eps", "rope_theta", "vocab_size", "bos_token_id", "eos_token_id",
                "tie_word_embeddings", "torch_dtype"):
        assert rebuilt[key] == pytest.approx(original[key]), key


@pytest.mark.parametrize("file_type", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_quantized_output_equals_the_gguf_package_quantizer(experts, tmp_path, file_type):
    (path, _), (values, _) = experts
    out = tmp_path / "q.gguf"
    merge([path], "passthrough", out, dtype=file_type, chunk_elements=CHUNK)
    reader = gguf.GGUFReader(out)
    expected = to_gguf_layout(values)
    qtype = gguf.GGMLQuantizationType[file_type.upper()]
    seen = set()
    for tensor in reader.tensors:
        value = expected[tensor.name].astype(np.float32)
        seen.add(tensor.tensor_type)
        if tensor.tensor_type == gguf.GGMLQuantizationType.F32:
            assert value.ndim == 1, tensor.name  # only norms stay float32
            continue
        if tensor.tensor_type != qtype:
            assert tensor.name == "output.weight"  # llama.cpp gives the head Q6_K or Q8_0
            continue
        reference = gguf.quants.quantize(value, tensor.tensor_type)
        np.testing.assert_array_equal(np.asarray(tensor.data).reshape(reference.shape),
                                      reference, err_msg=tensor.name)
    assert qtype in seen


def test_k_quant_mix_types_and_error(experts, tmp_path):
    (path, _), (values, _) = experts
    out = tmp_path / "q4km.gguf"
    merge([path], "passthrough", out, dtype="q4_k_m", chunk_elements=CHUNK)
    read, types, reader = read_gguf(out)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert types["blk.0.attn_q.weight"] == "Q4_K"
    assert types["output.weight"] == "Q6_K"
    assert types["blk.0.attn_norm.weight"] == "F32"
    for name, value in to_gguf_layout(values).items():
        error = np.sqrt(np.mean((read[name] - value) ** 2) / np.mean(value**2))
        bound = {"Q4_K": 0.12, "Q5_K": 0.06, "Q6_K": 0.03}.get(types[name], 0.0)
        assert error <= bound, (name, types[name], error)


def test_chunked_and_whole_tensor_runs_write_identical_gguf(experts, tmp_path):
    (first, second), _ = experts
    merge([first, second], "karcher", tmp_path / "chunked" / "m.gguf", dtype="q8_0",
          chunk_elements=CHUNK)
    merge([first, second], "karcher", tmp_path / "whole" / "m.gguf", dtype="q8_0")
    chunked = (tmp_path / "chunked" / "m.gguf").read_bytes()
    assert chunked == (tmp_path / "whole" / "m.gguf").read_bytes()


def test_split_gguf_output_reads_back_as_input(experts, tmp_path):
    (path, _), (values, _) = experts
    merge([path], "passthrough", tmp_path / "split.gguf", dtype="f32", shard_size="4MB")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files[0] == "split-00001-of-00005.gguf" and len(files) == 5
    merge([tmp_path / files[0]], "passthrough", tmp_path / "back", chunk_elements=CHUNK)
    back = read_safetensors(tmp_path / "back")[0]
    for name, value in values.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_unsupported_architecture_is_refused_for_mixed_formats(experts, tmp_path):
    (path, _), (_, second) = experts
    write_reference_gguf(tmp_path / "e1.gguf", second, gguf.GGMLQuantizationType.F32)
    config = (path / "config.json").read_text()
    other = tmp_path / "gpt2"
    other.mkdir()
    for item in path.iterdir():
        (other / item.name).write_bytes(item.read_bytes())
    (other / "config.json").write_text(config.replace("LlamaForCausalLM", "GPT2LMHeadModel")
                                       .replace('"llama"', '"gpt2"'))
    with pytest.raises(MergeError, match="GPT2LMHeadModel.*llama"):
        merge([other, tmp_path / "e1.gguf"], "linear", tmp_path / "out.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e1.gguf", "gpt2"]


def test_yaml_filters_match_hugging_face_names_when_writing_gguf(experts, tmp_path):
    """mergekit filters name HF modules (self_attn, mlp); they still apply to GGUF output."""
    (first_path, second_path), (first, second) = experts
    config = tmp_path / "filters.yml"
    config.write_text(f"""
merge_method: linear
models:
  - model: {first_path}
    parameters:
      weight: [{{filter: self_attn, value: 1.0}}, {{value: 0.0}}]
  - model: {second_path}
    parameters:
      weight: [{{filter: self_attn, value: 0.0}}, {{value: 1.0}}]
out_dtype: f32
""")
    from lowmem_merge import run_config

    run_config(config, tmp_path / "out.gguf")
    read, _, _ = read_gguf(tmp_path / "out.gguf")
    for name, value in to_gguf_layout(first).items():
        source = value if ".attn_" in name and "norm" not in name else \
            to_gguf_layout(second)[name]
        np.testing.assert_array_equal(read[name], source, err_msg=name)


def test_an_80_layer_gqa_llama_gets_llama_cpps_70b_rule(tmp_path):
    """llama.cpp gives a 70B's attn_v Q5_K where other models keep Q4_K (Q4_K_M)."""
    from lowmem_merge.config import build_job
    from lowmem_merge.engine.run import plan_merge

    shape = LlamaShape(hidden_size=256, intermediate_size=256, num_hidden_layers=80,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=300)
    types = {}
    for layers in (80, 79):
        folder = write_experts(tmp_path / str(layers), LlamaShape(
            **{**shape.__dict__, "num_hidden_layers": layers}), 1, dtype="F32")[1][0]
        job = build_job([folder], tmp_path / f"out{layers}.gguf", method="passthrough",
                        dtype="q4_k_m")
        types[layers] = {t.output.name: t.output.dtype for t in plan_merge(job).tasks}
    # Layer 22 is not one of the "more bits" layers at either depth.
    assert types[79]["blk.22.attn_v.weight"] == "Q4_K"
    assert types[80]["blk.22.attn_v.weight"] == "Q5_K"
    assert types[80]["blk.22.attn_q.weight"] == "Q4_K"
