"""results.md from the results dictionary of run_quality.py."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

from diagnostics import PROMPTS_PER_TASK
from tasks import TASK_NAMES


def _cell(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{mean(values):.3f} ({min(values):.2f}-{max(values):.2f})"


def _by_label_n(records: list[dict[str, Any]], key: str) -> dict[tuple[str, int], list[float]]:
    out: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in records:
        if key in r:
            out[(r["label"], r["n"])].append(r[key])
    return out


def _subsets(records: list[dict[str, Any]]) -> dict[int, list[list[str]]]:
    seen: dict[int, dict[int, list[str]]] = defaultdict(dict)
    for r in records:
        seen[r["n"]][r["subset"]] = r["tasks"]
    return {n: [subs[i] for i in sorted(subs)] for n, subs in sorted(seen.items())}


def _reference_rows(res: dict[str, Any], sizes: list[int]) -> list[str]:
    """Experts on their own tasks and the base, averaged over the same subsets as the merges."""
    subsets = _subsets(res["merges"])
    rows = []
    for name, acc in (("experts, each on its own task", res["reference"]["expert_own"]),
                      ("base", res["reference"]["base"])):
        cells = [_cell([mean(acc[t] for t in s) for s in subsets.get(n, [])]) for n in sizes]
        rows.append(f"| *{name}* | " + " | ".join(cells) + " |")
    return rows


def main_table(res: dict[str, Any], key: str = "mean_acc") -> list[str]:
    """Rows = methods, columns = N; the best mean of each column in bold."""
    sizes = sorted({r["n"] for r in res["merges"]})
    vals = _by_label_n(res["merges"], key)
    errors = {(r["label"], r["n"]) for r in res["merges"] if "error" in r}
    best = {n: max((mean(v) for (lab, m), v in vals.items() if m == n), default=None)
            for n in sizes}
    lines = ["| method | " + " | ".join(f"N={n}" for n in sizes) + " |",
             "| --- | " + " | ".join("--:" for _ in sizes) + " |"]
    ran = {r["label"] for r in res["merges"]}
    for label in (m["label"] for m in res["methods"] if m["label"] in ran):
        cells = []
        for n in sizes:
            v = vals.get((label, n), [])
            cell = _cell(v) if v else ("error" if (label, n) in errors else "n/a")
            if key == "mean_acc" and v and best[n] is not None and mean(v) == best[n]:
                cell = f"**{cell}**"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if key == "mean_acc":
        lines += _reference_rows(res, sizes)
    return lines


def per_task_table(res: dict[str, Any], n: int) -> list[str]:
    """Accuracy per task of every merge of ``n`` experts (first subset), with references."""
    recs = [r for r in res["merges"] if r["n"] == n and r["subset"] == 0 and "acc" in r]
    if not recs:
        return []
    tasks = recs[0]["tasks"]
    lines = ["| method | " + " | ".join(tasks) + " |",
             "| --- | " + " | ".join("--:" for _ in tasks) + " |"]
    for r in recs:
        lines.append(f"| {r['label']} | " + " | ".join(f"{r['acc'][t]:.2f}" for t in tasks)
                     + " |")
    for name, acc in (("experts, own task", res["reference"]["expert_own"]),
                      ("base", res["reference"]["base"])):
        lines.append(f"| *{name}* | " + " | ".join(f"{acc[t]:.2f}" for t in tasks) + " |")
    return lines


def experts_table(res: dict[str, Any]) -> list[str]:
    """How each expert was trained, how good it is, and how far it moved from the base."""
    geo, ref = res["geometry"], res["reference"]
    lines = ["| task | lr | steps | final loss | own-task acc | base acc | |task vector| "
             "| mean cos to others | mean acc on other tasks |",
             "| --- | --: | --: | --: | --: | --: | --: | --: | --: |"]
    for e in res["training"]["experts"]:
        t = e["task"]
        others = [o for o in TASK_NAMES if o != t]
        cos = mean(geo["tv_cos"][t][o] for o in others)
        off = mean(ref["expert_on_task"][t][o] for o in others)
        lines.append(f"| {t} | {e['lr']:g} | {e['steps']} | {e['final_loss']:.3f} | "
                     f"{ref['expert_own'][t]:.2f} | {ref['base'][t]:.2f} | "
                     f"{geo['tv_norm'][t]:.2f} | {cos:.3f} | {off:.2f} |")
    return lines


def _setup_lines(res: dict[str, Any]) -> list[str]:
    s, tr, mach, tm = res["settings"], res["training"], res["machine"], res["timings_seconds"]
    ts = tr["settings"]
    reused = (f" (models reused from an earlier run, whose training took "
              f"{tr['total_seconds']:.0f} s)" if tr.get("reused") else "")
    subsets = _subsets(res["merges"])
    return [
        f"- Models: Llama, hidden {ts['hidden']}, {ts['layers']} layers, {ts['heads']} heads, "
        f"intermediate {ts['intermediate']}, vocabulary 48 characters and specials, float32. "
        f"Base: {ts['base_steps']} steps (batch {ts['batch']}, lr {ts['base_lr']:g}) on the "
        f"mixture of all {len(TASK_NAMES)} tasks; one expert per task fine-tuned from it, "
        f"with {ts.get('replay', 0):.0%} of its examples replayed from that mixture.",
        f"- Evaluation: exact match of greedy decoding on {s['n_eval']} held-out prompts per "
        f"task (eval seed {s['eval_seed']}); a merge is scored on the tasks of its experts.",
        f"- Subsets (subset seed {s['subset_seed']}): "
        + "; ".join(f"N={n}: " + ", ".join("+".join(t) for t in subs)
                    for n, subs in subsets.items()),
        f"- Seeds: training {ts['seed']} (expert i: {ts['seed']}+1+i), DARE/DELLA masks "
        f"{s['merge_seed']}. Sparsifying methods: density 0.5 (breadcrumbs gamma 0.01, "
        "DELLA epsilon 0.15); every other parameter at its default.",
        f"- Machine: {mach['cpu_count']} cores ({mach['affinity']} usable), {mach['processor']}, "
        f"torch {mach['torch']} with {s['threads']} threads for training and "
        f"{s['eval_threads']} for evaluation, lowmem_merge with {s['threads']} threads, commit "
        f"{mach['lowmem_merge_commit'][:12] or 'unknown'}.",
        f"- Time: training {tm['train']:.0f} s{reused}, reference evaluation "
        f"{tm['reference_eval']:.0f} s, merges and their evaluation {tm['merge_and_eval']:.0f} s "
        f"(merging {tm['merge_only']:.0f} s, evaluating {tm['merged_eval_only']:.0f} s), "
        f"total {tm['total']:.0f} s ({tm['total'] / 60:.1f} min).",
    ]


def write_markdown(res: dict[str, Any], path: Path) -> None:
    """Write the tables of ``res`` to ``path``."""
    errors = [r for r in res["merges"] if "error" in r]
    lines = ["# Merge quality against the number of experts", "",
             "Generated by `python benchmarks/quality/run_quality.py`; every number is in "
             "results.json.", "", *_setup_lines(res), "",
             "## Mean exact-match accuracy of the merge on its experts' tasks", "",
             "Mean over subsets (min-max over subsets); N=8 is the one subset of all experts. "
             "Bold: best method in the column. Chance is about 0.5 on brk and 0.2-0.3 on cnt "
             "and mod, and near 0 elsewhere.", "",
             *main_table(res), "",
             "## Task-vector norm of the merge over the experts' mean task-vector norm", "",
             "|merge - base| / mean_i |expert_i - base| over all weights: below 1 is the "
             "shrinkage the paper attributes to Euclidean merges.", "",
             *main_table(res, "tv_norm_ratio"), "",
             "## Activation variance of the merge over its experts' mean", "",
             f"Hidden states on {PROMPTS_PER_TASK} held-out prompts per task of the merge; "
             "the ratio per hidden state, averaged over the states after each layer. Below 1: "
             "the variance shrinkage the paper reports for Euclidean merges.", "",
             *main_table(res, "variance_ratio_mean"), "",
             "## Effective rank of the merge's hidden states over its experts' mean", "",
             "Effective rank = exp(entropy of the normalised singular values of the centred "
             "token states), per hidden state, averaged as above. Below 1: rank loss.", "",
             *main_table(res, "rank_ratio_mean"), "",
             "## Mean angle of the merge's task vector to its experts' (degrees)", "",
             *main_table(res, "merge_angle"), ""]
    for n in sorted({r["n"] for r in res["merges"]}, reverse=True)[:1]:
        lines += [f"## Per task, N={n} (first subset)", "", *per_task_table(res, n), ""]
    lines += ["## Experts", "", *experts_table(res), ""]
    if errors:
        lines += ["## Errors", ""]
        lines += [f"- {r['label']} N={r['n']} subset {r['subset']}: `{r['error']}`"
                  for r in errors]
        lines.append("")
    path.write_text("\n".join(lines))
