"""Llama-shaped synthetic models, written tensor by tensor in bounded memory.

Used by ``lowmem-merge demo``, the tests and the benchmarks. An expert is the
base plus a small expert-specific task vector; every value comes from a
generator seeded by (seed, tensor, expert), so a model of any size is
produced block by block without holding it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import kernels
from .io import OutputTensor, ShardedSafetensorsWriter

BLOCK = 1 << 22
# Llama 3's pre-tokenizer split, so that GGUF writers recognise it as "llama-bpe".
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
MIN_TOKENIZER_VOCAB = 258  # 256 bytes, <s> and </s>; smaller models get no tokenizer
_ENCODING = {"BF16": kernels.BF16, "F16": kernels.F16, "F32": kernels.F32}
_STORAGE = {"BF16": np.uint16, "F16": np.uint16, "F32": np.uint32}


@dataclass(frozen=True)
class LlamaShape:
    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 512

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i = self.hidden_size, self.intermediate_size
        kv = h // self.num_attention_heads * self.num_key_value_heads
        shapes = [("model.embed_tokens.weight", (self.vocab_size, h))]
        for layer in range(self.num_hidden_layers):
            prefix = f"model.layers.{layer}."
            shapes += [
                (prefix + "self_attn.q_proj.weight", (h, h)),
                (prefix + "self_attn.k_proj.weight", (kv, h)),
                (prefix + "self_attn.v_proj.weight", (kv, h)),
                (prefix + "self_attn.o_proj.weight", (h, h)),
                (prefix + "mlp.gate_proj.weight", (i, h)),
                (prefix + "mlp.up_proj.weight", (i, h)),
                (prefix + "mlp.down_proj.weight", (h, i)),
                (prefix + "input_layernorm.weight", (h,)),
                (prefix + "post_attention_layernorm.weight", (h,)),
            ]
        return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab_size, h))]

    def config(self, dtype: str) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            **asdict(self), "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
            "bos_token_id": self.vocab_size - 2, "eos_token_id": self.vocab_size - 1,
            "hidden_act": "silu", "tie_word_embeddings": False, "rope_theta": 10000.0,
            "torch_dtype": {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtype],
        }


TINYLLAMA = LlamaShape(2048, 5632, 22, 32, 4, 32000)


def _values(seed: int, index: int, shape: tuple[int, ...], expert: int | None, start: int,
            count: int, spread: float) -> np.ndarray:
    """Elements [start, start+count) of one tensor of the base (expert None) or an expert."""
    norm_like = len(shape) == 1
    rng = np.random.default_rng([seed, index, start])
    values = rng.standard_normal(count, dtype=np.float32) * np.float32(0.02)
    if norm_like:
        values += np.float32(1.0)
    if expert is not None:
        noise = np.random.default_rng([seed, index, start, expert + 1])
        values += noise.standard_normal(count, dtype=np.float32) * np.float32(0.02 * spread)
    return values


def write_model(folder: Path, shape: LlamaShape, *, seed: int = 0, expert: int | None = None,
                spread: float = 0.1, dtype: str = "BF16",
                shard_size: int = 2 * 1000**3) -> Path:
    """Write a base model (expert=None) or expert number ``expert`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    names = shape.tensors()
    width = np.dtype(_STORAGE[dtype]).itemsize
    outputs = [OutputTensor(n, dtype, s, int(np.prod(s)) * width) for n, s in names]
    writer = ShardedSafetensorsWriter(folder, outputs, shard_size, {"format": "pt"})
    try:
        for index, (_, tensor_shape) in enumerate(names):
            numel = int(np.prod(tensor_shape))
            for start in range(0, numel, BLOCK):
                count = min(BLOCK, numel - start)
                values = _values(seed, index, tensor_shape, expert, start, count, spread)
                encoded = np.empty(count, _STORAGE[dtype])
                kernels.encode_array(values, encoded, _ENCODING[dtype])
                writer.write(memoryview(encoded))
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    (folder / "config.json").write_text(json.dumps(shape.config(dtype), indent=2) + "\n")
    if shape.vocab_size >= MIN_TOKENIZER_VOCAB:
        write_tokenizer(folder, shape.vocab_size)
    return folder


def _byte_symbols() -> list[str]:
    """The printable stand-in of each byte that byte-level BPE vocabularies use (GPT-2's)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer of exactly vocab_size tokens (the last two <s> and </s>).

    Merges join earlier tokens in a fixed order, so every merge's result is in
    the vocabulary; it tokenizes any text, which is all a synthetic model needs.
    """
    if vocab_size < MIN_TOKENIZER_VOCAB:
        raise ValueError(f"a byte-level tokenizer needs at least {MIN_TOKENIZER_VOCAB} tokens")
    tokens = _byte_symbols()
    merges, seen = [], set(tokens)
    left = 0
    while len(tokens) < vocab_size - 2:
        for right in range(min(len(tokens), 256)):
            if len(tokens) >= vocab_size - 2:
                break
            merged = tokens[left] + tokens[right]
            if merged not in seen:
                merges.append(f"{tokens[left]} {tokens[right]}")
                tokens.append(merged)
                seen.add(merged)
        left += 1
    specials = [{"id": vocab_size - 2 + i, "content": text, "single_word": False,
                 "lstrip": False, "rstrip": False, "normalized": False, "special": True}
                for i, text in enumerate(["<s>", "</s>"])]
    vocab = {token: index for index, token in enumerate(tokens)}
    vocab.update({t["content"]: t["id"] for t in specials})
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": specials,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "vocab": vocab, "merges": merges},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
              "add_eos_token": False, "model_max_length": 256,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_experts(root: Path, shape: LlamaShape, n_experts: int, *, seed: int = 0,
                  spread: float = 0.1, dtype: str = "BF16",
                  shard_size: int = 2 * 1000**3) -> tuple[Path, list[Path]]:
    """A base and n experts under root: (root/base, [root/expert-1, ...])."""
    base = write_model(root / "base", shape, seed=seed, dtype=dtype, shard_size=shard_size)
    experts = [write_model(root / f"expert-{i + 1}", shape, seed=seed, expert=i, spread=spread,
                           dtype=dtype, shard_size=shard_size) for i in range(n_experts)]
    return base, experts
