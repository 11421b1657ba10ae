"""HF <-> GGUF tensor names and the q/k row permutation of llama.cpp's converter."""

from __future__ import annotations

import numpy as np
import pytest

from lowmem_merge.errors import MergeError
from lowmem_merge.io.gguf_names import (
    SUPPORTED_ARCHITECTURES,
    gguf_architecture,
    is_dropped_by_converter,
    name_map,
    qk_row_order,
)

N_LAYERS, HIDDEN, N_HEAD, N_HEAD_KV = 2, 64, 4, 2
HEAD_DIM = HIDDEN // N_HEAD


def converter_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """The converter's permute, written from its description: per head, the two rotary
    halves become interleaved pairs (reshape (heads, 2, d/2, ...), swap axes 1 and 2)."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def converter_unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    shape = rows.shape
    return rows.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


@pytest.mark.parametrize("heads", [N_HEAD, N_HEAD_KV, 1, 8])
@pytest.mark.parametrize("trailing", [(), (5,), (3, 2)])  # biases are 1-D
def test_row_order_matches_converter_permute(heads, trailing):
    rng = np.random.default_rng(heads)
    rows = heads * HEAD_DIM
    hf = rng.standard_normal((rows, *trailing))
    forward = qk_row_order(rows, heads, to_gguf=True)
    backward = qk_row_order(rows, heads, to_gguf=False)
    np.testing.assert_array_equal(hf[forward], converter_permute(hf, heads))
    gguf_rows = converter_permute(hf, heads)
    np.testing.assert_array_equal(gguf_rows[backward], converter_unpermute(gguf_rows, heads))
    np.testing.assert_array_equal(gguf_rows[backward], hf)
    np.testing.assert_array_equal(forward[backward], np.arange(rows))
    np.testing.assert_array_equal(backward[forward], np.arange(rows))


def test_row_order_is_rope_layout_change():
    """HF rotates the halves of a head (rotate_half); ggml's normal RoPE rotates adjacent
    pairs. Permuting the rows must turn one into the other."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal(N_HEAD * HEAD_DIM)
    position, half = 7, HEAD_DIM // 2
    theta = position * 10000.0 ** (-np.arange(half) * 2 / HEAD_DIM)
    cos, sin = np.cos(theta), np.sin(theta)
    heads = q.reshape(N_HEAD, 2, half)
    x, y = heads[:, 0], heads[:, 1]
    hf_rotated = np.stack([x * cos - y * sin, y * cos + x * sin], axis=1).reshape(-1)
    order = qk_row_order(q.size, N_HEAD, to_gguf=True)
    pairs = q[order].reshape(N_HEAD, half, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    ggml_rotated = np.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(-1)
    np.testing.assert_allclose(ggml_rotated, hf_rotated[order], rtol=0, atol=1e-12)


@pytest.mark.parametrize("rows,heads", [(30, 4), (0, 1), (8, 0), (12, 4)])
def test_row_order_rejects_bad_shapes(rows, heads):
    with pytest.raises(MergeError, match="rotary heads"):
        qk_row_order(rows, heads, to_gguf=True)


def expected_gguf_names(biases: bool) -> set[str]:
    names = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for i in range(N_LAYERS):
        names |= {f"blk.{i}.{t}.weight" for t in (
            "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
            "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
        if biases:
            names |= {f"blk.{i}.attn_{t}.bias" for t in "qkv"}
    return names


def tiny_model(kind: str, **extra):
    """A randomly initialised tiny transformers model of one family."""
    pytest.importorskip("torch", reason="torch is in the test extra only")
    transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    config = config_class(vocab_size=96, hidden_size=HIDDEN, intermediate_size=128,
                          num_hidden_layers=N_LAYERS, num_attention_heads=N_HEAD,
                          num_key_value_heads=N_HEAD_KV, **extra)
    return config, model_class(config)


@pytest.mark.parametrize("kind,arch,biases", [
    ("llama", "llama", False), ("mistral", "llama", False), ("qwen2", "qwen2", True),
])
def test_round_trip_every_tensor(kind, arch, biases):
    config, model = tiny_model(kind)
    assert gguf_architecture(config.to_dict(), "config.json") == arch
    names = name_map(arch, N_LAYERS, N_HEAD, N_HEAD_KV)
    state = {k: v for k, v in model.state_dict().items() if not is_dropped_by_converter(k)}
    gguf_names = {names.to_gguf(hf): hf for hf in state}
    assert set(gguf_names) == expected_gguf_names(biases)
    for gguf_name, hf_name in gguf_names.items():
        assert names.to_hf(gguf_name) == hf_name


def test_llama_with_projection_biases():
    config, model = tiny_model("llama", attention_bias=True, mlp_bias=True)
    names = name_map("llama", N_LAYERS, N_HEAD, N_HEAD_KV)
    biases = [k for k in model.state_dict() if k.endswith(".bias")]
    assert len(biases) == N_LAYERS * 7
    for hf_name in biases:
        assert names.to_hf(names.to_gguf(hf_name)) == hf_name
    assert names.qk_heads("blk.1.attn_q.bias") == N_HEAD
    assert names.qk_heads("blk.1.attn_k.bias") == N_HEAD_KV


def test_permuted_transformers_tensors():
    _, model = tiny_model("llama")
    names = name_map("llama", N_LAYERS, N_HEAD, N_HEAD_KV)
    state = model.state_dict()
    for hf_name, heads in (("model.layers.0.self_attn.q_proj.weight", N_HEAD),
                           ("model.layers.1.self_attn.k_proj.weight", N_HEAD_KV)):
        weight = state[hf_name].numpy()
        got = names.qk_heads(names.to_gguf(hf_name))
        assert got == heads
        order = qk_row_order(weight.shape[0], got, to_gguf=True)
        np.testing.assert_array_equal(weight[order], converter_permute(weight, heads))


def test_qk_heads():
    llama = name_map("llama", N_LAYERS, N_HEAD, N_HEAD_KV)
    qwen2 = name_map("qwen2", N_LAYERS, N_HEAD, N_HEAD_KV)
    assert llama.qk_heads("blk.0.attn_q.weight") == N_HEAD
    assert llama.qk_heads("blk.1.attn_k.weight") == N_HEAD_KV
    for name in ("blk.0.attn_v.weight", "blk.0.attn_output.weight", "token_embd.weight",
                 "output.weight", "blk.1.ffn_up.weight"):
        assert llama.qk_heads(name) == 0
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_q.bias"):
        assert qwen2.qk_heads(name) == 0
    with pytest.raises(MergeError, match="blk.2.attn_q.weight"):
        llama.qk_heads("blk.2.attn_q.weight")


def test_unknown_names():
    names = name_map("llama", N_LAYERS, N_HEAD, N_HEAD_KV)
    for bad in ("model.layers.2.mlp.up_proj.weight", "model.embed_tokens.bias",
                "model.layers.0.self_attn.rotary_emb.inv_freq", "transformer.wte.weight"):
        with pytest.raises(MergeError, match="has no GGUF name"):
            names.to_gguf(bad)
    for bad in ("blk.2.ffn_up.weight", "rope_freqs.weight", "blk.0.attn_qkv.weight"):
        with pytest.raises(MergeError, match="has no Hugging Face name"):
            names.to_hf(bad)


def test_name_map_arguments():
    assert SUPPORTED_ARCHITECTURES == ("llama", "qwen2")
    with pytest.raises(MergeError, match="'gpt2'.*llama, qwen2"):
        name_map("gpt2", 2, 4, 4)
    with pytest.raises(MergeError, match="layers"):
        name_map("llama", 0, 4, 4)
    with pytest.raises(MergeError, match="do not divide"):
        name_map("llama", 2, 4, 3)


def test_dropped_by_converter():
    assert is_dropped_by_converter("model.layers.0.self_attn.rotary_emb.inv_freq")
    assert not is_dropped_by_converter("model.layers.0.self_attn.q_proj.weight")


def test_gguf_architecture():
    assert gguf_architecture({"architectures": ["LlamaForCausalLM"]}, "a") == "llama"
    assert gguf_architecture({"architectures": ["MistralForCausalLM"]}, "a") == "llama"
    assert gguf_architecture({"architectures": ["Qwen2ForCausalLM"]}, "a") == "qwen2"
    assert gguf_architecture({"model_type": "mistral"}, "a") == "llama"
    assert gguf_architecture({"model_type": "qwen2"}, "a") == "qwen2"
    with pytest.raises(MergeError) as error:
        gguf_architecture({"architectures": ["GPT2LMHeadModel"]}, "models/gpt2/config.json")
    message = str(error.value)
    assert "models/gpt2/config.json" in message and "'GPT2LMHeadModel'" in message
    for supported in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        assert supported in message
    with pytest.raises(MergeError, match="no 'architectures' or 'model_type'"):
        gguf_architecture({}, "x/config.json")
