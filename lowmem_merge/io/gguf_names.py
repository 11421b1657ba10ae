"""Hugging Face <-> GGUF tensor names for the llama, mistral and qwen2 families.

The GGUF side follows llama.cpp's convert_hf_to_gguf.py: Llama and Mistral
checkpoints become GGUF architecture "llama", Qwen2 becomes "qwen2". For "llama"
the converter also reorders the rows of q_proj and k_proj (see qk_row_order).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import gguf
import numpy as np

from ..errors import MergeError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")  # GGUF general.architecture values we map

# HF class names (config.json "architectures") and model types we accept.
_BY_HF_CLASS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",  # the converter writes Mistral as "llama"
    "Qwen2ForCausalLM": "qwen2",
}
_BY_MODEL_TYPE = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_GGUF_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}

# Tensors of these families as transformers names them; the GGUF names come from
# gguf-py's own TensorNameMap so that they always match the installed gguf.
_GLOBAL_TENSORS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")
# Projections may carry a bias (qwen2 q/k/v; llama with attention_bias / mlp_bias).
_LAYER_LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
# The converter skips tensors whose names end so (prepare_tensors): they are
# recomputed buffers, not weights.
_DROPPED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")
_QK_NAME = re.compile(r"blk\.\d+\.attn_(q|k)\.(weight|bias)")


def _supported_list() -> str:
    return ", ".join(sorted(_BY_HF_CLASS))


def gguf_architecture(config: dict, source: str) -> str:
    """GGUF architecture for an HF config.json (architectures[0] / model_type); MergeError naming
    source and the unsupported architecture and listing the supported ones otherwise."""
    classes = config.get("architectures")
    if isinstance(classes, list) and classes:
        hf_class = classes[0]
        if hf_class in _BY_HF_CLASS:
            return _BY_HF_CLASS[hf_class]
        raise MergeError(
            f"{source}: architecture {hf_class!r} cannot be written as GGUF; supported:"
            f" {_supported_list()} (GGUF architectures {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    model_type = config.get("model_type")
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    what = f"model_type {model_type!r}" if model_type else "no 'architectures' or 'model_type'"
    raise MergeError(
        f"{source}: {what} cannot be written as GGUF; supported: {_supported_list()}"
        f" (GGUF architectures {', '.join(SUPPORTED_ARCHITECTURES)})"
    )


def is_dropped_by_converter(hf_name: str) -> bool:
    """True for HF tensors llama.cpp's converter leaves out (rotary inv_freq and the like)."""
    return hf_name.endswith(_DROPPED_SUFFIXES)


def _hf_names(n_layers: int) -> list[str]:
    names = list(_GLOBAL_TENSORS)
    for layer in range(n_layers):
        prefix = f"model.layers.{layer}."
        names += [f"{prefix}{norm}.weight" for norm in _LAYER_NORMS]
        for linear in _LAYER_LINEARS:
            names += [f"{prefix}{linear}.weight", f"{prefix}{linear}.bias"]
    return names


@lru_cache(maxsize=16)
def _tables(architecture: str, n_layers: int) -> tuple[dict[str, str], dict[str, str]]:
    """(HF -> GGUF, GGUF -> HF) for one architecture and depth."""
    if architecture not in _GGUF_ARCH:
        raise MergeError(f"GGUF architecture {architecture!r} is not supported")
    tensor_map = gguf.get_tensor_name_map(_GGUF_ARCH[architecture], n_layers)
    to_gguf: dict[str, str] = {}
    for hf_name in _hf_names(n_layers):
        gguf_name = tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:  # would mean an incompatible gguf package
            raise MergeError(f"the installed gguf package cannot map tensor {hf_name!r}")
        to_gguf[hf_name] = gguf_name
    to_hf = {gguf_name: hf_name for hf_name, gguf_name in to_gguf.items()}
    if len(to_hf) != len(to_gguf):
        raise MergeError(f"the installed gguf package maps two {architecture} tensors to one name")
    return to_gguf, to_hf


@dataclass(frozen=True)
class NameMap:
    """Tensor names of one model in both conventions, and the q/k heads to permute with."""

    architecture: str
    n_layers: int
    n_head: int
    n_head_kv: int

    def to_gguf(self, hf_name: str) -> str:
        name = _tables(self.architecture, self.n_layers)[0].get(hf_name)
        if name is None:
            raise MergeError(
                f"tensor {hf_name!r} has no GGUF name for a {self.n_layers}-layer"
                f" {self.architecture} model"
            )
        return name

    def to_hf(self, gguf_name: str) -> str:
        name = _tables(self.architecture, self.n_layers)[1].get(gguf_name)
        if name is None:
            raise MergeError(
                f"GGUF tensor {gguf_name!r} has no Hugging Face name for a {self.n_layers}-layer"
                f" {self.architecture} model"
            )
        return name

    def qk_heads(self, gguf_name: str) -> int:
        """Head count to permute this tensor's rows with; 0 when it is stored as in HF."""
        self.to_hf(gguf_name)  # unknown names are an error, not "not permuted"
        match = _QK_NAME.fullmatch(gguf_name)
        # Only the llama converter permutes; qwen2 stores q/k as HF does.
        if self.architecture != "llama" or match is None:
            return 0
        return self.n_head if match.group(1) == "q" else self.n_head_kv


def name_map(architecture: str, n_layers: int, n_head: int, n_head_kv: int) -> NameMap:
    """The NameMap of a model; MergeError for an unsupported architecture or bad counts."""
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise MergeError(
            f"GGUF architecture {architecture!r} is not supported; supported:"
            f" {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    for label, value in (("layers", n_layers), ("heads", n_head), ("key/value heads", n_head_kv)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise MergeError(f"number of {label} must be a positive integer, got {value!r}")
    if n_head % n_head_kv:
        raise MergeError(f"{n_head} attention heads do not divide into {n_head_kv} key/value heads")
    return NameMap(architecture, n_layers, n_head, n_head_kv)


def qk_row_order(n_rows: int, heads: int, to_gguf: bool) -> np.ndarray:
    """order[r] = the stored row that output row r comes from, for HF->GGUF (to_gguf=True)
    or GGUF->HF."""
    if heads <= 0 or n_rows <= 0 or n_rows % (2 * heads):
        raise MergeError(f"{n_rows} rows cannot be split into {heads} rotary heads of even size")
    half = n_rows // heads // 2
    rows = np.arange(n_rows, dtype=np.int64)
    # HF keeps each head's rotary pairs as two halves [x0..x(d/2-1) | y0..]; llama.cpp
    # wants them interleaved [x0 y0 x1 y1 ...]. Row h*d + 2j + t comes from h*d + t*d/2 + j.
    if to_gguf:
        return rows.reshape(heads, 2, half).transpose(0, 2, 1).reshape(-1)
    return rows.reshape(heads, half, 2).transpose(0, 2, 1).reshape(-1)
