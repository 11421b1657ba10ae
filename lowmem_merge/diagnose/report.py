"""The diagnostics report: JSON for tools, a PNG per layer for people, a summary for the
terminal."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..errors import MergeError
from .activations import LayerActivations
from .weights import LayerStats, TensorStats


def report_dict(tensors: list[TensorStats], layers: list[LayerStats],
                activations: dict[str, LayerActivations] | None) -> dict:
    return {"tensors": [t.as_dict() for t in tensors], "layers": [s.as_dict() for s in layers],
            "activations": {k: v.as_dict() for k, v in (activations or {}).items()}}


def write_json(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=1, allow_nan=True) + "\n")


def summary_lines(tensors: list[TensorStats], layers: list[LayerStats]) -> list[str]:
    ratios = [t.norm_ratio for t in tensors if not math.isnan(t.norm_ratio)]
    lines = [f"tensors         {len(tensors)}; norm ratio (merge / experts' mean norm):"
             f" median {np.median(ratios):.3f}, min {min(ratios):.3f}, max {max(ratios):.3f}"]
    lines.append("layer  norm ratio  mean angle between experts  mean angle merge-expert")
    for layer in layers:
        lines.append(f"{layer.layer:5d}  {layer.norm_ratio:10.3f}"
                     f"  {_mean(layer.expert_angles):26.2f}  {_mean(layer.merge_angles):23.2f}")
    return lines


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def write_plot(path: Path, layers: list[LayerStats],
               activations: dict[str, LayerActivations] | None) -> None:
    """Per layer: norm ratio and angles; with activations, variance and effective rank."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MergeError("--plot needs matplotlib: pip install 'lowmem-merge[diagnose]'") \
            from None
    panels = 2 + (2 if activations else 0)
    figure, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.6), squeeze=False)
    axes = axes[0]
    index = [s.layer for s in layers]
    axes[0].plot(index, [s.norm_ratio for s in layers], marker="o")
    axes[0].axhline(1.0, color="grey", linewidth=0.8)
    axes[0].set(title="norm ratio (merge / experts)", xlabel="layer")
    axes[1].plot(index, [_mean(s.expert_angles) for s in layers], marker="o",
                 label="between experts")
    axes[1].plot(index, [_mean(s.merge_angles) for s in layers], marker="s",
                 label="merge to experts")
    axes[1].set(title="mean angle (degrees)", xlabel="layer")
    axes[1].legend()
    if activations:
        for name, values in activations.items():
            axes[2].plot(values.variance, label=name)
            axes[3].plot(values.effective_rank, label=name)
        axes[2].set(title="activation variance", xlabel="hidden state (0 = embeddings)",
                    yscale="log")
        axes[3].set(title="effective rank", xlabel="hidden state (0 = embeddings)")
        axes[3].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
