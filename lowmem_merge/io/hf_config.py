"""A Hugging Face config.json rebuilt from GGUF metadata (llama and qwen2 families).

Lets a merge of GGUF-only inputs be written as safetensors that transformers
can load. The tokenizer is not rebuilt.
"""

from __future__ import annotations

from ..errors import MergeError
from .gguf_values import Metadata

_CLASSES = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}
# config.json key <- GGUF key suffix after "{arch}."
_HYPERPARAMETERS = {
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
    "num_hidden_layers": "block_count",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base",
    "max_position_embeddings": "context_length",
    "head_dim": "attention.key_length",
    "vocab_size": "vocab_size",
}
_TOKEN_IDS = {"bos_token_id": "tokenizer.ggml.bos_token_id",
              "eos_token_id": "tokenizer.ggml.eos_token_id"}


def config_from_gguf(metadata: Metadata, source: str, tied_embeddings: bool,
                     torch_dtype: str | None) -> dict:
    """config.json for a model whose only description is a GGUF file's metadata."""
    arch = metadata["general.architecture"].value if "general.architecture" in metadata else None
    if arch not in _CLASSES:
        raise MergeError(f"{source}: cannot write a config.json for GGUF architecture {arch!r};"
                         f" supported: {', '.join(_CLASSES)}")
    hf_class, model_type = _CLASSES[arch]
    config: dict = {"architectures": [hf_class], "model_type": model_type}
    for key, suffix in _HYPERPARAMETERS.items():
        entry = metadata.get(f"{arch}.{suffix}")
        if entry is not None:
            config[key] = entry.value
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in metadata:
        config["vocab_size"] = len(metadata["tokenizer.ggml.tokens"].value)
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if k not in config]
    if missing:
        raise MergeError(f"{source}: GGUF metadata lacks what config.json needs: {missing}")
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    for key, gguf_key in _TOKEN_IDS.items():
        if gguf_key in metadata:
            config[key] = metadata[gguf_key].value
    config["hidden_act"] = "silu"
    config["tie_word_embeddings"] = tied_embeddings
    if torch_dtype:
        config["torch_dtype"] = torch_dtype
    return config
