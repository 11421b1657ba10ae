"""Present every input under one naming: Hugging Face names, or GGUF names.

Experts may mix formats. Each model whose own naming differs from the
output's is renamed through the GGUF name map of its architecture, and its
Llama-family q/k weights are marked for the row permutation llama.cpp's
converter applies, so that the same tensor of every input lines up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial

from ..errors import MergeError
from ..io import Model
from ..io.gguf_names import NameMap, gguf_architecture, is_dropped_by_converter, name_map

HF, GGUF = "hf", "gguf"
# GGUF tensors computed from the config by llama.cpp's converter (Llama 3 rope scaling),
# with no Hugging Face counterpart.
DERIVED_GGUF_TENSORS = ("rope_freqs.weight",)


def model_naming(model: Model) -> str:
    return GGUF if model.is_gguf else HF


def present(model: Model, naming: str) -> Model:
    """The model with its tensors named (and rows ordered) as the output wants them."""
    if model_naming(model) == naming:
        return model
    names = model_name_map(model)
    tensors = {}
    for info in model.tensors.values():
        if naming == GGUF:
            if is_dropped_by_converter(info.name):
                continue
            new_name = names.to_gguf(info.name)
            heads = names.qk_heads(new_name)
        else:
            if info.name in DERIVED_GGUF_TENSORS:
                continue
            new_name = names.to_hf(info.name)
            heads = names.qk_heads(info.name)
        tensors[new_name] = replace(info, name=new_name, permute_heads=heads,
                                    permute_to_gguf=naming == GGUF)
    return replace(model, tensors=tensors)


def model_name_map(model: Model) -> NameMap:
    """The name map of a model's architecture, from its GGUF metadata or its config.json."""
    if model.is_gguf:
        metadata = model.gguf_metadata
        arch = _meta(model, "general.architecture")
        return name_map(arch, _meta(model, f"{arch}.block_count"),
                        _meta(model, f"{arch}.attention.head_count"),
                        metadata.get(f"{arch}.attention.head_count_kv",
                                     metadata[f"{arch}.attention.head_count"]).value)
    config = model.config()
    if not config:
        raise MergeError(f"{model.label}: has no config.json, needed to map its tensor names"
                         " to GGUF names")
    arch = gguf_architecture(config, model.label)
    try:
        heads = config["num_attention_heads"]
        return name_map(arch, config["num_hidden_layers"], heads,
                        config.get("num_key_value_heads") or heads)
    except KeyError as exc:
        raise MergeError(f"{model.label}: config.json has no {exc.args[0]!r}") from None


def _meta(model: Model, key: str):
    entry = model.gguf_metadata.get(key)
    if entry is None:
        raise MergeError(f"{model.label}: GGUF metadata has no {key!r}, needed to map its"
                         " tensor names")
    return entry.value


def filter_names(models: list[Model], naming: str) -> Callable[[str], str]:
    """The name a tensor's parameter filters match against.

    mergekit filters (self_attn, mlp, ...) are written for Hugging Face names;
    GGUF-named tensors are matched under their Hugging Face name when the
    architecture's map is known, and under their own otherwise.
    """
    if naming == HF:
        return _same
    for model in models:
        try:
            return partial(_hf_name, model_name_map(model))
        except MergeError:
            continue
    return _same


def _same(name: str) -> str:
    return name


def _hf_name(names: NameMap, name: str) -> str:
    try:
        return names.to_hf(name)
    except MergeError:
        return name
