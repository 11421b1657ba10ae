"""Agreement of ``lowmem-merge run`` with mergekit on the same mergekit YAML.

Usage::

    python3 -m venv /work/mkvenv                       # mergekit in its own venv, once
    /work/mkvenv/bin/pip install torch==2.13.0 mergekit
    python benchmarks/agreement/run_agreement.py                       # every method
    python benchmarks/agreement/run_agreement.py --methods linear,slerp --json agree.json
    python benchmarks/agreement/run_agreement.py --dtypes float32,float64   # + noise floor
    python benchmarks/agreement/run_agreement.py --list                # methods and notes

mergekit is an optional benchmark dependency, never a runtime one: it runs as a
child process (``--mergekit``, default /work/mkvenv/bin/mergekit-yaml, offline,
CPU, ``--no-copy-tokenizer``), so its pins cannot disturb this environment.

Steps, all under ``--work`` (default /work/agreement):

1. ``models/``: a base and 3 experts from ``lowmem_merge.synthetic`` (Llama
   shape, hidden 256, 4 layers, vocab 1024, BF16, spread 0.5 so that experts
   differ), regenerated only when the shape, seed or spread change.
2. ``configs/<dtype>/<method>.yaml``: one mergekit YAML per method with
   ``dtype`` (mergekit's compute dtype, ``--dtypes``, default float32) and
   ``out_dtype: bfloat16``. No ``tokenizer_source``: no tokenizer is needed.
3. ``mergekit-<dtype>/<method>/``: mergekit's output, kept and reused while
   the YAML and the models are unchanged (``--rerun`` forces a new merge).
4. ``lowmem/<method>/``: ``lowmem-merge run CONFIG OUT --force --quiet`` on
   the YAML of the first dtype. Skipped, with a message, while the installed
   ``lowmem-merge`` has no ``run`` command.

What is measured, tensor by tensor (safetensors read with numpy, BF16 through
uint16 views), over the tensors both outputs hold:

* deterministic methods: the largest absolute difference, the largest
  difference in units in the last place of the reference (mergekit) value
  (BF16 ulps for BF16 outputs) and the fraction of elements whose bits differ;
  the worst tensor is named. Missing or extra tensors, shape mismatches and
  differing config.json keys are listed.
* random methods (dare_*, della*): the generators differ, so no bitwise
  agreement is possible. Compared statistically instead: the fraction of
  elements equal to the base and the norm of the merged task vector
  |out - base| / |base|, for each side, and the worst tensor's relative
  difference of the task-vector norms.

With two dtypes (``--dtypes float32,float64``), mergekit's float32 output is
also compared with its float64 output: the reference's own rounding noise,
a scale for the lowmem-vs-mergekit numbers. Prints markdown tables; ``--json``
also writes every number, per tensor included.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lowmem_merge.synthetic import LlamaShape, write_experts

SHAPE = LlamaShape(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=2, vocab_size=1024)
N_EXPERTS = 3
WEIGHTS = (0.5, 0.3, 0.2)
DEFAULT_MERGEKIT = "/work/mkvenv/bin/mergekit-yaml"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# config.json keys compared (transformers versions write different sets of the rest)
CONFIG_KEYS = ("architectures", "model_type", "hidden_size", "intermediate_size",
               "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "vocab_size", "tie_word_embeddings", "dtype")
STAMP = ".agreement.json"
TEXT_COLUMNS = {"note", "structure", "worst tensor", "not compared", "mergekit"}
TAIL = 1500


# ---------------------------------------------------------------- methods and YAML


@dataclass(frozen=True)
class Models:
    base: Path
    experts: list[Path]


@dataclass(frozen=True)
class Case:
    """One mergekit YAML (without dtype keys) and how to judge agreement on it."""

    name: str
    config: dict[str, Any]
    random: bool = False
    note: str = ""


def _entry(path: Path, **parameters: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"model": str(path)}
    if parameters:
        entry["parameters"] = parameters
    return entry


def _weighted(models: Models, **extra: Any) -> list[dict[str, Any]]:
    return [_entry(e, weight=w, **extra) for e, w in zip(models.experts, WEIGHTS)]


def _plain(models: Models) -> list[dict[str, Any]]:
    return [_entry(e) for e in models.experts]


def _task_vector_cases(m: Models) -> list[Case]:
    base = {"base_model": str(m.base)}
    same_ones = [_entry(e, density=0.5, weight=1.0) for e in m.experts]
    random_note = "random drop: generators differ, compared statistically"
    return [
        Case("task_arithmetic", {"merge_method": "task_arithmetic", **base,
                                 "models": _weighted(m), "parameters": {"lambda": 0.8}}),
        Case("ties", {"merge_method": "ties", **base, "models": same_ones}),
        Case("breadcrumbs", {"merge_method": "breadcrumbs", **base,
                             "models": _weighted(m, density=0.9, gamma=0.01)}),
        Case("dare_linear", {"merge_method": "dare_linear", **base,
                             "models": _weighted(m, density=0.5)}, True, random_note),
        Case("dare_ties", {"merge_method": "dare_ties", **base,
                           "models": _weighted(m, density=0.5)}, True, random_note),
        Case("della", {"merge_method": "della", **base,
                       "models": _weighted(m, density=0.5, epsilon=0.1)}, True, random_note),
        Case("della_linear", {"merge_method": "della_linear", **base,
                              "models": _weighted(m, density=0.5, epsilon=0.1)},
             True, random_note),
    ]


def _spherical_cases(m: Models) -> list[Case]:
    base = {"base_model": str(m.base)}
    pair = [_entry(m.experts[0], weight=0.6), _entry(m.experts[1], weight=0.4)]
    return [
        Case("slerp", {"merge_method": "slerp", **base,
                       "models": [_entry(m.base), _entry(m.experts[0])],
                       "parameters": {"t": [0, 0.5, 0.3, 0.7, 1]}}),
        Case("karcher", {"merge_method": "karcher", "models": _plain(m)}),
        Case("karcher_weighted", {"merge_method": "karcher", "models": _weighted(m)},
             note="mergekit ignores per-model weights for karcher (always 1/N)"),
        Case("karcher_base", {"merge_method": "karcher", **base, "models": _plain(m)},
             note="mergekit adds base_model as a 4th, equal, raw input (no task vectors)"),
        Case("model_stock", {"merge_method": "model_stock", **base,
                             "models": [_entry(m.base), *_plain(m)]}),
        Case("multislerp", {"merge_method": "multislerp", "models": _weighted(m)}),
        Case("multislerp_base", {"merge_method": "multislerp", **base,
                                 "models": _weighted(m)}),
        Case("nuslerp", {"merge_method": "nuslerp", "models": pair}),
        Case("nuslerp_base", {"merge_method": "nuslerp", **base, "models": pair}),
    ]


def _passthrough_case(m: Models) -> Case:
    slices = [{"sources": [{"model": str(m.experts[0]), "layer_range": [0, 2]}]},
              {"sources": [{"model": str(m.experts[1]), "layer_range": [1, 4]}]}]
    return Case("passthrough", {"merge_method": "passthrough", "slices": slices},
                note="frankenmerge: layers [0,2) of expert-1 then [1,4) of expert-2")


def all_cases(models: Models) -> dict[str, Case]:
    linear = Case("linear", {"merge_method": "linear", "models": _weighted(models)})
    cases = [linear, *_spherical_cases(models), *_task_vector_cases(models),
             _passthrough_case(models)]
    return {case.name: case for case in cases}


def config_text(case: Case, dtype: str) -> str:
    config = {**case.config, "dtype": dtype, "out_dtype": "bfloat16"}
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)


# ---------------------------------------------------------------- models


def make_models(root: Path, seed: int, spread: float, force: bool) -> tuple[Models, str]:
    """The base and experts under root/models, regenerated when their recipe changed."""
    folder = root / "models"
    recipe = json.dumps({"shape": asdict(SHAPE), "experts": N_EXPERTS, "seed": seed,
                         "spread": spread, "dtype": "BF16"}, sort_keys=True)
    names = ["base"] + [f"expert-{i + 1}" for i in range(N_EXPERTS)]
    stamp = folder / "recipe.json"
    complete = all((folder / n / "config.json").is_file() for n in names)
    if force or not complete or not stamp.is_file() or stamp.read_text() != recipe:
        shutil.rmtree(folder, ignore_errors=True)
        write_experts(folder, SHAPE, N_EXPERTS, seed=seed, spread=spread, dtype="BF16")
        stamp.write_text(recipe)
        print(f"models: written under {folder}", flush=True)
    return Models(folder / "base", [folder / n for n in names[1:]]), recipe


# ---------------------------------------------------------------- running the tools


@dataclass
class Run:
    ok: bool
    seconds: float = 0.0
    message: str = ""
    reused: bool = False


def _run(command: list[str]) -> Run:
    env = {**os.environ, **OFFLINE_ENV}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if done.returncode == 0:
        return Run(True, seconds)
    tail = (done.stdout + done.stderr).strip()[-TAIL:]
    return Run(False, seconds, f"exit {done.returncode}: {tail}")


def mergekit_version(mergekit: str) -> str:
    python = Path(mergekit).with_name("python")
    code = "import importlib.metadata as m; print(m.version('mergekit'))"
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def run_mergekit(mergekit: str, config: Path, out: Path, stamp: dict, args) -> Run:
    """mergekit-yaml CONFIG OUT on the CPU, reused while its stamp (YAML, models) holds."""
    stamp_file = out / STAMP
    if not args.rerun and stamp_file.is_file():
        saved = json.loads(stamp_file.read_text())
        if saved.get("stamp") == stamp:
            return Run(True, saved["seconds"], reused=True)
    shutil.rmtree(out, ignore_errors=True)
    command = [mergekit, str(config), str(out), "--no-copy-tokenizer", "--quiet",
               "--random-seed", str(args.seed), "--no-write-model-card"]
    run = _run(command)
    if run.ok:
        stamp_file.write_text(json.dumps({"stamp": stamp, "seconds": run.seconds}))
    return run


def lowmem_available(command: list[str]) -> bool:
    try:
        done = subprocess.run([*command, "run", "--help"], capture_output=True, text=True)
    except OSError:
        return False
    return done.returncode == 0


def run_lowmem(command: list[str], config: Path, out: Path) -> Run:
    return _run([*command, "run", str(config), str(out), "--force", "--quiet"])


# ---------------------------------------------------------------- safetensors reader

# dtype: (storage unsigned type, numpy float type or None, exponent bits, mantissa bits)
_FLOATS = {"BF16": (np.uint16, None, 8, 7), "F16": (np.uint16, np.float16, 5, 10),
           "F32": (np.uint32, np.float32, 8, 23), "F64": (np.uint64, np.float64, 11, 52)}
_OTHERS = {"I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
           "U8": np.uint8, "BOOL": np.uint8}


@dataclass
class Tensor:
    dtype: str
    shape: tuple[int, ...]
    raw: np.ndarray  # flat view of the stored bits (floats: unsigned ints of their width)

    @property
    def is_float(self) -> bool:
        return self.dtype in _FLOATS

    def values(self) -> np.ndarray:
        """The elements as float64 (exact for every float dtype here)."""
        if self.dtype == "BF16":
            return (self.raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        if self.is_float:
            return self.raw.view(_FLOATS[self.dtype][1]).astype(np.float64)
        return self.raw.astype(np.float64)

    def ulps(self) -> np.ndarray:
        """The spacing of the format at each element (float dtypes only)."""
        _, _, exp_bits, man_bits = _FLOATS[self.dtype]
        bias = (1 << (exp_bits - 1)) - 1
        exponent = (self.raw >> man_bits).astype(np.int64) & ((1 << exp_bits) - 1)
        return np.ldexp(1.0, np.maximum(exponent, 1) - bias - man_bits)


def _read_file(path: Path) -> dict[str, Tensor]:
    data = np.memmap(path, dtype=np.uint8, mode="r")
    size = int(data[:8].view("<u8")[0])
    header = json.loads(bytes(data[8:8 + size]))
    header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        begin, end = (8 + size + o for o in info["data_offsets"])
        dtype = info["dtype"]
        storage = _FLOATS[dtype][0] if dtype in _FLOATS else _OTHERS[dtype]
        raw = data[begin:end].view(np.dtype(storage).newbyteorder("<"))
        tensors[name] = Tensor(dtype, tuple(info["shape"]), raw)
    return tensors


def read_model(folder: Path) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(_read_file(path))
    return tensors


def read_config(folder: Path) -> dict[str, Any]:
    """The compared keys of config.json; ``dtype`` is also read from ``torch_dtype``."""
    path = folder / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    config.setdefault("dtype", config.get("torch_dtype"))
    return {key: config.get(key) for key in CONFIG_KEYS}


# ---------------------------------------------------------------- comparisons


@dataclass
class TensorDiff:
    name: str
    numel: int
    max_abs: float
    max_ulps: float
    differing: int


@dataclass
class Structure:
    """Tensor names, shapes and config keys that do not match between two outputs."""

    only_reference: list[str] = field(default_factory=list)
    only_candidate: list[str] = field(default_factory=list)
    shape_or_dtype: list[str] = field(default_factory=list)
    config_keys: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        parts = [("missing", self.only_reference), ("extra", self.only_candidate),
                 ("shape/dtype", self.shape_or_dtype), ("config", self.config_keys)]
        return [f"{label}: {', '.join(names[:4])}" + (" ..." if len(names) > 4 else "")
                for label, names in parts if names]


def structure(ref: dict[str, Tensor], cand: dict[str, Tensor], ref_folder: Path,
              cand_folder: Path) -> Structure:
    ref_cfg, cand_cfg = read_config(ref_folder), read_config(cand_folder)
    common = sorted(set(ref) & set(cand))
    return Structure(
        only_reference=sorted(set(ref) - set(cand)),
        only_candidate=sorted(set(cand) - set(ref)),
        shape_or_dtype=[n for n in common if ref[n].shape != cand[n].shape
                        or ref[n].is_float != cand[n].is_float],
        config_keys=[k for k in CONFIG_KEYS if ref_cfg[k] != cand_cfg[k]],
    )


def tensor_diff(name: str, ref: Tensor, cand: Tensor) -> TensorDiff:
    a, b = ref.values(), cand.values()
    delta = np.abs(a - b)
    same_format = ref.dtype == cand.dtype
    differing = ref.raw != cand.raw if same_format else a != b
    ulps = delta / ref.ulps() if ref.is_float else delta
    numel = int(a.size)
    return TensorDiff(name, numel, float(delta.max(initial=0.0)),
                      float(ulps.max(initial=0.0)), int(np.count_nonzero(differing)))


@dataclass
class ExactResult:
    tensors: int = 0
    max_abs: float = 0.0
    max_ulps: float = 0.0
    differing_fraction: float = 0.0
    worst: str = ""
    structure: Structure = field(default_factory=Structure)
    per_tensor: list[TensorDiff] = field(default_factory=list)


def compare_exact(ref_folder: Path, cand_folder: Path) -> ExactResult:
    ref, cand = read_model(ref_folder), read_model(cand_folder)
    shape = structure(ref, cand, ref_folder, cand_folder)
    names = [n for n in sorted(set(ref) & set(cand)) if n not in shape.shape_or_dtype]
    diffs = [tensor_diff(n, ref[n], cand[n]) for n in names]
    result = ExactResult(tensors=len(diffs), structure=shape, per_tensor=diffs)
    if diffs:
        worst = max(diffs, key=lambda d: (d.max_ulps, d.max_abs))
        result.max_abs = max(d.max_abs for d in diffs)
        result.max_ulps, result.worst = worst.max_ulps, worst.name
        total = sum(d.numel for d in diffs)
        result.differing_fraction = sum(d.differing for d in diffs) / max(total, 1)
    return result


@dataclass
class Spread:
    """How an output sits relative to the base: equal elements, task-vector norm."""

    equal_to_base: float
    task_norm: float  # |out - base| / |base| over all compared tensors
    per_tensor: dict[str, float]  # |out - base| per tensor


def spread_from_base(out: dict[str, Tensor], base: dict[str, Tensor]) -> Spread:
    names = [n for n in sorted(set(out) & set(base))
             if out[n].shape == base[n].shape and out[n].is_float]
    equal = numel = 0
    delta_sq = base_sq = 0.0
    per_tensor = {}
    for name in names:
        o, b = out[name].values(), base[name].values()
        equal += int(np.count_nonzero(o == b))
        numel += o.size
        tensor_sq = float(np.square(o - b).sum())
        delta_sq, base_sq = delta_sq + tensor_sq, base_sq + float(np.square(b).sum())
        per_tensor[name] = tensor_sq ** 0.5
    return Spread(equal / max(numel, 1), (delta_sq / max(base_sq, 1e-300)) ** 0.5, per_tensor)


@dataclass
class RandomResult:
    tensors: int
    reference: Spread
    candidate: Spread
    worst_norm_ratio: float  # max over tensors of | |c-base| / |r-base| - 1 |
    worst: str
    structure: Structure


def compare_random(ref_folder: Path, cand_folder: Path, base_folder: Path) -> RandomResult:
    ref, cand, base = read_model(ref_folder), read_model(cand_folder), read_model(base_folder)
    shape = structure(ref, cand, ref_folder, cand_folder)
    r, c = spread_from_base(ref, base), spread_from_base(cand, base)
    ratios = {n: abs(c.per_tensor[n] / r.per_tensor[n] - 1.0)
              for n in r.per_tensor.keys() & c.per_tensor.keys() if r.per_tensor[n] > 0}
    worst = max(ratios, key=ratios.__getitem__, default="")
    return RandomResult(len(ratios), r, c, ratios.get(worst, 0.0), worst, shape)


# ---------------------------------------------------------------- report


def _g(value: float) -> str:
    return f"{value:.3g}"


def _pct(value: float) -> str:
    return f"{100 * value:.3g}%"


def _short(name: str) -> str:
    return name.removeprefix("model.").removesuffix(".weight")


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table: the first column left-aligned, numbers right, text (notes) left."""
    aligns = ["---"] + ["--:" if h not in TEXT_COLUMNS else "---" for h in header[1:]]
    lines = [header, aligns, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def reference_table(outcomes: dict[str, dict], dtype: str, base_folder: Path,
                    work: Path) -> str:
    """mergekit's own outputs: did it run, how far from the base."""
    base = read_model(base_folder)
    rows = []
    for name, outcome in outcomes.items():
        run: Run = outcome["mergekit"][dtype]
        if not run.ok:
            rows.append([name, "FAILED", _g(run.seconds), "", "", "", run.message[-120:]])
            continue
        out = read_model(work / f"mergekit-{dtype}" / name)
        spread = spread_from_base(out, base)
        status = "reused" if run.reused else "ran"
        rows.append([name, status, _g(run.seconds), str(len(out)), _pct(spread.equal_to_base),
                     _g(spread.task_norm), outcome["case"].note])
    header = ["method", "mergekit", "s", "tensors", "= base", "‖out-base‖/‖base‖", "note"]
    return f"### mergekit (dtype {dtype})\n\n" + _table(header, rows)


def _status_row(name: str, problem: str) -> list[str]:
    return [name, problem[-160:].replace("\n", " ").replace("|", "/")]


def exact_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, result in results.items():
        if isinstance(result, ExactResult):
            notes = "; ".join(result.structure.problems())
            rows.append([name, str(result.tensors), _g(result.max_abs), _g(result.max_ulps),
                         _pct(result.differing_fraction), _short(result.worst), notes])
    return rows


def random_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, r in results.items():
        if isinstance(r, RandomResult):
            rows.append([name, str(r.tensors),
                         f"{_pct(r.reference.equal_to_base)} / {_pct(r.candidate.equal_to_base)}",
                         f"{_g(r.reference.task_norm)} / {_g(r.candidate.task_norm)}",
                         _pct(r.worst_norm_ratio), _short(r.worst),
                         "; ".join(r.structure.problems())])
    return rows


def comparison_tables(title: str, results: dict[str, Any]) -> str:
    parts = [f"### {title}"]
    exact = exact_rows(results)
    if exact:
        header = ["method", "tensors", "max abs diff", "max ulps", "elements differing",
                  "worst tensor", "structure"]
        parts.append(_table(header, exact))
    random = random_rows(results)
    if random:
        header = ["method (random)", "tensors", "= base (ref / cand)",
                  "‖out-base‖/‖base‖ (ref / cand)", "worst tensor-norm diff", "worst tensor",
                  "structure"]
        parts.append(_table(header, random))
    failed = [_status_row(n, r) for n, r in results.items() if isinstance(r, str)]
    if failed:
        parts.append(_table(["method", "not compared"], failed))
    return "\n\n".join(parts)


# ---------------------------------------------------------------- driver


def compare(case: Case, ref: Path, cand: Path, base: Path) -> ExactResult | RandomResult:
    if case.random:
        return compare_random(ref, cand, base)
    return compare_exact(ref, cand)


def run_case(case: Case, models_recipe: str, lowmem: list[str] | None, args) -> dict:
    """Write the YAMLs, run mergekit for every dtype, then lowmem-merge on the first."""
    outcome: dict[str, Any] = {"case": case, "mergekit": {}, "lowmem": None}
    for dtype in args.dtypes:
        config = args.work / "configs" / dtype / f"{case.name}.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        text = config_text(case, dtype)
        config.write_text(text)
        stamp = {"config": text, "models": models_recipe, "seed": args.seed}
        out = args.work / f"mergekit-{dtype}" / case.name
        run = run_mergekit(args.mergekit, config, out, stamp, args)
        outcome["mergekit"][dtype] = run
        print(f"{case.name}: mergekit {dtype}: " + _describe(run), flush=True)
    if lowmem is not None:
        config = args.work / "configs" / args.dtypes[0] / f"{case.name}.yaml"
        run = run_lowmem(lowmem, config, args.work / "lowmem" / case.name)
        outcome["lowmem"] = run
        print(f"{case.name}: lowmem-merge run: " + _describe(run), flush=True)
    return outcome


def _describe(run: Run) -> str:
    if not run.ok:
        return "FAILED " + run.message.splitlines()[-1] if run.message else "FAILED"
    return f"{'reused' if run.reused else 'ok'} ({run.seconds:.1f} s)"


def compare_all(outcomes: dict[str, dict], ref_dtype: str, cand: str, args,
                base: Path) -> dict[str, Any]:
    """Reference mergekit-<ref_dtype> against cand ('lowmem' or a mergekit dtype)."""
    results: dict[str, Any] = {}
    for name, outcome in outcomes.items():
        ref_run = outcome["mergekit"][ref_dtype]
        cand_run = outcome["lowmem"] if cand == "lowmem" else outcome["mergekit"][cand]
        if not ref_run.ok:
            results[name] = "mergekit failed"
        elif not cand_run.ok:
            results[name] = "failed: " + cand_run.message
        else:
            cand_dir = args.work / ("lowmem" if cand == "lowmem" else f"mergekit-{cand}") / name
            results[name] = compare(outcome["case"], args.work / f"mergekit-{ref_dtype}" / name,
                                    cand_dir, base)
    return results


def _jsonable(value: Any) -> Any:
    if isinstance(value, (Run, Case, ExactResult, RandomResult, Spread, Structure, TensorDiff)):
        return _jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/work/agreement"),
                        help="folder for models, configs and outputs (default /work/agreement)")
    parser.add_argument("--methods", default="all",
                        help="comma list of methods (default all; --list shows them)")
    parser.add_argument("--list", action="store_true", help="list the methods and exit")
    parser.add_argument("--dtypes", default="float32",
                        help="mergekit compute dtypes, comma list: float32 (default), float64;"
                             " the first is the reference for lowmem-merge")
    parser.add_argument("--mergekit", default=DEFAULT_MERGEKIT, help="mergekit-yaml executable")
    parser.add_argument("--lowmem", default=None,
                        help="lowmem-merge command (default: the one beside this python)")
    parser.add_argument("--no-lowmem", action="store_true", help="run the mergekit side only")
    parser.add_argument("--seed", type=int, default=0, help="models' and mergekit's seed")
    parser.add_argument("--spread", type=float, default=0.5,
                        help="expert noise relative to the base's (default 0.5)")
    parser.add_argument("--rerun", action="store_true", help="rerun mergekit even if kept")
    parser.add_argument("--regen", action="store_true", help="rewrite the synthetic models")
    parser.add_argument("--per-tensor", action="store_true",
                        help="also print the worst tensors of every deterministic method")
    parser.add_argument("--json", type=Path, help="write every number to this file")
    args = parser.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not set(args.dtypes) <= {"float32", "float64"} or not args.dtypes:
        parser.error("--dtypes: float32 and/or float64")
    return args


def lowmem_command(args: argparse.Namespace) -> list[str] | None:
    """The lowmem-merge command if it has ``run``; None (with a message) otherwise."""
    if args.no_lowmem:
        return None
    beside = Path(sys.executable).with_name("lowmem-merge")
    command = shlex.split(args.lowmem) if args.lowmem else [
        str(beside) if beside.exists() else "lowmem-merge"]
    if lowmem_available(command):
        return command
    print(f"NOTE: `{shlex.join(command)} run --help` failed: lowmem-merge has no `run` "
          "command yet; only the mergekit side runs. Rerun this script once it exists "
          "(mergekit outputs are kept and reused).", flush=True)
    return None


def select(cases: dict[str, Case], methods: str) -> dict[str, Case]:
    if methods == "all":
        return cases
    names = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [n for n in names if n not in cases]
    if unknown:
        raise SystemExit(f"unknown methods: {', '.join(unknown)}; known: {', '.join(cases)}")
    return {n: cases[n] for n in names}


def per_tensor_tables(results: dict[str, Any], top: int = 5) -> str:
    parts = []
    for name, result in results.items():
        if isinstance(result, ExactResult) and result.per_tensor:
            worst = sorted(result.per_tensor, key=lambda d: -d.max_ulps)[:top]
            rows = [[_short(d.name), _g(d.max_abs), _g(d.max_ulps),
                     _pct(d.differing / max(d.numel, 1))] for d in worst]
            header = [f"{name}: tensor", "max abs diff", "max ulps", "differing"]
            parts.append(_table(header, rows))
    return "\n\n".join(parts)


def report(outcomes: dict[str, dict], args, base: Path, lowmem: bool) -> dict[str, Any]:
    tables, numbers = [], {}
    for dtype in args.dtypes:
        tables.append(reference_table(outcomes, dtype, base, args.work))
    if lowmem:
        ref = args.dtypes[0]
        results = compare_all(outcomes, ref, "lowmem", args, base)
        numbers[f"lowmem_vs_mergekit_{ref}"] = results
        tables.append(comparison_tables(f"lowmem-merge vs mergekit ({ref})", results))
        if args.per_tensor:
            tables.append(per_tensor_tables(results))
    if len(args.dtypes) > 1:
        ref, cand = args.dtypes[-1], args.dtypes[0]
        results = compare_all(outcomes, ref, cand, args, base)
        numbers[f"mergekit_{cand}_vs_mergekit_{ref}"] = results
        tables.append(comparison_tables(f"noise floor: mergekit {cand} vs mergekit {ref}",
                                        results))
    print("\n\n" + "\n\n".join(t for t in tables if t))
    return numbers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work = args.work.resolve()
    placeholder = Models(args.work / "models" / "base",
                         [args.work / "models" / f"expert-{i + 1}" for i in range(N_EXPERTS)])
    if args.list:
        for case in all_cases(placeholder).values():
            print(f"{case.name}{' (random)' if case.random else ''}: {case.note}".rstrip(": "))
        return 0
    if not Path(args.mergekit).exists():
        raise SystemExit(f"{args.mergekit}: not found (see the setup in --help)")
    version = mergekit_version(args.mergekit)
    print(f"mergekit {version} ({args.mergekit})", flush=True)
    models, recipe = make_models(args.work, args.seed, args.spread, args.regen)
    cases = select(all_cases(models), args.methods)
    lowmem = lowmem_command(args)
    outcomes = {name: run_case(case, recipe, lowmem, args) for name, case in cases.items()}
    numbers = report(outcomes, args, models.base, lowmem is not None)
    if args.json:
        payload = {"mergekit_version": version, "shape": asdict(SHAPE), "spread": args.spread,
                   "seed": args.seed, "runs": outcomes, "comparisons": numbers}
        args.json.write_text(json.dumps(_jsonable(payload), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
