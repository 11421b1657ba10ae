"""GGUF metadata for a Hugging Face model folder, as llama.cpp's converter writes it.

Covers the llama (Llama, Mistral) and qwen2 families: the hyperparameters from
config.json and the tokenizer, either a byte-level BPE tokenizer.json ("gpt2")
or a SentencePiece tokenizer.model ("llama"). The keys, value types and choices
follow convert_hf_to_gguf.py (TextModel, LlamaModel, Qwen2Model) and gguf-py's
SpecialVocab; general.file_type is left to the writer.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFValueType, Keys, TokenType

from ..errors import InputFileError, MergeError
from .gguf_names import SUPPORTED_ARCHITECTURES
from .gguf_values import Metadata, MetaValue

log = logging.getLogger(__name__)

# The converter reads config.json through transformers' AutoConfig, so it sees the
# config classes' defaults for keys a config.json leaves out. These are those
# defaults (LlamaConfig, MistralConfig, Qwen2Config) for the keys llama.cpp needs.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048},
    "mistral": {"max_position_embeddings": 131072, "num_key_value_heads": 8},
    "qwen2": {"max_position_embeddings": 32768, "num_key_value_heads": 32},
}
_COMMON_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0}
_REQUIRED_COUNTS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")

# Special token kinds with a GGUF key (the converter also tracks "cls", which has none).
_ID_KEYS = {
    "bos": Keys.Tokenizer.BOS_ID, "eos": Keys.Tokenizer.EOS_ID, "unk": Keys.Tokenizer.UNK_ID,
    "sep": Keys.Tokenizer.SEP_ID, "pad": Keys.Tokenizer.PAD_ID, "mask": Keys.Tokenizer.MASK_ID,
}
_ADD_KEYS = {
    "bos": Keys.Tokenizer.ADD_BOS, "eos": Keys.Tokenizer.ADD_EOS, "sep": Keys.Tokenizer.ADD_SEP,
}

# Split regexes of tokenizer.json pre-tokenizers, and the tokenizer.ggml.pre name the
# converter writes for them. The converter tells them apart by hashing the tokens of a
# test text, which needs the tokenizer library; the regex is what llama.cpp's pre-type
# encodes (llama-vocab.cpp quotes these as the "original regex from tokenizer.json").
_PRE_BY_REGEX = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+": "tekken",
}

# SentencePiece's piece types have gguf.TokenType's numbers, but the converter asks
# only IsUnknown/IsControl/IsUnused/IsByte, so USER_DEFINED (4) pieces become NORMAL.
_SP_TYPES = {
    1: TokenType.NORMAL, 2: TokenType.UNKNOWN, 3: TokenType.CONTROL,
    4: TokenType.NORMAL, 5: TokenType.UNUSED, 6: TokenType.BYTE,
}
_SP_MAX_BYTES = 64 << 20  # real tokenizer.model files are a few MiB at most
_PAD_SCORE = -10000.0  # score of ids the SentencePiece model does not fill
_ADDED_SCORE = -1000.0  # score of added tokens
_SPIECE_SPACE = "\u2581"


@dataclass
class _Vocab:
    model: str  # tokenizer.ggml.model
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None


def metadata_from_hf(folder: Path, config: dict, architecture: str, name: str) -> Metadata:
    """GGUF metadata (all but general.file_type) for the HF model in folder with this config."""
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise MergeError(
            f"GGUF architecture {architecture!r} is not supported; supported:"
            f" {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    folder = Path(folder)
    params = _hyperparameters(config, architecture, folder / "config.json")
    meta: Metadata = {
        Keys.General.ARCHITECTURE: MetaValue.string(architecture),
        Keys.General.NAME: MetaValue.string(name),
    }
    meta.update(_model_metadata(params, architecture, folder / "config.json"))
    meta.update(_tokenizer_metadata(folder, params, architecture))
    return meta


def rope_freqs(config: dict, architecture: str,
               source: Path = Path("config.json")) -> np.ndarray | None:
    """The rope_freqs.weight tensor the converter adds for rope_type "llama3", else None.

    Shape (rotary dims / 2,), float32; llama.cpp divides each RoPE frequency by it.
    source names the config in error messages."""
    source = Path(source)
    rope = _rope_parameters(config, source)
    if architecture != "llama" or str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    params = _hyperparameters(config, architecture, source)
    dim = params.get("head_dim") or params["hidden_size"] // params["num_attention_heads"]
    base = _number(rope.get("rope_theta", params["rope_theta"]), "rope_theta", source)
    factor = _number(rope.get("factor", 8.0), "rope_scaling.factor", source)
    low = _number(rope.get("low_freq_factor", 1.0), "rope_scaling.low_freq_factor", source)
    high = _number(rope.get("high_freq_factor", 4.0), "rope_scaling.high_freq_factor", source)
    if high <= low:
        raise InputFileError(
            source, "llama3 'rope_scaling' needs high_freq_factor > low_freq_factor"
        )
    # transformers reads original_max_position_embeddings from the rope parameters;
    # the converter reads it from the top level, default 8192 (equal in Llama 3.x).
    old_ctx = float(rope.get("original_max_position_embeddings")
                    or params.get("original_max_position_embeddings") or 8192)
    # float32 throughout, as the converter computes them with torch.
    freqs = 1.0 / np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    wavelen = np.float32(2 * math.pi) / freqs
    smooth = (np.float32(old_ctx) / wavelen - np.float32(low)) / np.float32(high - low)
    factors = 1.0 / ((1.0 - smooth) / np.float32(factor) + smooth)
    factors = np.where(wavelen < old_ctx / high, 1.0, factors)
    factors = np.where(wavelen > old_ctx / low, factor, factors)
    return factors.astype(np.float32)


# ---------------------------------------------------------------- hyperparameters


def _family(config: dict, architecture: str) -> str:
    classes = config.get("architectures") or [None]
    if classes[0] == "MistralForCausalLM" or config.get("model_type") == "mistral":
        return "mistral"
    return architecture


def _hyperparameters(config: dict, architecture: str, source: Path) -> dict[str, Any]:
    """config.json with the config class defaults filled in, and its counts checked."""
    params = {k: v for k, v in config.items() if v is not None}
    defaults = {**_COMMON_DEFAULTS, **_FAMILY_DEFAULTS[_family(config, architecture)]}
    if "num_key_value_heads" in config:  # null (or a Llama config without it): one per head
        defaults["num_key_value_heads"] = params.get("num_attention_heads")
    for key, value in defaults.items():
        params.setdefault(key, value)
    params.setdefault("num_key_value_heads", params.get("num_attention_heads"))
    for key in (*_REQUIRED_COUNTS, "num_key_value_heads", "max_position_embeddings"):
        _count(params, key, source)
    if params["num_attention_heads"] % params["num_key_value_heads"]:
        raise InputFileError(source, (
            f"{params['num_attention_heads']} attention heads do not divide into"
            f" {params['num_key_value_heads']} key/value heads ('num_key_value_heads')"))
    for key in ("head_dim", "vocab_size"):
        if key in params:
            _count(params, key, source)
    for key in ("rms_norm_eps", "rope_theta"):
        _number(params[key], key, source)
    return params


def _count(params: dict, key: str, source: Path) -> int:
    value = params.get(key)
    # GGUF stores these as uint32.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 1 << 32:
        raise InputFileError(source, f"{key!r} must be a positive integer, found {value!r}")
    return value


def _number(value: Any, key: str, source: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputFileError(source, f"{key!r} must be a number, found {value!r}")
    return float(value)


def _rope_parameters(config: dict, source: Path) -> dict[str, Any]:
    """rope_parameters (transformers 5) or rope_scaling (4.x), with rope_type mirrored."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise InputFileError(source, f"'rope_scaling' must be an object, found {rope!r}")
    rope = dict(rope.get("full_attention", rope))
    if "rope_type" not in rope and "type" in rope:
        rope["rope_type"] = rope["type"]
    return rope


def _model_metadata(params: dict, arch: str, source: Path) -> Metadata:
    def key(template: str) -> str:
        return template.format(arch=arch)

    meta: Metadata = {
        key(Keys.LLM.BLOCK_COUNT): MetaValue.uint32(params["num_hidden_layers"]),
        key(Keys.LLM.CONTEXT_LENGTH): MetaValue.uint32(params["max_position_embeddings"]),
        key(Keys.LLM.EMBEDDING_LENGTH): MetaValue.uint32(params["hidden_size"]),
        key(Keys.LLM.FEED_FORWARD_LENGTH): MetaValue.uint32(params["intermediate_size"]),
        key(Keys.Attention.HEAD_COUNT): MetaValue.uint32(params["num_attention_heads"]),
        key(Keys.Attention.HEAD_COUNT_KV): MetaValue.uint32(params["num_key_value_heads"]),
    }
    rope = _rope_parameters(params, source)
    meta.update(_rope_scaling(rope, arch, source))
    theta = rope.get("rope_theta", params["rope_theta"])
    meta[key(Keys.Rope.FREQ_BASE)] = MetaValue.float32(_number(theta, "rope_theta", source))
    meta[key(Keys.Attention.LAYERNORM_RMS_EPS)] = MetaValue.float32(params["rms_norm_eps"])
    if "head_dim" in params:
        meta[key(Keys.Attention.KEY_LENGTH)] = MetaValue.uint32(params["head_dim"])
        meta[key(Keys.Attention.VALUE_LENGTH)] = MetaValue.uint32(params["head_dim"])
    if arch == "llama":  # LlamaModel adds these; Qwen2Model does not
        if "vocab_size" in params:
            meta[key(Keys.LLM.VOCAB_SIZE)] = MetaValue.uint32(params["vocab_size"])
        rope_dim = params.get("head_dim") or params["hidden_size"] // params["num_attention_heads"]
        meta[key(Keys.Rope.DIMENSION_COUNT)] = MetaValue.uint32(rope_dim)
    return meta


def _rope_scaling(rope: dict, arch: str, source: Path) -> Metadata:
    kind, factor = rope.get("rope_type"), rope.get("factor")
    if kind in (None, "default", "llama3") or (kind in ("linear", "yarn") and factor is None):
        return {}  # llama3 scaling travels as the rope_freqs tensor (see rope_freqs)
    prefix = f"{arch}.rope.scaling."
    if kind in ("su", "longrope"):  # the converter records only the type for these
        return {prefix + "type": MetaValue.string("longrope")}
    if kind not in ("linear", "yarn"):
        log.warning("%s: RoPE scaling type %r is not written to GGUF", source, kind)
        return {}
    meta: Metadata = {
        prefix + "type": MetaValue.string(kind),
        prefix + "factor": MetaValue.float32(_number(factor, "rope_scaling.factor", source)),
    }
    if kind == "yarn":
        original = rope.get("original_max_position_embeddings")
        if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
            raise InputFileError(
                source, "yarn 'rope_scaling' needs a positive 'original_max_position_embeddings'"
            )
        meta[prefix + "original_context_length"] = MetaValue.uint32(original)
        optional = (("extrapolation_factor", "yarn_ext_factor"),
                    ("attention_factor", "yarn_attn_factor"), ("attn_factor", "yarn_attn_factor"),
                    ("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow"))
        for hf_key, gguf_key in optional:
            if rope.get(hf_key) is not None and prefix + gguf_key not in meta:
                value = _number(rope[hf_key], f"rope_scaling.{hf_key}", source)
                meta[prefix + gguf_key] = MetaValue.float32(value)
    return meta


# ---------------------------------------------------------------- tokenizer


def _tokenizer_metadata(folder: Path, params: dict, arch: str) -> Metadata:
    tokenizer_json = _read_json(folder / "tokenizer.json")
    tokenizer_config = _read_json(folder / "tokenizer_config.json")
    # The converter tries SentencePiece first, then tokenizer.json.
    if (folder / "tokenizer.model").is_file():
        vocab = _sentencepiece_vocab(folder, params.get("vocab_size"), tokenizer_config)
    elif tokenizer_json is not None:
        vocab = _bpe_vocab(folder, tokenizer_json, params.get("vocab_size"))
    else:
        raise MergeError(
            f"{folder}: has neither tokenizer.json nor tokenizer.model; a tokenizer is needed"
            " to write GGUF"
        )
    meta = _vocab_metadata(vocab)
    meta.update(_special_tokens(folder, tokenizer_json, tokenizer_config, params,
                                len(vocab.tokens)))
    meta.update(_chat_template_metadata(_chat_template(folder, tokenizer_config)))
    prefix_space = (tokenizer_config or {}).get("add_prefix_space")
    if arch == "llama" and isinstance(prefix_space, bool):  # LlamaModel.set_vocab
        meta[Keys.Tokenizer.ADD_PREFIX] = MetaValue.boolean(prefix_space)
    return meta


def _vocab_metadata(vocab: _Vocab) -> Metadata:
    meta: Metadata = {
        Keys.Tokenizer.MODEL: MetaValue.string(vocab.model),
        Keys.Tokenizer.PRE: MetaValue.string(vocab.pre),
        Keys.Tokenizer.LIST: MetaValue.array(GGUFValueType.STRING, vocab.tokens),
    }
    if vocab.scores is not None:
        meta[Keys.Tokenizer.SCORES] = MetaValue.array(GGUFValueType.FLOAT32, vocab.scores)
    meta[Keys.Tokenizer.TOKEN_TYPE] = MetaValue.array(GGUFValueType.INT32, vocab.types)
    if vocab.merges is not None:
        meta[Keys.Tokenizer.MERGES] = MetaValue.array(GGUFValueType.STRING, vocab.merges)
    return meta


def _read_json(path: Path) -> dict | None:
    """A JSON object file, or None when absent."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(path, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputFileError(path, "must hold a JSON object")
    return data


def _looks_special(text: str) -> bool:
    """Added tokens the converter makes CONTROL even when not flagged special."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _added_token_type(text: str, special: bool) -> tuple[str, int]:
    if special or _looks_special(text):
        return text, TokenType.CONTROL
    # llama.cpp expects user-defined tokens pre-normalized: spaces, not U+2581.
    return text.replace(_SPIECE_SPACE, " "), TokenType.USER_DEFINED


# ---------------------------------------------------------------- byte-level BPE


def _bpe_vocab(folder: Path, tokenizer: dict, vocab_size: int | None) -> _Vocab:
    path = folder / "tokenizer.json"
    model = tokenizer.get("model")
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise MergeError(
            f"{path}: holds a {kind or 'unknown'} tokenizer model; GGUF output needs a byte-level"
            " BPE tokenizer.json or a SentencePiece tokenizer.model"
        )
    if model.get("byte_fallback"):
        raise MergeError(
            f"{path}: a SentencePiece-style BPE (byte_fallback) tokenizer.json needs the"
            " tokenizer.model it came from to write GGUF"
        )
    text_by_id = _bpe_ids(path, model.get("vocab"))
    added = _added_tokens(path, tokenizer.get("added_tokens", []))
    text_by_id.update({token_id: text for token_id, (text, _) in added.items()})
    size = vocab_size or max(text_by_id) + 1
    if max(text_by_id) >= size:
        raise InputFileError(
            path, f"token id {max(text_by_id)} is not below the model's vocab_size {size}"
        )
    tokens, types = [], []
    for token_id in range(size):
        if token_id not in text_by_id:
            text, kind = f"[PAD{token_id}]", TokenType.UNUSED
        elif token_id in added:
            text, kind = _added_token_type(*added[token_id])
        else:
            text, kind = text_by_id[token_id], TokenType.NORMAL
        tokens.append(text)
        types.append(int(kind))
    return _Vocab("gpt2", _pre_tokenizer(path, tokenizer), tokens, types,
                  merges=_bpe_merges(folder, path, model.get("merges")))


def _bpe_ids(path: Path, vocab: Any) -> dict[int, str]:
    if not isinstance(vocab, dict) or not vocab:
        raise InputFileError(path, "'model.vocab' must be a non-empty object of token ids")
    text_by_id: dict[int, str] = {}
    for text, token_id in vocab.items():
        if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
            raise InputFileError(path, f"token {text!r} has id {token_id!r}, not an id")
        text_by_id[token_id] = text
    return text_by_id


def _added_tokens(path: Path, entries: Any) -> dict[int, tuple[str, bool]]:
    """id -> (content, special) of tokenizer.json's added_tokens."""
    if not isinstance(entries, list):
        raise InputFileError(path, "'added_tokens' must be a list")
    added: dict[int, tuple[str, bool]] = {}
    for entry in entries:
        token_id = entry.get("id") if isinstance(entry, dict) else None
        content = entry.get("content") if isinstance(entry, dict) else None
        if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0 \
                or not isinstance(content, str):
            raise InputFileError(path, f"added token {entry!r} needs an 'id' and a 'content'")
        added[token_id] = (content, bool(entry.get("special")))
    return added


def _bpe_merges(folder: Path, path: Path, merges: Any) -> list[str]:
    if isinstance(merges, list) and merges:
        return [_merge_text(path, merge) for merge in merges]
    lines = _merges_txt(folder / "merges.txt")
    if not lines:
        raise InputFileError(
            path, "has no BPE merges (nor a merges.txt beside it); llama.cpp needs them"
        )
    return lines


def _merge_text(path: Path, merge: Any) -> str:
    if isinstance(merge, str):
        return merge
    if isinstance(merge, list) and len(merge) == 2 and all(isinstance(p, str) for p in merge):
        # Pairs (tokenizers >= 0.20) may hold spaces; the "a b" form cannot, so the
        # converter writes a space inside a part as U+0120, GPT-2's byte symbol for it.
        return " ".join(part.replace(" ", "\u0120") for part in merge)
    raise InputFileError(path, f"merge {merge!r} is neither \"a b\" nor a pair of strings")


def _merges_txt(path: Path) -> list[str]:
    if not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputFileError(path, f"not UTF-8 text ({exc})") from None
    if lines and lines[0].startswith("#"):  # a "#version" header
        lines = lines[1:]
    merges = []
    for number, line in enumerate(lines, start=1):
        parts = line.split()
        if len(parts) == 2:
            merges.append(f"{parts[0]} {parts[1]}")
        elif parts:
            log.warning("%s: line %d is not a merge, ignored", path, number)
    return merges


def _pre_tokenizer(path: Path, tokenizer: dict) -> str:
    """tokenizer.ggml.pre from the pre-tokenizer's split regex; "default" when unknown."""
    pre = tokenizer.get("pre_tokenizer")
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) else []
    steps = [s for s in (steps if steps else [pre]) if isinstance(s, dict)]
    splits = [s.get("pattern") for s in steps if s.get("type") == "Split"]
    regexes = [p.get("Regex") for p in splits if isinstance(p, dict)]
    # Byte-level with its own (GPT-2) regex turned off, so the Split regex is the only one.
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if len(regexes) == 1 and len(steps) == 2 and byte_level \
            and byte_level[0].get("use_regex") is False and regexes[0] in _PRE_BY_REGEX:
        return _PRE_BY_REGEX[regexes[0]]
    log.warning(
        "%s: pre-tokenizer not recognised; writing tokenizer.ggml.pre = 'default', which"
        " llama.cpp may split text with differently", path,
    )
    return "default"


# ---------------------------------------------------------------- SentencePiece


def _sentencepiece_vocab(folder: Path, vocab_size: int | None, config: dict | None) -> _Vocab:
    path = folder / "tokenizer.model"
    pieces = read_sentencepiece(path)
    size = vocab_size or len(pieces)
    if len(pieces) > size:
        log.warning("%s: %d pieces beyond vocab_size %d ignored", path, len(pieces) - size, size)
    tokens = [f"[PAD{i}]" for i in range(size)]
    scores = [_PAD_SCORE] * size
    types = [int(TokenType.UNUSED)] * size
    for token_id, (text, score, kind) in enumerate(pieces[:size]):
        tokens[token_id], scores[token_id], types[token_id] = text, score, int(_SP_TYPES[kind])
    for token_id, text, kind in _sentencepiece_additions(folder, config, size):
        tokens[token_id], scores[token_id], types[token_id] = text, _ADDED_SCORE, int(kind)
    return _Vocab("llama", "default", tokens, types, scores=scores)


def _sentencepiece_additions(
    folder: Path, config: dict | None, size: int
) -> Iterator[tuple[int, str, int]]:
    """(id, text, type) of added_tokens.json, then tokenizer_config's added_tokens_decoder."""
    path = folder / "added_tokens.json"
    for text, token_id in (_read_json(path) or {}).items():
        if _in_vocab(path, token_id, size):
            yield token_id, text, TokenType.USER_DEFINED
    path = folder / "tokenizer_config.json"
    decoder = (config or {}).get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise InputFileError(path, "'added_tokens_decoder' must be an object")
    for key, entry in decoder.items():
        content = entry.get("content") if isinstance(entry, dict) else None
        if not str(key).isdecimal() or not isinstance(content, str):
            raise InputFileError(path, f"added token {key!r} needs a numeric id and a 'content'")
        if _in_vocab(path, int(key), size):
            yield (int(key), *_added_token_type(content, bool(entry.get("special"))))


def _in_vocab(path: Path, token_id: Any, size: int) -> bool:
    if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
        raise InputFileError(path, f"token id {token_id!r} is not a non-negative integer")
    if token_id >= size:
        log.warning("%s: token id %d is beyond vocab_size %d, ignored", path, token_id, size)
    return token_id < size


def read_sentencepiece(path: Path) -> list[tuple[str, float, int]]:
    """(piece, score, type) of every piece of a SentencePiece ModelProto file."""
    if path.stat().st_size > _SP_MAX_BYTES:
        raise InputFileError(path, f"larger than {_SP_MAX_BYTES >> 20} MiB; not a tokenizer model")
    data = path.read_bytes()
    pieces = []
    # ModelProto: field 1 is "repeated SentencePiece pieces"; the specs that follow
    # (trainer, normalizer, ...) do not matter to GGUF.
    for number, wire, value in _proto_fields(path, data):
        if number == 1:
            if wire != 2:
                raise InputFileError(path, "malformed SentencePiece model: pieces not a message")
            pieces.append(_sentencepiece_piece(path, value, len(pieces)))
    if not pieces:
        raise InputFileError(path, "holds no SentencePiece pieces; not a tokenizer model")
    return pieces


def _sentencepiece_piece(path: Path, data: bytes, index: int) -> tuple[str, float, int]:
    """SentencePiece message: piece = 1 (string), score = 2 (float), type = 3 (enum)."""
    text, score, kind = None, 0.0, 1  # proto defaults: score 0, type NORMAL
    for number, wire, value in _proto_fields(path, data):
        if number in (1, 2, 3) and wire != (2, 5, 0)[number - 1]:
            raise InputFileError(
                path, f"malformed SentencePiece model: piece {index} field {number} has"
                f" wire type {wire}"
            )
        if number == 1:
            try:
                text = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise InputFileError(path, f"piece {index} is not UTF-8 text") from None
        elif number == 2:
            score = struct.unpack("<f", struct.pack("<I", value))[0]
        elif number == 3:
            kind = value
    if not text:
        raise InputFileError(path, f"piece {index} has no text")
    if not math.isfinite(score):
        raise InputFileError(path, f"piece {index} ({text!r}) has a non-finite score")
    if kind not in _SP_TYPES:
        raise InputFileError(path, f"piece {index} ({text!r}) has unknown type {kind}")
    return text, score, kind


def _proto_fields(path: Path, data: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one protobuf message; bytes for wire type 2."""
    view, pos = memoryview(data), 0
    while pos < len(view):
        key, pos = _varint(path, view, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise InputFileError(path, "malformed protobuf: field number 0")
        if wire == 0:
            value, pos = _varint(path, view, pos)
        elif wire in (1, 5):  # fixed 64 / 32 bits, little-endian
            width = 8 if wire == 1 else 4
            value, pos = int.from_bytes(_take(path, view, pos, width), "little"), pos + width
        elif wire == 2:
            length, pos = _varint(path, view, pos)
            value, pos = _take(path, view, pos, length), pos + length
        else:  # 3/4 are deprecated groups, 6/7 do not exist
            raise InputFileError(path, f"malformed protobuf: wire type {wire}")
        yield number, wire, value


def _varint(path: Path, view: memoryview, pos: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):  # at most 10 bytes encode 64 bits
        if pos >= len(view):
            raise InputFileError(path, "malformed protobuf: truncated varint")
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    raise InputFileError(path, "malformed protobuf: varint longer than 10 bytes")


def _take(path: Path, view: memoryview, pos: int, length: int) -> memoryview:
    if length > len(view) - pos:
        raise InputFileError(path, "malformed protobuf: field runs past the end of the file")
    return view[pos:pos + length]


# ---------------------------------------------------------------- special tokens


def _special_tokens(folder: Path, tokenizer: dict | None, tokenizer_config: dict | None,
                    params: dict, n_vocab: int) -> Metadata:
    """Special token ids and add_*_token flags, found as gguf-py's SpecialVocab finds them."""
    named = _named_special_tokens(tokenizer_config)
    flags: dict[str, bool] = {}
    if tokenizer is not None:
        flags.update(_template_flags(tokenizer, named, tokenizer_config is not None))
    ids: dict[str, int] = {}
    added = (tokenizer or {}).get("added_tokens") or []
    for kind in _ID_KEYS:
        flag = (tokenizer_config or {}).get(f"add_{kind}_token")
        if isinstance(flag, bool):  # tokenizer_config.json overrides the template
            flags[kind] = flag
        # As in SpecialVocab, a token named in tokenizer_config.json gets its id from
        # tokenizer.json's added tokens (the first with that content), or none.
        found = next((entry.get("id") for entry in added if isinstance(entry, dict)
                      and kind in named and entry.get("content") == named[kind]), None)
        _set_special(ids, kind, found, n_vocab, folder / "tokenizer.json")
    for kind in _ID_KEYS:  # then config.json's <kind>_token_id
        _set_special(ids, kind, params.get(f"{kind}_token_id"), n_vocab, folder / "config.json")
    meta: Metadata = {_ID_KEYS[kind]: MetaValue.uint32(token_id) for kind, token_id in ids.items()}
    for kind, flag in flags.items():
        if kind in _ADD_KEYS:  # gguf has no add_* key for the other kinds
            meta[_ADD_KEYS[kind]] = MetaValue.boolean(flag)
    return meta


def _named_special_tokens(config: dict | None) -> dict[str, str]:
    """kind -> token text named by tokenizer_config.json (a string or {"content": ...})."""
    named = {}
    for kind in (*_ID_KEYS, "cls"):
        entry = (config or {}).get(f"{kind}_token")
        text = entry.get("content") if isinstance(entry, dict) else entry
        if isinstance(text, str) and text:
            named[kind] = text
    # BERT-style names stand in for bos/eos, as in SpecialVocab.
    named.setdefault("bos", named.get("cls", ""))
    named.setdefault("eos", named.get("sep", ""))
    return {kind: text for kind, text in named.items() if text}


def _template_flags(tokenizer: dict, named: dict[str, str], has_config: bool) -> dict[str, bool]:
    """add_bos/add_eos from a TemplateProcessing post-processor's single-sequence template."""
    post = tokenizer.get("post_processor")
    steps = post.get("processors", [post]) if isinstance(post, dict) else []
    flags: dict[str, bool] = {}
    for step in steps:
        single = step.get("single") if isinstance(step, dict) else None
        if step.get("type") != "TemplateProcessing" or not isinstance(single, list) \
                or len(single) < 2:
            continue
        first, last = _template_special(single[0]), _template_special(single[-1])
        # Without a tokenizer_config.json the template itself defines bos and eos.
        if first:
            flags["bos"] = not has_config or first in (named.get("bos"), named.get("cls"))
        if last:
            flags["eos"] = not has_config or last == named.get("eos")
    return flags


def _template_special(item: Any) -> str | None:
    special = item.get("SpecialToken") if isinstance(item, dict) else None
    token = special.get("id") if isinstance(special, dict) else None
    return token if isinstance(token, str) and token else None


def _set_special(ids: dict[str, int], kind: str, token_id: Any, n_vocab: int, source: Path) -> None:
    """Record a special id unless one is known already (first source wins)."""
    # Lists (several eos ids in Llama 3.1's config.json) are skipped, as the converter does.
    if kind in ids or isinstance(token_id, bool) or not isinstance(token_id, int):
        return
    if not 0 <= token_id < n_vocab:
        log.warning("%s: %s token id %d is not in the vocabulary of %d, ignored",
                    source, kind, token_id, n_vocab)
        return
    ids[kind] = token_id


# ---------------------------------------------------------------- chat template


def _chat_template(folder: Path, config: dict | None) -> str | list | None:
    """tokenizer_config.json's chat_template, else chat_template.jinja / .json."""
    if config is None:  # SpecialVocab looks for templates only beside a tokenizer_config
        return None
    fallback: str | list | None = None
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        fallback = _read_text(jinja)
        extra = sorted((folder / "additional_chat_templates").glob("*.jinja"))
        if extra:
            fallback = [{"name": "default", "template": fallback}] + [
                {"name": p.stem, "template": _read_text(p)} for p in extra]
    elif (folder / "chat_template.json").is_file():
        fallback = (_read_json(folder / "chat_template.json") or {}).get("chat_template")
    template = config.get("chat_template", fallback)
    if template is None or isinstance(template, (str, list)):
        return template
    log.warning("%s: chat_template is neither text nor a list, ignored",
                folder / "tokenizer_config.json")
    return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputFileError(path, f"not UTF-8 text ({exc})") from None


def _chat_template_metadata(template: str | list | None) -> Metadata:
    if isinstance(template, str):
        return {Keys.Tokenizer.CHAT_TEMPLATE: MetaValue.string(template)}
    meta: Metadata = {}
    names: list[str] = []
    default = None
    for choice in template or []:
        name = choice.get("name", "") if isinstance(choice, dict) else ""
        text = choice.get("template") if isinstance(choice, dict) else None
        # Only letters, digits and "_" in key names, as gguf-py's writer does.
        name = "".join(c if c.isascii() and c.isalnum() else "_" for c in str(name))
        if not name or not isinstance(text, str):
            continue
        if name == "default":
            default = text
        elif name not in names:
            names.append(name)
            meta[Keys.Tokenizer.CHAT_TEMPLATE_N.format(name=name)] = MetaValue.string(text)
    if names:
        meta[Keys.Tokenizer.CHAT_TEMPLATES] = MetaValue.array(GGUFValueType.STRING, names)
    if default is not None:
        meta[Keys.Tokenizer.CHAT_TEMPLATE] = MetaValue.string(default)
    return meta
