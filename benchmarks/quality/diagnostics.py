"""Collapse diagnostics of one merge against its experts, through `lowmem_merge.diagnose`.

Weight space: the per-layer task-vector norm ratio and the mean angle of the merge to its
experts (streamed, as `lowmem-merge diagnose --base` computes them). Function space: per
hidden state, the merge's activation variance and effective rank over the experts' mean, on
held-out prompts of the merge's tasks. Ratios below 1 are the shrinkage and rank loss that
arXiv:2603.04972 reports for Euclidean merges of many experts.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from statistics import mean
from typing import Any

import numpy as np
from tasks import BOS, eval_examples

from lowmem_merge.diagnose.activations import LayerActivations, layer_activations
from lowmem_merge.diagnose.weights import GramSummary, weight_diagnostics

PROMPTS_PER_TASK = 16
PROMPT_SEED = 1  # not the accuracy prompts' seed: these only probe the hidden states


def probe_prompts(tasks: tuple[str, ...]) -> list[str]:
    """Held-out prompts of ``tasks``, with the <bos> the models were trained behind."""
    return [BOS + p for t in tasks for p, _ in eval_examples(t, PROMPTS_PER_TASK, PROMPT_SEED)]


@cache
def _expert_activations(folder: Path, tasks: tuple[str, ...]) -> LayerActivations:
    return layer_activations(str(folder), probe_prompts(tasks))


def _ratio(merged: list[float], experts: list[list[float]]) -> list[float]:
    reference = np.mean(np.array(experts), axis=0)
    return [float(m / r) for m, r in zip(merged, reference, strict=True)]


def merge_diagnostics(merged: Path, models: Path, tasks: list[str]) -> dict[str, Any]:
    """Weight- and function-space diagnostics of ``merged``, a merge of ``tasks``' experts."""
    experts = [models / f"expert-{t}" for t in tasks]
    tensors, layers = weight_diagnostics(str(merged), [str(e) for e in experts],
                                         base=str(models / "base"))
    whole = GramSummary(sum(t.gram for t in tensors))
    acts = layer_activations(str(merged), probe_prompts(tuple(tasks)))
    refs = [_expert_activations(e, tuple(tasks)) for e in experts]
    variance = _ratio(acts.variance, [r.variance for r in refs])
    rank = _ratio(acts.effective_rank, [r.effective_rank for r in refs])
    return {
        "diag_norm_ratio": whole.norm_ratio,
        "layer_norm_ratio": [s.norm_ratio for s in layers],
        "merge_angle": mean(whole.merge_angles),
        "expert_angle": mean(whole.expert_angles) if len(tasks) > 1 else 0.0,
        "variance_ratio": variance,
        "rank_ratio": rank,
        # Hidden states after each layer (index 0, the embeddings, is left out of the summary;
        # the last is after the final RMSNorm, as transformers returns it).
        "variance_ratio_mean": mean(variance[1:]),
        "rank_ratio_mean": mean(rank[1:]),
    }
