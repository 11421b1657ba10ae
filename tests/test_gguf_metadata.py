"""GGUF metadata from HF folders: hyperparameters, BPE and SentencePiece tokenizers."""

from __future__ import annotations

import json
import logging
import math
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType as T

from lowmem_merge.errors import InputFileError, MergeError
from lowmem_merge.io.gguf_metadata import metadata_from_hf, read_sentencepiece, rope_freqs

# Split regexes as Llama 3 and Qwen2 store them in tokenizer.json.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0}


def llama_config(**extra) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **TINY, **extra}


def qwen2_config(**extra) -> dict:
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **TINY, **extra}


def mistral_config(**extra) -> dict:
    return {"architectures": ["MistralForCausalLM"], "model_type": "mistral", **TINY, **extra}


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


def build(folder: Path, config: dict, arch: str):
    write_json(folder / "config.json", config)
    return metadata_from_hf(folder, config, arch, "tiny")


def value(meta, key, vtype, item_type=None):
    """The value under key, checking its GGUF type."""
    entry = meta[key]
    assert entry.type == vtype, key
    assert entry.item_type == item_type, key
    return entry.value


# ------------------------------------------------------------ byte-level BPE


def bpe_tokenizer(regex: str = LLAMA3_REGEX, template: bool = True):
    """A byte-level BPE tokenizer built with the tokenizers library."""
    tk = pytest.importorskip("tokenizers", reason="tokenizers comes with the test extra")
    alphabet = sorted(tk.pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: i for i, char in enumerate(alphabet)}
    for left, right in MERGES:
        vocab[left + right] = len(vocab)
    tokenizer = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=MERGES, ignore_merges=True))
    tokenizer.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(regex), behavior="isolated", invert=False),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = tk.decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    tokenizer.add_tokens([tk.AddedToken("my\u2581word", special=False),
                          tk.AddedToken("<|reserved_0|>", special=False)])
    if template:
        bos = tokenizer.token_to_id("<|begin_of_text|>")
        tokenizer.post_processor = tk.processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    return tokenizer


def bpe_folder(folder: Path, tokenizer, tokenizer_config: dict | None = None) -> None:
    tokenizer.save(str(folder / "tokenizer.json"))
    if tokenizer_config is not None:
        write_json(folder / "tokenizer_config.json", tokenizer_config)


LLAMA3_TOKENIZER_CONFIG = {
    "bos_token": "<|begin_of_text|>",
    "eos_token": {"content": "<|end_of_text|>", "special": True},
    "add_eos_token": False,
    "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}",
}


def expected_bpe(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and types computed from the tokenizers library's own view."""
    by_id = {i: text for text, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    added = tokenizer.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            special = added[i].special or by_id[i].startswith("<|")
            tokens.append(by_id[i] if special else by_id[i].replace("\u2581", " "))
            types.append(CONTROL if special else USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL)
    return tokens, types


def test_llama3_style_bpe(tmp_path):
    tokenizer = bpe_tokenizer()
    bpe_folder(tmp_path, tokenizer, LLAMA3_TOKENIZER_CONFIG)
    n_tokens = tokenizer.get_vocab_size(with_added_tokens=True)
    config = llama_config(vocab_size=n_tokens + 3, pad_token_id=n_tokens - 1,
                          eos_token_id=[n_tokens - 3, n_tokens - 2])
    meta = build(tmp_path, config, "llama")
    tokens, types = expected_bpe(tokenizer, n_tokens + 3)
    assert value(meta, "tokenizer.ggml.model", T.STRING) == "gpt2"
    assert value(meta, "tokenizer.ggml.pre", T.STRING) == "llama-bpe"
    assert value(meta, "tokenizer.ggml.tokens", T.ARRAY, T.STRING) == tokens
    assert value(meta, "tokenizer.ggml.token_type", T.ARRAY, T.INT32) == types
    assert types.count(USER_DEFINED) == 1 and tokens.count("my word") == 1
    assert value(meta, "tokenizer.ggml.merges", T.ARRAY, T.STRING) == [
        f"{a} {b}" for a, b in MERGES]
    assert "tokenizer.ggml.scores" not in meta
    assert value(meta, "tokenizer.ggml.bos_token_id", T.UINT32) == tokenizer.token_to_id(
        "<|begin_of_text|>")
    assert value(meta, "tokenizer.ggml.eos_token_id", T.UINT32) == tokenizer.token_to_id(
        "<|end_of_text|>")
    assert value(meta, "tokenizer.ggml.padding_token_id", T.UINT32) == n_tokens - 1
    assert value(meta, "tokenizer.ggml.add_bos_token", T.BOOL) is True  # from the template
    assert value(meta, "tokenizer.ggml.add_eos_token", T.BOOL) is False
    assert value(meta, "tokenizer.chat_template", T.STRING) == (
        LLAMA3_TOKENIZER_CONFIG["chat_template"])
    assert "tokenizer.ggml.unknown_token_id" not in meta


def test_bpe_tokens_agree_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")
    tokenizer = bpe_tokenizer()
    bpe_folder(tmp_path, tokenizer, LLAMA3_TOKENIZER_CONFIG)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    meta = build(tmp_path, llama_config(), "llama")
    tokens = meta["tokenizer.ggml.tokens"].value
    types = meta["tokenizer.ggml.token_type"].value
    assert len(tokens) == len(fast)
    for text, token_id in fast.get_vocab().items():
        user_defined = types[token_id] == USER_DEFINED
        assert tokens[token_id] == (text.replace("\u2581", " ") if user_defined else text)
    specials = [i for i, token in fast.added_tokens_decoder.items() if token.special]
    assert specials and all(types[i] == CONTROL for i in specials)


def test_qwen2_style_bpe(tmp_path):
    tokenizer = bpe_tokenizer(QWEN2_REGEX, template=False)
    bpe_folder(tmp_path, tokenizer, {"eos_token": "<|end_of_text|>", "pad_token": "<|end_of_text|>",
                                     "bos_token": None, "add_prefix_space": False})
    n_tokens = tokenizer.get_vocab_size(with_added_tokens=True)
    meta = build(tmp_path, qwen2_config(vocab_size=n_tokens, bos_token_id=n_tokens - 4), "qwen2")
    assert value(meta, "tokenizer.ggml.pre", T.STRING) == "qwen2"
    eos = tokenizer.token_to_id("<|end_of_text|>")
    assert value(meta, "tokenizer.ggml.eos_token_id", T.UINT32) == eos
    assert value(meta, "tokenizer.ggml.padding_token_id", T.UINT32) == eos
    assert value(meta, "tokenizer.ggml.bos_token_id", T.UINT32) == n_tokens - 4  # config.json
    assert "tokenizer.ggml.add_bos_token" not in meta
    assert "tokenizer.ggml.add_space_prefix" not in meta  # only LlamaModel writes it
    assert "tokenizer.chat_template" not in meta


def test_unknown_pre_tokenizer_is_default(tmp_path, caplog):
    tk = pytest.importorskip("tokenizers")
    tokenizer = bpe_tokenizer()
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe_folder(tmp_path, tokenizer)
    with caplog.at_level(logging.WARNING):
        meta = build(tmp_path, llama_config(), "llama")
    assert meta["tokenizer.ggml.pre"].value == "default"
    assert "pre-tokenizer not recognised" in caplog.text
    # Without tokenizer_config.json the template alone decides add_bos.
    assert meta["tokenizer.ggml.add_bos_token"].value is True
    assert "tokenizer.ggml.bos_token_id" not in meta


def test_merges_as_strings_pairs_and_merges_txt(tmp_path):
    bpe_folder(tmp_path, bpe_tokenizer())
    path = tmp_path / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["model"]["merges"] = ["Ġ t", "h e"]
    write_json(path, data)
    assert build(tmp_path, llama_config(), "llama")["tokenizer.ggml.merges"].value == [
        "Ġ t", "h e"]
    data["model"]["merges"] = [["a b", "c"], ["Ġt", "he"]]
    write_json(path, data)
    assert build(tmp_path, llama_config(), "llama")["tokenizer.ggml.merges"].value == [
        "a\u0120b c", "Ġt he"]
    del data["model"]["merges"]
    write_json(path, data)
    with pytest.raises(InputFileError, match="no BPE merges"):
        build(tmp_path, llama_config(), "llama")
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t\nh e\n", encoding="utf-8")
    assert build(tmp_path, llama_config(), "llama")["tokenizer.ggml.merges"].value == [
        "Ġ t", "h e"]


def test_chat_template_files(tmp_path):
    bpe_folder(tmp_path, bpe_tokenizer(), {"bos_token": "<|begin_of_text|>"})
    (tmp_path / "chat_template.jinja").write_text("main {{ x }}", encoding="utf-8")
    extra = tmp_path / "additional_chat_templates"
    extra.mkdir()
    (extra / "tool-use.jinja").write_text("tools {{ x }}", encoding="utf-8")
    meta = build(tmp_path, llama_config(), "llama")
    assert value(meta, "tokenizer.chat_template", T.STRING) == "main {{ x }}"
    assert value(meta, "tokenizer.chat_template.tool_use", T.STRING) == "tools {{ x }}"
    assert value(meta, "tokenizer.chat_templates", T.ARRAY, T.STRING) == ["tool_use"]


def test_tokenizer_id_beyond_vocab_size(tmp_path):
    tokenizer = bpe_tokenizer()
    bpe_folder(tmp_path, tokenizer)
    with pytest.raises(InputFileError, match="tokenizer.json.*vocab_size 10"):
        build(tmp_path, llama_config(vocab_size=10), "llama")


@pytest.mark.parametrize("change,message", [
    ({"byte_fallback": True}, "tokenizer.model"),
    ({"type": "Unigram"}, "Unigram"),
])
def test_unsupported_tokenizer_json(tmp_path, change, message):
    bpe_folder(tmp_path, bpe_tokenizer())
    path = tmp_path / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["model"].update(change)
    write_json(path, data)
    with pytest.raises(MergeError, match=message):
        build(tmp_path, llama_config(), "llama")


def test_no_tokenizer(tmp_path):
    with pytest.raises(MergeError) as error:
        build(tmp_path, llama_config(), "llama")
    assert str(tmp_path) in str(error.value) and "tokenizer is needed" in str(error.value)


def test_bad_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(InputFileError, match="tokenizer.json: not valid JSON"):
        build(tmp_path, llama_config(), "llama")


# ------------------------------------------------------------ SentencePiece


def varint(number: int) -> bytes:
    out = bytearray()
    while True:
        low, number = number & 0x7F, number >> 7
        out.append(low | (0x80 if number else 0))
        if not number:
            return bytes(out)


def tag(field: int, wire: int) -> bytes:
    return varint(field << 3 | wire)


def length_field(field: int, payload: bytes) -> bytes:
    return tag(field, 2) + varint(len(payload)) + payload


def piece(text: str, score: float | None = None, kind: int | None = None) -> bytes:
    out = length_field(1, text.encode("utf-8"))
    if score is not None:
        out += tag(2, 5) + struct.pack("<f", score)
    if kind is not None:
        out += tag(3, 0) + varint(kind)
    return out + tag(15, 0) + varint(300)  # a field this parser does not know


# (text, score written, type written) -> expected (score, GGUF type)
PIECES = [
    ("<unk>", 0.0, 2, 0.0, UNKNOWN),
    ("<s>", 0.0, 3, 0.0, CONTROL),
    ("</s>", 0.0, 3, 0.0, CONTROL),
    ("<0x0A>", 0.0, 6, 0.0, BYTE),
    ("\u2581the", -1.5, None, -1.5, NORMAL),
    ("\u2581a", -2.25, 1, -2.25, NORMAL),
    ("<user>", 0.0, 4, 0.0, NORMAL),  # the converter does not ask IsUserDefined
    ("<unused0>", 0.0, 5, 0.0, UNUSED),
    ("x", None, None, 0.0, NORMAL),
]


def model_proto(pieces: list[bytes]) -> bytes:
    trainer = length_field(1, b"corpus.txt") + tag(3, 0) + varint(32000)
    normalizer = length_field(1, b"nmt_nfkc") + tag(3, 0) + varint(1)
    body = b"".join(length_field(1, p) for p in pieces)
    return body + length_field(2, trainer) + length_field(3, normalizer) + tag(7, 1) + bytes(8)


def sentencepiece_folder(folder: Path) -> None:
    data = model_proto([piece(t, s, k) for t, s, k, _, _ in PIECES])
    (folder / "tokenizer.model").write_bytes(data)


def test_sentencepiece_llama2_style(tmp_path):
    sentencepiece_folder(tmp_path)
    n = len(PIECES)
    write_json(tmp_path / "added_tokens.json", {"<extra>": n})
    write_json(tmp_path / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
        "add_prefix_space": True,
        "added_tokens_decoder": {
            "1": {"content": "<s>", "special": True},
            str(n + 1): {"content": "<tool\u2581call>", "special": False},
            str(n + 5): {"content": "<far>", "special": True},
        },
    })
    config = llama_config(vocab_size=n + 3, bos_token_id=1, eos_token_id=2, unk_token_id=0)
    meta = build(tmp_path, config, "llama")
    tokens = [t for t, *_ in PIECES] + ["<extra>", "<tool call>", f"[PAD{n + 2}]"]
    scores = [s for *_, s, _ in PIECES] + [-1000.0, -1000.0, -10000.0]
    scores[1] = -1000.0  # <s> is in added_tokens_decoder
    types = [k for *_, k in PIECES] + [USER_DEFINED, USER_DEFINED, UNUSED]
    assert value(meta, "tokenizer.ggml.model", T.STRING) == "llama"
    assert value(meta, "tokenizer.ggml.pre", T.STRING) == "default"
    assert value(meta, "tokenizer.ggml.tokens", T.ARRAY, T.STRING) == tokens
    assert value(meta, "tokenizer.ggml.scores", T.ARRAY, T.FLOAT32) == scores
    assert value(meta, "tokenizer.ggml.token_type", T.ARRAY, T.INT32) == types
    assert "tokenizer.ggml.merges" not in meta
    assert value(meta, "tokenizer.ggml.bos_token_id", T.UINT32) == 1
    assert value(meta, "tokenizer.ggml.eos_token_id", T.UINT32) == 2
    assert value(meta, "tokenizer.ggml.unknown_token_id", T.UINT32) == 0
    assert value(meta, "tokenizer.ggml.add_bos_token", T.BOOL) is True
    assert value(meta, "tokenizer.ggml.add_eos_token", T.BOOL) is False
    assert value(meta, "tokenizer.ggml.add_space_prefix", T.BOOL) is True


def test_sentencepiece_wins_over_tokenizer_json_for_mistral(tmp_path):
    sentencepiece_folder(tmp_path)
    bpe_folder(tmp_path, bpe_tokenizer(), {"bos_token": "<|begin_of_text|>"})
    meta = build(tmp_path, mistral_config(vocab_size=len(PIECES)), "llama")
    assert meta["general.architecture"].value == "llama"
    assert meta["tokenizer.ggml.model"].value == "llama"
    assert len(meta["tokenizer.ggml.tokens"].value) == len(PIECES)
    # <|begin_of_text|> has id 259 in tokenizer.json, beyond this vocabulary: ignored.
    assert "tokenizer.ggml.bos_token_id" not in meta


def test_read_sentencepiece_without_vocab_size(tmp_path):
    sentencepiece_folder(tmp_path)
    assert read_sentencepiece(tmp_path / "tokenizer.model") == [
        (t, s if s is not None else 0.0, k if k is not None else 1) for t, s, k, _, _ in PIECES]
    config = llama_config()
    meta = build(tmp_path, config, "llama")
    assert len(meta["tokenizer.ggml.tokens"].value) == len(PIECES)
    assert "llama.vocab_size" not in meta


GOOD = piece("a", -1.0, 1)
MALFORMED = {
    "truncated": model_proto([GOOD])[:-12],
    "wire type": length_field(1, GOOD) + tag(4, 3),
    "overlong length": tag(1, 2) + varint(1 << 40) + GOOD,
    "long varint": tag(1, 0) + b"\xff" * 11,
    "type 9": length_field(1, piece("a", -1.0, 9)),
    "not utf-8": length_field(1, length_field(1, b"\xff\xfe")),
    "no text": length_field(1, tag(2, 5) + struct.pack("<f", 1.0)),
    "piece as varint": tag(1, 0) + varint(5),
    "score as varint": length_field(1, length_field(1, b"a") + tag(2, 0) + varint(1)),
    "nan score": length_field(1, length_field(1, b"a") + tag(2, 5) + struct.pack("<f", math.nan)),
    "field 0": tag(0, 0) + varint(1),
    "empty": b"",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_sentencepiece(tmp_path, case):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(MALFORMED[case])
    with pytest.raises(InputFileError) as error:
        build(tmp_path, llama_config(), "llama")
    assert str(path) in str(error.value)


# ------------------------------------------------------------ hyperparameters


def model_keys(meta: dict, arch: str) -> dict:
    return {k: v for k, v in meta.items() if k.startswith(arch + ".")}


def test_llama_keys(tmp_path):
    sentencepiece_folder(tmp_path)
    config = llama_config(vocab_size=len(PIECES), head_dim=32,
                          rope_scaling={"type": "linear", "factor": 2.0})
    meta = build(tmp_path, config, "llama")
    assert list(meta)[:2] == ["general.architecture", "general.name"]
    assert value(meta, "general.name", T.STRING) == "tiny"
    assert "general.file_type" not in meta
    expected = {
        "llama.block_count": (T.UINT32, 2),
        "llama.context_length": (T.UINT32, 512),
        "llama.embedding_length": (T.UINT32, 64),
        "llama.feed_forward_length": (T.UINT32, 128),
        "llama.attention.head_count": (T.UINT32, 4),
        "llama.attention.head_count_kv": (T.UINT32, 2),
        "llama.rope.scaling.type": (T.STRING, "linear"),
        "llama.rope.scaling.factor": (T.FLOAT32, 2.0),
        "llama.rope.freq_base": (T.FLOAT32, 500000.0),
        "llama.attention.layer_norm_rms_epsilon": (T.FLOAT32, 1e-5),
        "llama.attention.key_length": (T.UINT32, 32),
        "llama.attention.value_length": (T.UINT32, 32),
        "llama.vocab_size": (T.UINT32, len(PIECES)),
        "llama.rope.dimension_count": (T.UINT32, 32),
    }
    got = {k: (v.type, v.value) for k, v in model_keys(meta, "llama").items()}
    assert got == expected


def test_qwen2_keys_with_yarn(tmp_path):
    sentencepiece_folder(tmp_path)
    rope = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
            "beta_fast": 32.0, "attn_factor": 0.5}
    meta = build(tmp_path, qwen2_config(vocab_size=len(PIECES), rope_scaling=rope), "qwen2")
    got = {k: (v.type, v.value) for k, v in model_keys(meta, "qwen2").items()}
    assert got == {
        "qwen2.block_count": (T.UINT32, 2),
        "qwen2.context_length": (T.UINT32, 512),
        "qwen2.embedding_length": (T.UINT32, 64),
        "qwen2.feed_forward_length": (T.UINT32, 128),
        "qwen2.attention.head_count": (T.UINT32, 4),
        "qwen2.attention.head_count_kv": (T.UINT32, 2),
        "qwen2.rope.scaling.type": (T.STRING, "yarn"),
        "qwen2.rope.scaling.factor": (T.FLOAT32, 4.0),
        "qwen2.rope.scaling.original_context_length": (T.UINT32, 128),
        "qwen2.rope.scaling.yarn_attn_factor": (T.FLOAT32, 0.5),
        "qwen2.rope.scaling.yarn_beta_fast": (T.FLOAT32, 32.0),
        "qwen2.rope.freq_base": (T.FLOAT32, 500000.0),
        "qwen2.attention.layer_norm_rms_epsilon": (T.FLOAT32, 1e-5),
    }
    del rope["original_max_position_embeddings"]
    with pytest.raises(InputFileError, match="config.json.*original_max_position_embeddings"):
        build(tmp_path, qwen2_config(rope_scaling=rope), "qwen2")


def test_transformers5_rope_parameters(tmp_path):
    sentencepiece_folder(tmp_path)
    config = {k: v for k, v in llama_config().items() if k != "rope_theta"}
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 250000.0}
    meta = build(tmp_path, config, "llama")
    assert meta["llama.rope.freq_base"].value == 250000.0
    assert "llama.rope.scaling.type" not in meta


@pytest.mark.parametrize("kind,arch", [("llama", "llama"), ("mistral", "llama"),
                                       ("qwen2", "qwen2")])
def test_defaults_match_transformers_config_classes(tmp_path, kind, arch):
    transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")
    config_class = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                    "qwen2": transformers.Qwen2Config}[kind]
    sentencepiece_folder(tmp_path)
    config = {"architectures": [config_class.__name__.replace("Config", "ForCausalLM")],
              "model_type": kind, "hidden_size": 256, "intermediate_size": 512,
              "num_hidden_layers": 2, "num_attention_heads": 32}
    full = config_class(**config).to_dict()
    theta = (full.get("rope_parameters") or {}).get("rope_theta", full.get("rope_theta"))
    meta = build(tmp_path, config, arch)
    assert meta[f"{arch}.context_length"].value == full["max_position_embeddings"]
    assert meta[f"{arch}.attention.head_count_kv"].value == full["num_key_value_heads"]
    assert meta[f"{arch}.rope.freq_base"].value == theta
    assert meta[f"{arch}.attention.layer_norm_rms_epsilon"].value == full["rms_norm_eps"]


def test_key_value_heads_must_divide_heads(tmp_path):
    sentencepiece_folder(tmp_path)
    with pytest.raises(InputFileError, match="config.json.*'num_key_value_heads'"):
        build(tmp_path, llama_config(num_key_value_heads=3), "llama")
    # Qwen2Config's default is 32 key/value heads; null means one per head.
    config = {k: v for k, v in qwen2_config().items() if k != "num_key_value_heads"}
    with pytest.raises(InputFileError, match="32 key/value heads"):
        build(tmp_path, config, "qwen2")
    meta = build(tmp_path, {**config, "num_key_value_heads": None}, "qwen2")
    assert meta["qwen2.attention.head_count_kv"].value == 4


@pytest.mark.parametrize("key,bad", [("hidden_size", None), ("num_hidden_layers", "2"),
                                     ("num_attention_heads", 0), ("rms_norm_eps", "x")])
def test_bad_config_values(tmp_path, key, bad):
    sentencepiece_folder(tmp_path)
    config = llama_config()
    config[key] = bad
    with pytest.raises(InputFileError) as error:
        build(tmp_path, config, "llama")
    assert str(tmp_path / "config.json") in str(error.value) and repr(key) in str(error.value)


def test_unsupported_architecture(tmp_path):
    with pytest.raises(MergeError, match="'gpt2'.*llama, qwen2"):
        build(tmp_path, {"architectures": ["GPT2LMHeadModel"]}, "gpt2")


def test_llama3_rope_freqs_match_transformers():
    transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")
    pytest.importorskip("torch")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = llama_config(hidden_size=256, num_attention_heads=2, rope_scaling=rope)
    factors = rope_freqs(config, "llama")
    assert factors.dtype == np.float32 and factors.shape == (64,)
    hf_config = transformers.LlamaConfig(**config)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    plain = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
    # llama.cpp divides each frequency by its factor.
    np.testing.assert_allclose(plain / factors, scaled.numpy(), rtol=2e-6)
    assert {1.0, 8.0} <= set(factors.tolist()) and len(set(factors.tolist())) > 2
    assert rope_freqs(llama_config(), "llama") is None
    assert rope_freqs(qwen2_config(rope_scaling=rope), "qwen2") is None


def test_metadata_writes_and_reads_back_with_gguf(tmp_path):
    gguf = pytest.importorskip("gguf")
    tokenizer = bpe_tokenizer()
    bpe_folder(tmp_path, tokenizer, LLAMA3_TOKENIZER_CONFIG)
    meta = build(tmp_path, llama_config(), "llama")
    out = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(out, "llama")
    for key, entry in meta.items():
        if key != "general.architecture":  # the writer adds it itself
            writer.add_key_value(key, entry.value, entry.type, entry.item_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    fields = gguf.GGUFReader(out).fields
    for key, entry in meta.items():
        field = fields[key]
        assert field.types[0] == entry.type
        if entry.item_type is not None:
            assert field.types[1] == entry.item_type
            assert field.contents() == entry.value
