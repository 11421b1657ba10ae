"""Merge quality against the number of experts, on small Llamas trained here on the CPU.

Usage::

    python benchmarks/quality/run_quality.py            # train, merge, evaluate (~30 min, 2 cores)
    python benchmarks/quality/run_quality.py --reuse    # keep work/models if it is there

Trains a base and one expert per task (train.py), then for N = 2, 4, 8 experts (random subsets
for N < 8) merges them with every lowmem_merge method that applies, evaluates each merge on the
tasks of its experts (evaluate.py) and deletes it. Writes results.json and results.md beside
this script (or in --results). Checks the claim of arXiv:2603.04972 that Euclidean merges
degrade as N grows while the Fisher-Rao Karcher mean does not.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diagnostics import merge_diagnostics
from evaluate import check_tokenizer, evaluate
from plots import layer_figure, summary_figure
from quality_report import write_markdown
from safetensors.torch import load_file
from tasks import TASK_NAMES
from train import TrainSettings, train_all
from transformers.utils import logging as hf_logging

import lowmem_merge

HERE = Path(__file__).resolve().parent
SPARSE = {"density": 0.5}


@dataclass(frozen=True)
class MethodSpec:
    """One row of the table: a lowmem_merge method with its arguments."""

    label: str
    method: str
    use_base: bool
    params: dict[str, Any] = field(default_factory=dict)
    only_n: int | None = None  # methods defined for exactly two models
    random: bool = False  # takes the drop-mask seed


METHODS: list[MethodSpec] = [
    MethodSpec("karcher", "karcher", True),
    MethodSpec("karcher (no base)", "karcher", False),
    MethodSpec("linear", "linear", False),
    MethodSpec("task_arithmetic", "task_arithmetic", True),
    MethodSpec("ties", "ties", True, SPARSE),
    MethodSpec("dare_ties", "dare_ties", True, SPARSE, random=True),
    MethodSpec("dare_linear", "dare_linear", True, SPARSE, random=True),
    MethodSpec("breadcrumbs", "breadcrumbs", True, SPARSE),
    MethodSpec("breadcrumbs_ties", "breadcrumbs_ties", True, SPARSE),
    MethodSpec("della", "della", True, SPARSE, random=True),
    MethodSpec("della_linear", "della_linear", True, SPARSE, random=True),
    MethodSpec("model_stock", "model_stock", True),
    MethodSpec("multislerp", "multislerp", True),
    MethodSpec("tsv", "tsv", True),
    MethodSpec("slerp (t=0.5)", "slerp", False, {"t": 0.5}, only_n=2),
    MethodSpec("nuslerp", "nuslerp", True, only_n=2),
]


def flat_weights(folder: Path) -> torch.Tensor:
    """Every floating-point tensor of a model folder, concatenated in name order (float64)."""
    state = load_file(str(folder / "model.safetensors"))
    return torch.cat([state[k].double().flatten() for k in sorted(state)
                      if state[k].is_floating_point()])


def expert_geometry(models: Path) -> dict[str, Any]:
    """Task-vector norms and pairwise cosines of the experts (their spread)."""
    base = flat_weights(models / "base")
    tvs = {t: flat_weights(models / f"expert-{t}") - base for t in TASK_NAMES}
    norms = {t: float(v.norm()) for t, v in tvs.items()}
    cos = {a: {b: float(tvs[a] @ tvs[b] / (norms[a] * norms[b])) for b in TASK_NAMES}
           for a in TASK_NAMES}
    return {"base_norm": float(base.norm()), "tv_norm": norms, "tv_cos": cos}


def pick_subsets(n: int, count: int, rng: random.Random) -> list[list[str]]:
    """``count`` distinct task subsets of size ``n`` (all of them when there are fewer)."""
    combos = [list(c) for c in itertools.combinations(TASK_NAMES, n)]
    return combos if len(combos) <= count else rng.sample(combos, count)


def merge_one(spec: MethodSpec, tasks: list[str], models: Path, out: Path,
              args: argparse.Namespace) -> float:
    """Run one merge into ``out``; returns its wall time."""
    params = dict(spec.params)
    if spec.random:
        params["seed"] = args.merge_seed
    t0 = time.perf_counter()
    lowmem_merge.merge([models / f"expert-{t}" for t in tasks], spec.method, out,
                       base=models / "base" if spec.use_base else None, dtype="float32",
                       force=True, threads=args.threads, **params)
    return time.perf_counter() - t0


def tv_norm_ratio(merged: Path, base: torch.Tensor, tv_norms: list[float]) -> float:
    """|merge - base| over the experts' mean task-vector norm (1: norms kept, < 1: shrunk)."""
    return float((flat_weights(merged) - base).norm()) / (sum(tv_norms) / len(tv_norms))


def run_case(spec: MethodSpec, n: int, idx: int, tasks: list[str], ctx: dict[str, Any],
             args: argparse.Namespace) -> dict[str, Any]:
    """Merge, measure and evaluate one (method, subset); the merged folder is removed."""
    out = args.work / "merges" / f"{spec.method}-{spec.use_base:d}-n{n}-s{idx}"
    rec: dict[str, Any] = {"label": spec.label, "n": n, "subset": idx, "tasks": tasks}
    try:
        rec["merge_seconds"] = merge_one(spec, tasks, ctx["models"], out, args)
    except Exception as exc:  # noqa: BLE001 - a failing method is a result, not a crash
        rec["error"] = f"{type(exc).__name__}: {exc}"
        print(f"  {spec.label} N={n} s{idx}: ERROR {rec['error']}", flush=True)
        return rec
    t0 = time.perf_counter()
    rec["tv_norm_ratio"] = tv_norm_ratio(out, ctx["base_flat"],
                                         [ctx["geometry"]["tv_norm"][t] for t in tasks])
    rec["acc"] = evaluate(out, tasks, args.n_eval, args.eval_seed)
    rec["mean_acc"] = sum(rec["acc"].values()) / len(tasks)
    rec["eval_seconds"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    rec.update(merge_diagnostics(out, ctx["models"], tasks))
    rec["diag_seconds"] = time.perf_counter() - t1
    # The product's streamed diagnostics against the flat torch computation of the same ratio.
    if abs(rec["diag_norm_ratio"] - rec["tv_norm_ratio"]) > 1e-6 * rec["tv_norm_ratio"]:
        raise RuntimeError(f"{out}: diagnose norm ratio {rec['diag_norm_ratio']} != "
                           f"{rec['tv_norm_ratio']}")
    shutil.rmtree(out)
    print(f"  {spec.label:18s} N={n} s{idx}: {rec['mean_acc']:.3f} "
          f"(norm ratio {rec['tv_norm_ratio']:.2f}, variance ratio "
          f"{rec['variance_ratio_mean']:.2f}, rank ratio {rec['rank_ratio_mean']:.2f}, "
          f"merge {rec['merge_seconds']:.1f} s)", flush=True)
    return rec


def train_phase(args: argparse.Namespace) -> dict[str, Any]:
    """Train the models, or reuse them with --reuse when their manifest is there."""
    models = args.work / "models"
    manifest = models / "manifest.json"
    if args.reuse and manifest.exists():
        print(f"reusing {models}", flush=True)
        return {**json.loads(manifest.read_text()), "reused": True}
    models.mkdir(parents=True, exist_ok=True)
    s = TrainSettings(seed=args.train_seed, threads=args.threads)
    return {**train_all(models, s), "reused": False}


def reference_phase(models: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Base and every expert on every task (the diagonal is each expert on its own task)."""
    check_tokenizer(models / "base")
    base = evaluate(models / "base", TASK_NAMES, args.n_eval, args.eval_seed)
    experts = {t: evaluate(models / f"expert-{t}", TASK_NAMES, args.n_eval, args.eval_seed)
               for t in TASK_NAMES}
    own = {t: experts[t][t] for t in TASK_NAMES}
    print("base:", base, "\nexperts on own task:", own, flush=True)
    return {"base": base, "expert_on_task": experts, "expert_own": own,
            "expert_own_mean": sum(own.values()) / len(own)}


def merge_phase(ctx: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every method on every subset; returns one record per merge."""
    rng = random.Random(args.subset_seed)
    subsets = {n: pick_subsets(n, args.subsets, rng) for n in args.sizes}
    wanted = set(args.methods.split(",")) if args.methods else None
    records = []
    for n, subs in subsets.items():
        for idx, tasks in enumerate(subs):
            print(f"N={n} subset {idx}: {','.join(tasks)}", flush=True)
            for spec in METHODS:
                if (spec.only_n in (None, n)) and (wanted is None or spec.label in wanted):
                    records.append(run_case(spec, n, idx, tasks, ctx, args))
    return records


def machine() -> dict[str, Any]:
    """Where the numbers were measured."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True,
                                text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {"cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "lowmem_merge_commit": commit}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=HERE / "work",
                    help="models/ (cached trained models) and merges/ (temporary)")
    ap.add_argument("--results", type=Path, default=HERE, help="where results.json/md go")
    ap.add_argument("--reuse", action="store_true", help="reuse work/models if trained")
    ap.add_argument("--report-only", action="store_true",
                    help="redo results.md and the figures from results.json, run nothing")
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 8])
    ap.add_argument("--subsets", type=int, default=5, help="random subsets for each N < 8")
    ap.add_argument("--n-eval", type=int, default=200, help="held-out prompts per task")
    ap.add_argument("--methods", default="", help="comma list of row labels (default: all)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for training, and "
                    "lowmem_merge threads")
    ap.add_argument("--eval-threads", type=int, default=1,
                    help="torch threads for evaluation: small batches gain nothing from a second "
                    "thread, and lose much when another process holds a core")
    ap.add_argument("--train-seed", type=int, default=0)
    ap.add_argument("--subset-seed", type=int, default=0)
    ap.add_argument("--eval-seed", type=int, default=0)
    ap.add_argument("--merge-seed", type=int, default=1234, help="DARE/DELLA drop masks")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.report_only:
        write_report(json.loads((args.results / "results.json").read_text()), args.results)
        return
    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    training = train_phase(args)
    timings["train"] = time.perf_counter() - t0
    torch.set_num_threads(args.eval_threads)
    models = args.work / "models"
    t1 = time.perf_counter()
    reference = reference_phase(models, args)
    geometry = expert_geometry(models)
    timings["reference_eval"] = time.perf_counter() - t1
    ctx = {"models": models, "geometry": geometry, "base_flat": flat_weights(models / "base")}
    t2 = time.perf_counter()
    records = merge_phase(ctx, args)
    timings["merge_and_eval"] = time.perf_counter() - t2
    timings["merge_only"] = sum(r.get("merge_seconds", 0.0) for r in records)
    timings["merged_eval_only"] = sum(r.get("eval_seconds", 0.0) for r in records)
    timings["diagnostics_only"] = sum(r.get("diag_seconds", 0.0) for r in records)
    timings["total"] = time.perf_counter() - t0
    results = {"settings": {k: str(v) if isinstance(v, Path) else v
                            for k, v in vars(args).items()},
               "methods": [asdict(m) for m in METHODS], "machine": machine(),
               "timings_seconds": timings, "training": training, "reference": reference,
               "geometry": geometry, "merges": records}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "results.json").write_text(json.dumps(results, indent=1))
    write_report(results, args.results)
    print(f"done in {timings['total']:.0f} s: {args.results / 'results.md'}", flush=True)


def write_report(results: dict[str, Any], folder: Path) -> None:
    """results.md, quality.png and quality_layers.png in ``folder``."""
    write_markdown(results, folder / "results.md")
    summary_figure(results, folder / "quality.png")
    layer_figure(results, folder / "quality_layers.png")


if __name__ == "__main__":
    main()
