"""Tensor-by-tensor comparison of two merged model folders.

Deterministic methods: differences of the decoded values, in absolute terms,
relative to the tensor's RMS, and in units in the last place of the
reference value (reference = mergekit). Near-zero reference values have tiny
ulps, so cancellation can make "max ulps" huge while the difference is
negligible at the tensor's scale; the fraction of elements more than 1 ulp
apart and the max difference over the RMS say how much that matters.

Magnitude-sparsified methods (ties, breadcrumbs) keep exactly k elements per
task vector; elements whose magnitude equals the magnitude at the cut can be
kept by one tool and dropped by the other (mergekit's order among equal
magnitudes is torch's unstable sort order). Differences outside those elements
that exceed 1 ulp are counted separately: neither rounding nor tie-breaking
explains them.

Random methods: statistics only (see ``compare_random``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from agreement_cases import Case, sparsified_inputs
from st_numpy import CONFIG_KEYS, Tensor, read_config, read_model

Mask = Callable[[str], "np.ndarray | None"]


@dataclass
class TensorDiff:
    name: str
    numel: int
    max_abs: float
    max_over_rms: float  # max |ref - cand| / rms(ref)
    max_ulps: float  # max |ref - cand| / ulp(ref)
    differing: int  # elements whose bits differ
    over_one_ulp: int  # elements more than 1 ulp of the reference apart
    unexplained: int  # elements > 1 ulp apart outside the threshold ties (only with ties)


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


def tensor_diff(name: str, ref: Tensor, cand: Tensor, ties: np.ndarray | None) -> TensorDiff:
    a, b = ref.values(), cand.values()
    delta = np.abs(a - b)
    differing = ref.raw != cand.raw if ref.dtype == cand.dtype else a != b
    ulps = delta / ref.ulps() if ref.is_float else delta
    rms = float(np.sqrt(np.mean(np.square(a)))) if a.size else 0.0
    max_abs = float(delta.max(initial=0.0))
    unexplained = ulps > 1.0 if ties is None else (ulps > 1.0) & ~ties
    return TensorDiff(name, int(a.size), max_abs, max_abs / rms if rms > 0 else max_abs,
                      float(ulps.max(initial=0.0)), int(np.count_nonzero(differing)),
                      int(np.count_nonzero(ulps > 1.0)), int(np.count_nonzero(unexplained)))


@dataclass
class ExactResult:
    tensors: int = 0
    max_abs: float = 0.0
    max_over_rms: float = 0.0
    max_ulps: float = 0.0
    differing: float = 0.0  # fractions of all compared elements
    over_one_ulp: float = 0.0
    unexplained: float | None = None  # only for magnitude-sparsified methods
    worst: str = ""  # the tensor with the largest max_over_rms
    structure: Structure = field(default_factory=Structure)
    per_tensor: list[TensorDiff] = field(default_factory=list)


def summarize(diffs: list[TensorDiff], shape: Structure, with_ties: bool) -> ExactResult:
    result = ExactResult(tensors=len(diffs), structure=shape, per_tensor=diffs)
    if not diffs:
        return result
    total = max(sum(d.numel for d in diffs), 1)
    result.max_abs = max(d.max_abs for d in diffs)
    result.max_ulps = max(d.max_ulps for d in diffs)
    worst = max(diffs, key=lambda d: d.max_over_rms)
    result.max_over_rms, result.worst = worst.max_over_rms, worst.name
    result.differing = sum(d.differing for d in diffs) / total
    result.over_one_ulp = sum(d.over_one_ulp for d in diffs) / total
    if with_ties:
        result.unexplained = sum(d.unexplained for d in diffs) / total
    return result


def compare_exact(ref_folder: Path, cand_folder: Path, ties: Mask | None = None
                  ) -> ExactResult:
    """Every common tensor of ref and cand; ties(name) marks threshold-tie elements."""
    ref, cand = read_model(ref_folder), read_model(cand_folder)
    shape = structure(ref, cand, ref_folder, cand_folder)
    names = [n for n in sorted(set(ref) & set(cand)) if n not in shape.shape_or_dtype]
    diffs = [tensor_diff(n, ref[n], cand[n], ties(n) if ties else None) for n in names]
    return summarize(diffs, shape, ties is not None)


# ---------------------------------------------------------------- threshold ties


def kept_range(kind: str, numel: int, density: float, gamma: float) -> tuple[int, int]:
    """Positions, in ascending order of magnitude, of the elements mergekit keeps."""
    if density >= 1:
        return 0, numel
    if kind == "magnitude":  # mergekit sparsify.magnitude: the top k
        k = max(1, int(density * numel)) if density > 0 else 0
        return numel - k, numel
    target, top = int(density * numel), int(gamma * numel)  # magnitude_outliers
    bottom = max(0, numel - target - top)
    return bottom, bottom + target


def tie_magnitudes(magnitudes: np.ndarray, kept: tuple[int, int]) -> list[float]:
    """Magnitudes at a cut between kept and dropped elements that tie across it."""
    ordered = np.sort(magnitudes)
    return [float(ordered[cut]) for cut in kept
            if 0 < cut < ordered.size and ordered[cut - 1] == ordered[cut]]


def threshold_ties(case: Case, inputs: dict[str, dict[str, Tensor]]) -> Mask:
    """name -> elements whose keep decision is a tie in some expert's task vector."""
    base_path, experts = sparsified_inputs(case)

    def mask(name: str) -> np.ndarray | None:
        base = inputs[base_path].get(name)
        if base is None or not base.is_float:
            return None
        ties = np.zeros(base.raw.size, bool)
        for path, density, gamma in experts:
            magnitudes = np.abs(inputs[path][name].values() - base.values())
            kept = kept_range(case.sparsify, magnitudes.size, density, gamma)
            for value in tie_magnitudes(magnitudes, kept):
                ties |= magnitudes == value
        return ties

    return mask


def load_inputs(case: Case) -> dict[str, dict[str, Tensor]]:
    base, experts = sparsified_inputs(case)
    return {path: read_model(Path(path)) for path in [base, *(e[0] for e in experts)]}


# ---------------------------------------------------------------- random methods


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
    """Statistics of two randomly masked merges: equal-to-base fraction, task norms."""
    ref, cand, base = read_model(ref_folder), read_model(cand_folder), read_model(base_folder)
    shape = structure(ref, cand, ref_folder, cand_folder)
    r, c = spread_from_base(ref, base), spread_from_base(cand, base)
    ratios = {n: abs(c.per_tensor[n] / r.per_tensor[n] - 1.0)
              for n in r.per_tensor.keys() & c.per_tensor.keys() if r.per_tensor[n] > 0}
    worst = max(ratios, key=ratios.__getitem__, default="")
    return RandomResult(len(ratios), r, c, ratios.get(worst, 0.0), worst, shape)


def compare(case: Case, ref: Path, cand: Path, base: Path) -> ExactResult | RandomResult:
    """The comparison that fits the case: statistics, or exact with threshold ties."""
    if case.random:
        return compare_random(ref, cand, base)
    ties = threshold_ties(case, load_inputs(case)) if case.sparsify else None
    return compare_exact(ref, cand, ties)
