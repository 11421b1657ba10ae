"""llama.cpp's quantization mixes: which ggml type each tensor of a GGUF file gets.

A file type such as Q4_K_M is not one type but a recipe: most matrices get the default type
(Q4_K), a few sensitive ones get more bits (attn_v and ffn_down on some layers, the output
matrix), 1-D tensors stay float32, and rows that a block type cannot tile fall back to a
smaller block. This module follows ``llama_tensor_get_type`` and ``tensor_type_fallback`` of
llama.cpp's src/llama-quant.cpp for the llama and qwen2 architectures without an importance
matrix, so a merged model written straight to GGUF gets the types llama-quantize would give.
"""

import re

import gguf

from ..errors import MergeError

_T = gguf.GGMLQuantizationType
_F = gguf.LlamaFileType

# Name -> LlamaFileType value, the number stored as general.file_type.
FILE_TYPES: dict[str, int] = {
    "F32": _F.ALL_F32.value,
    "F16": _F.MOSTLY_F16.value,
    "BF16": _F.MOSTLY_BF16.value,
    "Q8_0": _F.MOSTLY_Q8_0.value,
    "Q4_0": _F.MOSTLY_Q4_0.value,
    "Q4_1": _F.MOSTLY_Q4_1.value,
    "Q5_0": _F.MOSTLY_Q5_0.value,
    "Q5_1": _F.MOSTLY_Q5_1.value,
    "Q4_K_S": _F.MOSTLY_Q4_K_S.value,
    "Q4_K_M": _F.MOSTLY_Q4_K_M.value,
    "Q5_K_S": _F.MOSTLY_Q5_K_S.value,
    "Q5_K_M": _F.MOSTLY_Q5_K_M.value,
    "Q6_K": _F.MOSTLY_Q6_K.value,
}

# llama-quantize accepts these short names for the _M mixes.
_ALIASES = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

# llama_ftype_get_default_type: the type of an ordinary matrix.
_DEFAULT_TYPE = {
    "F32": _T.F32, "F16": _T.F16, "BF16": _T.BF16, "Q8_0": _T.Q8_0,
    "Q4_0": _T.Q4_0, "Q4_1": _T.Q4_1, "Q5_0": _T.Q5_0, "Q5_1": _T.Q5_1,
    "Q4_K_S": _T.Q4_K, "Q4_K_M": _T.Q4_K, "Q5_K_S": _T.Q5_K, "Q5_K_M": _T.Q5_K,
    "Q6_K": _T.Q6_K,
}
_FLOAT_TYPES = (_T.F32, _T.F16, _T.BF16)

# tensor_type_fallback: a 256-block type whose block does not divide the row length.
_FALLBACK = {
    _T.IQ1_S: _T.IQ4_NL, _T.IQ1_M: _T.IQ4_NL, _T.IQ2_XXS: _T.IQ4_NL, _T.IQ2_XS: _T.IQ4_NL,
    _T.IQ2_S: _T.IQ4_NL, _T.IQ3_XXS: _T.IQ4_NL, _T.IQ3_S: _T.IQ4_NL, _T.IQ4_XS: _T.IQ4_NL,
    _T.Q2_K: _T.Q4_0, _T.Q3_K: _T.Q4_0, _T.TQ1_0: _T.Q4_0, _T.TQ2_0: _T.Q4_0,
    _T.Q4_K: _T.Q5_0, _T.Q5_K: _T.Q5_1, _T.Q6_K: _T.Q8_0,
}

# tensor_allows_quantization: names (substrings) llama.cpp never quantizes.
_NEVER_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight",
    "time_mix_w1.weight", "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight",
    "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight",
    "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight",
    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd",
    ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)
_NEVER_QUANTIZED_EXACT = ("position_embd.weight", "token_types.weight")

_LAYER = re.compile(r"blk\.(\d+)\.")


def parse_file_type(name: str) -> str:
    """The canonical file type name for ``name`` (any case, Q4_K/Q5_K meaning the _M mix)."""
    key = name.strip().upper()
    key = _ALIASES.get(key, key)
    if key not in FILE_TYPES:
        valid = ", ".join([*FILE_TYPES, *_ALIASES])
        raise MergeError(f"unknown GGUF file type {name!r}; valid: {valid}")
    return key


def default_type(file_type: str) -> int:
    """The ggml type of an ordinary matrix in ``file_type``."""
    return _DEFAULT_TYPE[parse_file_type(file_type)].value


def is_70b(architecture: str, n_layers: int, n_head: int, n_head_kv: int) -> bool:
    """llama.cpp's LLM_TYPE_70B, the only model size its mixes look at: 80 layers, and for
    llama grouped-query attention (n_head != n_head_kv; without it the model is a 65B)."""
    if architecture == "llama":
        return n_layers == 80 and n_head != n_head_kv
    return architecture == "qwen2" and n_layers == 80


def _ggml_n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims: ggml's ne is the numpy shape reversed, and trailing 1s of ne do not count
    (so a numpy shape (1, n) is 1-D to llama.cpp)."""
    for index, size in enumerate(shape):
        if size > 1:
            return len(shape) - index
    return 1


def _allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    if _ggml_n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    if name in _NEVER_QUANTIZED_EXACT:
        return False
    return not any(part in name for part in _NEVER_QUANTIZED)


def _category(name: str) -> str:
    """tensor_get_category, in its order of checks (substring matches)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for part, category in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"),
                           ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
                           ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                           ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                           ("ffn_down", "ffn_down")):
        if part in name:
            return category
    return "other"


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The first and last eighth of the layers, and every third layer in between."""
    return (i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8
            or (i_layer - n_layers // 8) % 3 == 2)


def _layer_of(name: str) -> int:
    match = _LAYER.match(name)
    if match is None:
        raise MergeError(f"{name}: no blk.N. layer index in the tensor name")
    return int(match.group(1))


def _mixed_type(file_type: str, name: str, row_length: int, n_layers: int,
                tied_embeddings: bool, n_expert: int, is_70b: bool) -> _T:
    """llama_tensor_get_type_impl for the supported file types (llama / qwen2, no imatrix).

    attn_v and ffn_down count their tensors in llama.cpp; one per layer, as in llama and
    qwen2, makes that count the layer index of the name."""
    new_type = _DEFAULT_TYPE[file_type]
    category = _category(name)
    if category == "output" or (tied_embeddings and category == "token_embd"):
        # The output matrix (or the token embedding that doubles as it) gets Q6_K unless the
        # mix is Q8_0, or Q8_0 when the default block does not tile its rows.
        if row_length % gguf.GGML_QUANT_SIZES[new_type][0] != 0:
            return _T.Q8_0
        return new_type if new_type == _T.Q8_0 else _T.Q6_K
    if category == "attn_v":
        i_layer = _layer_of(name)
        if (file_type in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i_layer, n_layers)):
            new_type = _T.Q6_K
        elif file_type == "Q4_K_S" and i_layer < 4:
            new_type = _T.Q5_K
        if is_70b and new_type in (_T.Q3_K, _T.Q4_K):
            new_type = _T.Q5_K  # attn_v of a 70B is 8x smaller than attn_q (GQA): cheap bits
        if n_expert == 8:
            new_type = _T.Q8_0
    elif category == "attn_k":
        if n_expert == 8:
            new_type = _T.Q8_0
    elif category == "ffn_down":
        i_layer = _layer_of(name)
        if file_type == "Q4_K_M":
            if _use_more_bits(i_layer, n_layers):
                new_type = _T.Q6_K
        elif file_type == "Q5_K_M" and _use_more_bits(i_layer, n_layers):
            new_type = _T.Q6_K
        elif file_type == "Q4_K_S" and i_layer < n_layers // 8:
            new_type = _T.Q5_K
    elif category == "attn_output" and n_expert == 8 and file_type in ("Q4_K_S", "Q4_K_M"):
        new_type = _T.Q5_K
    return new_type


def _fallback(qtype: _T, row_length: int) -> _T:
    """tensor_type_fallback: a smaller block when the rows do not split into whole blocks,
    and F16 when even that one does not fit."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if row_length % block == 0:
        return qtype
    if qtype in _FALLBACK:
        qtype = _FALLBACK[qtype]
    elif block > 32:
        raise MergeError(f"no fallback type is defined for {qtype.name}")
    if row_length % gguf.GGML_QUANT_SIZES[qtype][0] != 0:
        return _T.F16
    return qtype


def tensor_type(file_type: str, gguf_name: str, shape: tuple[int, ...], n_layers: int, *,
                tied_embeddings: bool = False, n_expert: int = 0, is_70b: bool = False) -> int:
    """The ggml type of one tensor (shape in numpy order, rows last) in a ``file_type`` file.

    ``gguf_name`` is the GGUF tensor name (``blk.3.attn_v.weight``); ``n_layers`` the
    model's block count. ``tied_embeddings``: the model has no ``output.weight``, so
    ``token_embd.weight`` doubles as the output matrix and gets its type. ``n_expert`` (8:
    Mixtral-style rules) and ``is_70b`` (llama.cpp's LLM_TYPE_70B: 80 layers with grouped
    query attention, which bumps Q4_K attn_v to Q5_K) select llama.cpp's model-specific rules.

    Tensors llama.cpp does not quantize (1-D ones such as norms and biases, names not ending
    in ``weight``, and its list of exceptions) are float32 here in every mix: llama.cpp keeps
    their input type, and a merge produces float32 values.
    """
    file_type = parse_file_type(file_type)
    if not _allows_quantization(gguf_name, shape):
        return _T.F32.value
    new_type = _DEFAULT_TYPE[file_type]
    if new_type in _FLOAT_TYPES:
        return new_type.value  # llama.cpp applies the mix rules to quantized defaults only
    row_length = shape[-1]
    new_type = _mixed_type(file_type, gguf_name, row_length, n_layers, tied_embeddings,
                           n_expert, is_70b)
    return _fallback(new_type, row_length).value
