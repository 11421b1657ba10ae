"""The testbed's figures: accuracy and collapse diagnostics against N, and per layer."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

# Drawn in colour; the other methods are thin grey lines so that the figure stays readable.
HIGHLIGHT = {"karcher": "tab:red", "karcher (no base)": "tab:orange", "linear": "tab:blue",
             "task_arithmetic": "tab:green", "ties": "tab:purple", "dare_ties": "tab:brown",
             "model_stock": "tab:olive", "multislerp": "tab:cyan"}
SUMMARY_PANELS = (("mean_acc", "accuracy on the experts' tasks", "linear"),
                  ("tv_norm_ratio", "task-vector norm ratio", "log"),
                  ("variance_ratio_mean", "activation variance ratio", "log"),
                  ("rank_ratio_mean", "effective rank ratio", "linear"))
LAYER_PANELS = (("layer_norm_ratio", "task-vector norm ratio", "layer", "log"),
                ("variance_ratio", "activation variance ratio", "hidden state (0 = embeddings)",
                 "log"),
                ("rank_ratio", "effective rank ratio", "hidden state (0 = embeddings)",
                 "linear"))


def _style(label: str) -> dict[str, Any]:
    if label in HIGHLIGHT:
        return {"color": HIGHLIGHT[label], "linewidth": 2.0, "marker": "o", "label": label}
    return {"color": "0.7", "linewidth": 0.8, "marker": ".", "label": "_" + label}


def _labels(res: dict[str, Any]) -> list[str]:
    ran = {r["label"] for r in res["merges"] if "error" not in r}
    return [m["label"] for m in res["methods"] if m["label"] in ran]


def summary_figure(res: dict[str, Any], path: Path) -> None:
    """Four panels against N: accuracy, norm ratio, variance ratio, effective rank ratio."""
    by: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in res["merges"]:
        for key, *_ in SUMMARY_PANELS:
            if key in r:
                by[(r["label"], key)][r["n"]].append(r[key])
    fig, axes = plt.subplots(1, len(SUMMARY_PANELS), figsize=(18, 4.2))
    for ax, (key, title, scale) in zip(axes, SUMMARY_PANELS, strict=True):
        for label in sorted(_labels(res), key=lambda lab: lab in HIGHLIGHT):
            points = by[(label, key)]
            sizes = sorted(points)
            ax.plot(sizes, [mean(points[n]) for n in sizes], **_style(label))
        if key == "mean_acc":
            _reference_lines(ax, res)
        else:
            ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set(title=title, xlabel="experts merged (N)", yscale=scale, xscale="log")
        ax.set_xticks(sorted({r["n"] for r in res["merges"]}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _reference_lines(ax: Any, res: dict[str, Any]) -> None:
    """Experts on their own tasks and the base, on the same subsets as the merges."""
    subsets: dict[int, dict[int, list[str]]] = defaultdict(dict)
    for r in res["merges"]:
        subsets[r["n"]][r["subset"]] = r["tasks"]
    sizes = sorted(subsets)
    ref = res["reference"]
    for acc, style in ((ref["expert_own"], "k--"), (ref["base"], "k:")):
        ax.plot(sizes, [mean(mean(acc[t] for t in s) for s in subsets[n].values())
                        for n in sizes], style, linewidth=1.2,
                label="experts (own task)" if acc is ref["expert_own"] else "base")


def layer_figure(res: dict[str, Any], path: Path) -> None:
    """Per layer (or hidden state) diagnostics of every method at the largest N."""
    n = max(r["n"] for r in res["merges"])
    records = {r["label"]: r for r in res["merges"]
               if r["n"] == n and r["subset"] == 0 and "error" not in r}
    fig, axes = plt.subplots(1, len(LAYER_PANELS), figsize=(14, 4.2))
    for ax, (key, title, xlabel, scale) in zip(axes, LAYER_PANELS, strict=True):
        for label in sorted(records, key=lambda lab: lab in HIGHLIGHT):
            values = records[label][key]
            ax.plot(range(len(values)), values, **_style(label))
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set(title=f"{title}, N={n}", xlabel=xlabel, yscale=scale)
    axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
