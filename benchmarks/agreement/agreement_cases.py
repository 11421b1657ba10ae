"""The merges the agreement benchmark runs: one mergekit YAML per case.

Parameter names, defaults and YAML layout are mergekit's (0.1.5). A case
holds the YAML without its dtype keys, whether the method draws random masks
(then only statistics can agree) and, for magnitude-sparsified methods, the
rule that picks the kept elements, so that elements whose keep decision is a
tie in magnitude can be told apart from real disagreements.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

WEIGHTS = (0.5, 0.3, 0.2)
SLERP_T = [0, 0.5, 0.3, 0.7, 1]
RANDOM_NOTE = "random masks: generators differ, compared statistically"


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
    sparsify: str = ""  # "magnitude" (ties) or "outliers" (breadcrumbs): ties at the cut
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


def _sparse_cases(m: Models) -> list[Case]:
    base = {"base_model": str(m.base)}
    ones = [_entry(e, density=0.5, weight=1.0) for e in m.experts]
    crumbs = _weighted(m, density=0.9, gamma=0.01)
    return [
        Case("ties", {"merge_method": "ties", **base, "models": ones}, sparsify="magnitude"),
        Case("breadcrumbs", {"merge_method": "breadcrumbs", **base, "models": crumbs},
             sparsify="outliers"),
    ]


def _random_cases(m: Models) -> list[Case]:
    base = {"base_model": str(m.base)}
    dare = _weighted(m, density=0.5)
    della = _weighted(m, density=0.5, epsilon=0.1)
    methods = [("dare_linear", dare), ("dare_ties", dare), ("della", della),
               ("della_linear", della)]
    return [Case(name, {"merge_method": name, **base, "models": models}, True, note=RANDOM_NOTE)
            for name, models in methods]


def _karcher_cases(m: Models) -> list[Case]:
    return [
        Case("karcher", {"merge_method": "karcher", "models": _plain(m)}),
        Case("karcher_weighted", {"merge_method": "karcher", "models": _weighted(m)},
             note="mergekit ignores per-model weights for karcher (always 1/N)"),
        Case("karcher_base", {"merge_method": "karcher", "base_model": str(m.base),
                              "models": _plain(m)},
             note="mergekit adds base_model as a 4th, equal, raw input (no task vectors)"),
    ]


def _model_stock_cases(m: Models) -> list[Case]:
    e1, e2, e3 = m.experts
    return [
        Case("model_stock", {"merge_method": "model_stock", "base_model": str(m.base),
                             "models": [_entry(m.base), *_plain(m)]},
             note="independent synthetic task vectors: cos ~ 0, t ~ 0, output ~ base"),
        Case("model_stock_shared", {"merge_method": "model_stock", "base_model": str(e3),
                                    "models": [_entry(e1), _entry(e2), _entry(m.base)]},
             note="base_model expert-3: offsets share -d3, mean cos ~ 0.64, t ~ 0.84"),
    ]


def _spherical_cases(m: Models) -> list[Case]:
    base = {"base_model": str(m.base)}
    pair = [_entry(m.experts[0], weight=0.6), _entry(m.experts[1], weight=0.4)]
    return [
        Case("slerp", {"merge_method": "slerp", **base,
                       "models": [_entry(m.base), _entry(m.experts[0])],
                       "parameters": {"t": SLERP_T}}),
        Case("multislerp", {"merge_method": "multislerp", "models": _weighted(m)}),
        Case("multislerp_base", {"merge_method": "multislerp", **base, "models": _weighted(m)}),
        Case("nuslerp", {"merge_method": "nuslerp", "models": pair}),
        Case("nuslerp_base", {"merge_method": "nuslerp", **base, "models": pair}),
    ]


def _linear_cases(m: Models) -> list[Case]:
    return [
        Case("linear", {"merge_method": "linear", "models": _weighted(m)}),
        Case("task_arithmetic", {"merge_method": "task_arithmetic", "base_model": str(m.base),
                                 "models": _weighted(m), "parameters": {"lambda": 0.8}}),
    ]


def _passthrough_case(m: Models) -> Case:
    slices = [{"sources": [{"model": str(m.experts[0]), "layer_range": [0, 2]}]},
              {"sources": [{"model": str(m.experts[1]), "layer_range": [1, 4]}]}]
    return Case("passthrough", {"merge_method": "passthrough", "slices": slices},
                note="frankenmerge: layers [0,2) of expert-1 then [1,4) of expert-2")


def all_cases(models: Models) -> dict[str, Case]:
    cases = [*_linear_cases(models), *_spherical_cases(models), *_karcher_cases(models),
             *_model_stock_cases(models), *_sparse_cases(models), *_random_cases(models),
             _passthrough_case(models)]
    return {case.name: case for case in cases}


def config_text(case: Case, dtype: str) -> str:
    """The YAML mergekit and ``lowmem-merge run`` read: compute in dtype, write bfloat16."""
    config = {**case.config, "dtype": dtype, "out_dtype": "bfloat16"}
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)


def sparsified_inputs(case: Case) -> tuple[str, list[tuple[str, float, float]]]:
    """The base and, per expert, (path, density, gamma) of a magnitude-sparsified case."""
    experts = []
    for entry in case.config["models"]:
        if entry["model"] == case.config["base_model"]:
            continue
        parameters = entry.get("parameters", {})
        experts.append((entry["model"], float(parameters.get("density", 1.0)),
                        float(parameters.get("gamma", 0.01))))
    return case.config["base_model"], experts
