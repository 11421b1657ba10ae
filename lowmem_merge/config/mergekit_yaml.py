"""mergekit YAML configs -> one validated MergeJob, before any tensor is read.

Keys mean what they mean in mergekit. What lowmem-merge cannot honour (a
tokenizer union, token surgery, chat templates, modules, residual weights)
is refused with a message naming the key and its line, never ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..engine import MergeJob, OutputSlice, SliceSource
from ..errors import MergeError
from ..methods import MergeMethod, get_method
from .plan import build_job
from .settings import check_setting, resolve
from .yaml_lines import LinedDict, load_yaml

# lowmem-merge's own keys: how to run the merge (the command line's options win).
RUN_KEYS = {"executor", "ray_address"}
TOP_KEYS = {"merge_method", "models", "slices", "base_model", "parameters", "dtype",
            "out_dtype", "tokenizer_source", "tokenizer", "chat_template", "modules", "name",
            *RUN_KEYS}
MODEL_KEYS = {"model", "parameters"}
SLICE_KEYS = {"sources", "base_model", "parameters", "residual_weight"}
SOURCE_KEYS = {"model", "layer_range", "parameters"}
COMPUTE_DTYPES = {"float32", "float16", "bfloat16", "float64", "fp32", "fp16", "bf16"}


class _Where:
    """Error messages that point at a key of the config file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, mapping: Any, key: str, problem: str) -> MergeError:
        line = mapping.line(key) if isinstance(mapping, LinedDict) else None
        where = f"{self.path}:{line}" if line else str(self.path)
        return MergeError(f"{where}: {key}: {problem}")

    def mapping(self, value: Any, owner: Any, key: str, allowed: set[str]) -> LinedDict:
        if not isinstance(value, LinedDict):
            raise self.error(owner, key, f"expected a mapping, got {type(value).__name__}")
        for name in value:
            if name not in allowed:
                raise self.error(value, name, f"unknown key; expected one of {sorted(allowed)}")
        return value

    def text(self, owner: Any, key: str) -> str:
        value = owner.get(key)
        if not isinstance(value, str) or not value:
            raise self.error(owner, key, f"expected a model name or path, got {value!r}")
        return value


def job_from_yaml(path: str | Path, output: str | Path, **options: Any) -> MergeJob:
    """Read a mergekit config; options are build_job's (max_memory, threads, force, ...)."""
    where = _Where(Path(path))
    config = load_yaml(Path(path))
    if not isinstance(config, LinedDict):
        raise MergeError(f"{path}: a merge config must be a YAML mapping")
    where.mapping(config, config, "config", TOP_KEYS)
    _refuse_unsupported(where, config)
    if "merge_method" not in config:
        raise MergeError(f"{path}: merge_method is required")
    method = _method(where, config)
    base = where.text(config, "base_model") if "base_model" in config else None
    params = _parameters(where, config, "parameters", method, model_level=False)
    options = {**options, "dtype": _out_dtype(where, config, Path(output))}
    for key in RUN_KEYS:
        if options.get(key) is None and key in config:
            options[key] = where.text(config, key)
    if ("models" in config) == ("slices" in config):
        raise MergeError(f"{path}: give exactly one of 'models' or 'slices'")
    build = _models_job if "models" in config else _slices_job
    try:
        job = build(where, config, method, base, params, output, options)
    except MergeError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise MergeError(f"{path}: {exc}") from None
    source = config.get("tokenizer_source")
    if source not in (None, "base"):
        job.companions_from = str(source)
    return job


def _refuse_unsupported(where: _Where, config: LinedDict) -> None:
    if config.get("tokenizer_source") == "union":
        raise where.error(config, "tokenizer_source", "'union' needs embedding surgery to merge"
                          " vocabularies, which lowmem-merge does not do; use 'base' or a model")
    for key, why in (("tokenizer", "token surgery (adding or remapping tokens)"),
                     ("chat_template", "writing a chat template into the tokenizer config"),
                     ("modules", "per-module merges")):
        if config.get(key) is not None:
            raise where.error(config, key, f"{why} is not supported by lowmem-merge")


def _method(where: _Where, config: LinedDict) -> MergeMethod:
    name = config["merge_method"]
    try:
        return get_method(str(name))
    except MergeError as exc:
        raise where.error(config, "merge_method", str(exc)) from None


def _out_dtype(where: _Where, config: LinedDict, output: Path) -> str | None:
    for key in ("dtype", "out_dtype"):
        gguf_type = key == "out_dtype" and output.suffix.lower() == ".gguf"
        if key in config and config[key] not in COMPUTE_DTYPES and not gguf_type:
            raise where.error(config, key, f"unknown dtype {config[key]!r}")
    # Sums are float64 whatever 'dtype' says; it sets the output dtype unless out_dtype does.
    chosen = config.get("out_dtype") or config.get("dtype")
    return None if chosen in (None, "float64") else chosen


def _parameters(where: _Where, owner: Any, key: str, method: MergeMethod,
                model_level: bool) -> dict[str, Any]:
    if owner.get(key) is None:
        return {}
    params = owner[key]
    known = {p.name: p for p in (method.model_params if model_level
                                 else method.params + method.model_params)}
    where.mapping(params, owner, key, set(known))
    for name, setting in params.items():
        try:
            check_setting(known[name], setting, "")
        except MergeError as exc:
            raise where.error(params, name, str(exc)) from None
    return dict(params)


def _models_job(where: _Where, config: LinedDict, method: MergeMethod, base: str | None,
                params: dict[str, Any], output, options) -> MergeJob:
    entries = config["models"]
    if not isinstance(entries, list) or not entries:
        raise where.error(config, "models", "expected a list of {model: ..., parameters: ...}")
    models, per_model = [], []
    for entry in entries:
        entry = where.mapping(entry, config, "models", MODEL_KEYS)
        models.append(where.text(entry, "model"))
        per_model.append(_parameters(where, entry, "parameters", method, model_level=True))
    models, per_model, base, params = _place_base(method, models, per_model, base, params)
    return build_job(models, output, method=method.name, base=base, params=params,
                     model_params=per_model, **options)


def _place_base(method: MergeMethod, models: list[str], per_model: list[dict],
                base: str | None, params: dict[str, Any]):
    """Where mergekit puts base_model: a reference, the first input, or one more input."""
    if base is None:
        return models, per_model, None, params
    uses_reference = method.base_model == "required" or method.base_goes_first or (
        method.base_model == "optional" and params.get("task_vectors", method.name != "karcher"))
    if uses_reference:
        keep = [i for i, m in enumerate(models) if m != base]
        return [models[i] for i in keep], [per_model[i] for i in keep], base, params
    # mergekit merges an unused base_model as one more plain input (karcher, linear).
    if base not in models:
        models, per_model = [*models, base], [*per_model, {}]
    if method.name == "karcher":
        params = {**params, "task_vectors": False}
        return models, per_model, base, params
    return models, per_model, None, params


def _slices_job(where: _Where, config: LinedDict, method: MergeMethod, base: str | None,
                params: dict[str, Any], output, options) -> MergeJob:
    pieces = config["slices"]
    if not isinstance(pieces, list) or not pieces:
        raise where.error(config, "slices", "expected a list of {sources: [...]}")
    slices, scopes = [], []
    for piece in pieces:
        piece = where.mapping(piece, config, "slices", SLICE_KEYS)
        if piece.get("residual_weight") is not None:
            raise where.error(piece, "residual_weight", "is not supported by lowmem-merge")
        slice_base = where.text(piece, "base_model") if "base_model" in piece else base
        sources, source_params = _sources(where, piece, method)
        experts = [s for s in sources if s.model != slice_base or not _uses_base(method)]
        if method.base_goes_first:  # e.g. slerp: t = 0 is the slice's base model
            experts.sort(key=lambda s: s.model != slice_base)
        base_source = next((s for s in sources if s.model == slice_base), None) \
            if _uses_base(method) else None
        problem = method.check_inputs(len(experts), base_source is not None)
        if problem:
            raise where.error(piece, "sources", problem)
        slices.append(OutputSlice(tuple(experts), base_source))
        scopes.append((_parameters(where, piece, "parameters", method, model_level=False),
                       [source_params[sources.index(s)] for s in experts]))
    first = slices[0]
    job = build_job([s.model for s in first.sources], output, method=method.name,
                    base=first.base.model if first.base else None, params=params,
                    model_params=scopes[0][1], **options)
    job.resolve_params = _slice_resolver(method, params, scopes)
    job.slices = tuple(slices)
    return job


def _uses_base(method: MergeMethod) -> bool:
    return method.base_model != "unused"


def _sources(where: _Where, piece: LinedDict, method: MergeMethod):
    entries = piece.get("sources")
    if not isinstance(entries, list) or not entries:
        raise where.error(piece, "sources", "expected a list of {model, layer_range}")
    sources, params = [], []
    for entry in entries:
        entry = where.mapping(entry, piece, "sources", SOURCE_KEYS)
        span = entry.get("layer_range")
        if not (isinstance(span, list) and len(span) == 2 and all(isinstance(v, int)
                                                                   for v in span)
                and 0 <= span[0] < span[1]):
            raise where.error(entry, "layer_range", f"expected [start, end), got {span!r}")
        sources.append(SliceSource(where.text(entry, "model"), span[0], span[1]))
        params.append(_parameters(where, entry, "parameters", method, model_level=True))
    return sources, params


def _slice_resolver(method: MergeMethod, global_params: dict[str, Any], scopes):
    def resolve_for(tensor: str, position: float, slice_index: int | None = None):
        slice_params, per_source = scopes[slice_index or 0]
        params = {p.name: resolve(p, [slice_params, global_params], tensor, position,
                                  "parameters") for p in method.params}
        model_params = tuple(
            {p.name: resolve(p, [source, slice_params, global_params], tensor, position,
                             f"slice {(slice_index or 0) + 1}") for p in method.model_params}
            for source in per_source)
        return params, model_params
    return resolve_for
