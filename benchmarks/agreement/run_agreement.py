"""Agreement of ``lowmem-merge run`` with mergekit on the same mergekit YAML.

Usage::

    python3 -m venv /work/mkvenv                       # mergekit in its own venv, once
    /work/mkvenv/bin/pip install torch==2.13.0 mergekit
    python benchmarks/agreement/run_agreement.py                       # every method
    python benchmarks/agreement/run_agreement.py --methods linear,slerp --json agree.json
    python benchmarks/agreement/run_agreement.py --dtypes float32,float64   # + noise floor
    python benchmarks/agreement/run_agreement.py --candidate DIR   # compare DIR/<method>/
    python benchmarks/agreement/run_agreement.py --list                # methods and notes

mergekit is an optional benchmark dependency, never a runtime one: it runs as a
child process (``--mergekit``, default /work/mkvenv/bin/mergekit-yaml, offline,
CPU, ``--no-copy-tokenizer``), so its pins cannot disturb this environment.
The cases (``agreement_cases.py``), the comparisons (``agreement_compare.py``)
and a numpy safetensors reader that handles BF16 (``st_numpy.py``) sit beside
this script.

Steps, all under ``--work`` (default /work/agreement):

1. ``models/``: a base and 3 experts from ``lowmem_merge.synthetic`` (Llama
   shape, hidden 256, 4 layers, vocab 1024, BF16, spread 0.5 so that experts
   differ), regenerated only when the shape, seed or spread change.
2. ``configs/<dtype>/<method>.yaml``: one mergekit YAML per case with
   ``dtype`` (mergekit's compute dtype, ``--dtypes``, default float32) and
   ``out_dtype: bfloat16``. No ``tokenizer_source``: no tokenizer is needed.
3. ``mergekit-<dtype>/<method>/``: mergekit's output, kept and reused while
   the YAML, the models and the seed are unchanged (``--rerun`` forces it).
4. ``lowmem/<method>/``: ``lowmem-merge run CONFIG OUT --force --quiet`` on
   the YAML of the first dtype. Skipped, with a message, while the installed
   ``lowmem-merge`` has no ``run`` command. ``--candidate DIR`` compares
   outputs made beforehand (DIR/<method>/) instead.

What is measured, tensor by tensor (safetensors read with numpy, BF16 through
uint16 views), over the tensors both outputs hold, mergekit as reference:

* deterministic methods: the largest absolute difference, the same over the
  tensor's RMS, the largest difference in ulps of the reference value (BF16
  ulps here; near-zero references make this one explode under cancellation),
  the fraction of elements more than 1 ulp apart and the fraction whose bits
  differ at all; the worst tensor (by difference over RMS) is named. For
  ties and breadcrumbs, elements whose keep decision is a tie in magnitude at
  the top-k cut may legitimately differ; elements more than 1 ulp apart
  outside them are counted ("> 1 ulp off ties"). Missing or extra tensors,
  shape mismatches and differing config.json keys are listed.
* random methods (dare_*, della*): the generators differ, so no bitwise
  agreement is possible. Compared statistically instead: the fraction of
  elements equal to the base and the norm of the merged task vector
  |out - base| / |base|, for each side, and the worst tensor's relative
  difference of the task-vector norms (small norm vectors fluctuate most).

With two dtypes (``--dtypes float32,float64``), mergekit's float32 output is
also compared with its float64 output: the reference's own rounding noise,
a scale for the lowmem-vs-mergekit numbers. Prints markdown tables
(``--per-tensor``: also the worst tensors of each method); ``--json`` also
writes every number, per tensor included.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agreement_cases import Case, Models, all_cases, config_text
from agreement_compare import (
    ExactResult,
    RandomResult,
    Spread,
    Structure,
    TensorDiff,
    compare,
    spread_from_base,
)
from st_numpy import read_model

from lowmem_merge.synthetic import LlamaShape, write_experts

SHAPE = LlamaShape(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=2, vocab_size=1024)
N_EXPERTS = 3
DEFAULT_MERGEKIT = "/work/mkvenv/bin/mergekit-yaml"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
STAMP = ".agreement.json"
TEXT_COLUMNS = {"note", "structure", "worst tensor", "not compared", "mergekit"}
TAIL = 1500


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


# ---------------------------------------------------------------- report


def _g(value: float) -> str:
    return f"{value:.3g}"


def _pct(value: float) -> str:
    return f"{100 * value:.3g}%"


def _short(name: str) -> str:
    return name.removeprefix("model.").removesuffix(".weight")


def _cell(text: str, limit: int = 160) -> str:
    return text[-limit:].replace("\n", " ").replace("|", "/")


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table: the first column left-aligned, numbers right, text left."""
    aligns = ["---"] + ["---" if h in TEXT_COLUMNS else "--:" for h in header[1:]]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, aligns, *rows])


def reference_table(outcomes: dict[str, dict], dtype: str, base_folder: Path,
                    work: Path) -> str:
    """mergekit's own outputs: did it run, how far from the base."""
    base = read_model(base_folder)
    rows = []
    for name, outcome in outcomes.items():
        run: Run = outcome["mergekit"][dtype]
        if not run.ok:
            rows.append([name, "FAILED", _g(run.seconds), "", "", "", _cell(run.message)])
            continue
        out = read_model(work / f"mergekit-{dtype}" / name)
        spread = spread_from_base(out, base)
        rows.append([name, "reused" if run.reused else "ran", _g(run.seconds), str(len(out)),
                     _pct(spread.equal_to_base), _g(spread.task_norm), outcome["case"].note])
    header = ["method", "mergekit", "s", "tensors", "= base", "‖out-base‖/‖base‖", "note"]
    return f"### mergekit (dtype {dtype})\n\n" + _table(header, rows)


def exact_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, r in results.items():
        if isinstance(r, ExactResult):
            unexplained = "" if r.unexplained is None else _pct(r.unexplained)
            rows.append([name, str(r.tensors), _g(r.max_abs), _g(r.max_over_rms),
                         _g(r.max_ulps), _pct(r.over_one_ulp), _pct(r.differing), unexplained,
                         _short(r.worst), "; ".join(r.structure.problems())])
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


EXACT_HEADER = ["method", "tensors", "max abs diff", "max diff / rms", "max ulps", "> 1 ulp",
                "differing", "> 1 ulp off ties", "worst tensor", "structure"]
RANDOM_HEADER = ["method (random)", "tensors", "= base (ref / cand)",
                 "‖out-base‖/‖base‖ (ref / cand)", "worst tensor-norm diff", "worst tensor",
                 "structure"]


def comparison_tables(title: str, results: dict[str, Any]) -> str:
    parts = [f"### {title}"]
    if exact := exact_rows(results):
        parts.append(_table(EXACT_HEADER, exact))
    if random := random_rows(results):
        parts.append(_table(RANDOM_HEADER, random))
    failed = [[n, _cell(r)] for n, r in results.items() if isinstance(r, str)]
    if failed:
        parts.append(_table(["method", "not compared"], failed))
    return "\n\n".join(parts)


def per_tensor_tables(results: dict[str, Any], top: int = 5) -> str:
    parts = []
    for name, result in results.items():
        if isinstance(result, ExactResult) and result.per_tensor:
            worst = sorted(result.per_tensor, key=lambda d: -d.max_over_rms)[:top]
            rows = [[_short(d.name), _g(d.max_abs), _g(d.max_over_rms), _g(d.max_ulps),
                     _pct(d.over_one_ulp / max(d.numel, 1)),
                     _pct(d.differing / max(d.numel, 1))] for d in worst]
            header = [f"{name}: tensor", "max abs diff", "max diff / rms", "max ulps",
                      "> 1 ulp", "differing"]
            parts.append(_table(header, rows))
    return "\n\n".join(parts)


# ---------------------------------------------------------------- driver


def _describe(run: Run) -> str:
    if not run.ok:
        return "FAILED " + (run.message.splitlines()[-1] if run.message else "")
    return f"{'reused' if run.reused else 'ok'} ({run.seconds:.1f} s)"


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
        outcome["mergekit"][dtype] = run = run_mergekit(args.mergekit, config, out, stamp, args)
        print(f"{case.name}: mergekit {dtype}: {_describe(run)}", flush=True)
    if args.candidate:
        outcome["lowmem"] = precomputed(args.candidate / case.name)
    elif lowmem is not None:
        config = args.work / "configs" / args.dtypes[0] / f"{case.name}.yaml"
        outcome["lowmem"] = run = run_lowmem(lowmem, config, args.work / "lowmem" / case.name)
        print(f"{case.name}: lowmem-merge run: {_describe(run)}", flush=True)
    return outcome


def precomputed(folder: Path) -> Run:
    """A candidate output made beforehand (``--candidate``)."""
    if any(folder.glob("*.safetensors")):
        return Run(True, reused=True)
    return Run(False, message=f"no safetensors in {folder}")


def compare_all(outcomes: dict[str, dict], ref_dtype: str, cand: str, args,
                base: Path) -> dict[str, Any]:
    """Reference mergekit-<ref_dtype> against cand ('lowmem' or a mergekit dtype)."""
    results: dict[str, Any] = {}
    cand_root = args.work / f"mergekit-{cand}"
    if cand == "lowmem":
        cand_root = args.candidate or args.work / "lowmem"
    for name, outcome in outcomes.items():
        ref_run = outcome["mergekit"][ref_dtype]
        cand_run = outcome["lowmem"] if cand == "lowmem" else outcome["mergekit"][cand]
        if not ref_run.ok:
            results[name] = "mergekit failed"
        elif not cand_run.ok:
            results[name] = "failed: " + cand_run.message
        else:
            results[name] = compare(outcome["case"], args.work / f"mergekit-{ref_dtype}" / name,
                                    cand_root / name, base)
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
    parser.add_argument("--candidate", type=Path, default=None,
                        help="compare against DIR/<method>/ made beforehand instead of"
                             " running lowmem-merge run")
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
    if not args.dtypes or not set(args.dtypes) <= {"float32", "float64"}:
        parser.error("--dtypes: float32 and/or float64")
    return args


def lowmem_command(args: argparse.Namespace) -> list[str] | None:
    """The lowmem-merge command if it has ``run``; None (with a message) otherwise."""
    if args.no_lowmem or args.candidate:
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


def report(outcomes: dict[str, dict], args, base: Path) -> dict[str, Any]:
    """Print the tables; return the comparisons by title."""
    tables = [reference_table(outcomes, dtype, base, args.work) for dtype in args.dtypes]
    pairs = []  # (reference dtype, candidate, title)
    if any(outcome["lowmem"] is not None for outcome in outcomes.values()):
        name = args.candidate or "lowmem-merge"
        pairs.append((args.dtypes[0], "lowmem", f"{name} vs mergekit ({args.dtypes[0]})"))
    if len(args.dtypes) > 1:
        ref, cand = args.dtypes[-1], args.dtypes[0]
        pairs.append((ref, cand, f"noise floor: mergekit {cand} vs mergekit {ref}"))
    numbers = {}
    for ref, cand, title in pairs:
        numbers[title] = results = compare_all(outcomes, ref, cand, args, base)
        tables.append(comparison_tables(title, results))
        if args.per_tensor:
            tables.append(per_tensor_tables(results))
    print("\n\n" + "\n\n".join(t for t in tables if t))
    return numbers


def list_cases(work: Path) -> None:
    models = Models(work / "models" / "base",
                    [work / "models" / f"expert-{i + 1}" for i in range(N_EXPERTS)])
    for case in all_cases(models).values():
        kind = " (random)" if case.random else ""
        print(f"{case.name}{kind}" + (f": {case.note}" if case.note else ""))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work = args.work.resolve()
    if args.list:
        list_cases(args.work)
        return 0
    if not Path(args.mergekit).exists():
        raise SystemExit(f"{args.mergekit}: not found (see the setup in --help)")
    version = mergekit_version(args.mergekit)
    print(f"mergekit {version} ({args.mergekit})", flush=True)
    models, recipe = make_models(args.work, args.seed, args.spread, args.regen)
    cases = select(all_cases(models), args.methods)
    lowmem = lowmem_command(args)
    outcomes = {name: run_case(case, recipe, lowmem, args) for name, case in cases.items()}
    numbers = report(outcomes, args, models.base)
    if args.json:
        payload = {"mergekit_version": version, "shape": asdict(SHAPE), "spread": args.spread,
                   "seed": args.seed, "runs": outcomes, "comparisons": numbers}
        args.json.write_text(json.dumps(_jsonable(payload), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
