"""Function-space diagnostics: per-layer activation variance and effective rank.

Needs torch and transformers (the `diagnose` extra) and loads each model
whole, so it is for models that fit in memory; the weight-space diagnostics
stream and need neither.

Convention: for each layer's hidden states H (all prompt tokens x hidden
size), centred over tokens, the variance is the mean over hidden units of
the per-unit variance, and the effective rank is exp(entropy) of the
normalised singular values p_i = s_i / sum_j s_j (Roy and Vetterli, 2007);
it lies between 1 and min(tokens, hidden size).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MergeError

DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "12 + 34 =",
    "Once upon a time, in a small village,",
    "Translate to German: good morning",
    "The derivative of x squared is",
    "List three colours: red,",
    "SELECT name FROM users WHERE",
)


@dataclass
class LayerActivations:
    variance: list[float]  # per layer (embeddings output first)
    effective_rank: list[float]

    def as_dict(self) -> dict:
        return {"variance": self.variance, "effective_rank": self.effective_rank}


def effective_rank(hidden: np.ndarray) -> float:
    """exp(entropy) of the normalised singular values of the centred token states."""
    centred = hidden - hidden.mean(axis=0, keepdims=True)
    singular = np.linalg.svd(centred, compute_uv=False)
    total = singular.sum()
    if total <= 0:
        return 1.0
    p = singular / total
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def layer_activations(model_path: str, prompts: list[str]) -> LayerActivations:
    """Hidden states of every layer over all prompts' tokens, for one HF model folder."""
    try:
        import torch
        import transformers
    except ImportError:
        raise MergeError("function-space diagnostics need torch and transformers:"
                         " pip install 'lowmem-merge[diagnose]'") from None
    folder = Path(model_path)
    if not (folder / "config.json").is_file():
        raise MergeError(f"{folder}: function-space diagnostics need a Hugging Face model"
                         " folder (config.json, tokenizer)")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    per_layer: list[list[np.ndarray]] = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")
            states = model(**ids, output_hidden_states=True).hidden_states
            for index, state in enumerate(states):
                if index == len(per_layer):
                    per_layer.append([])
                per_layer[index].append(state[0].double().numpy())
    stacked = [np.concatenate(chunks) for chunks in per_layer]
    return LayerActivations([float(h.var(axis=0).mean()) for h in stacked],
                            [effective_rank(h) for h in stacked])


def read_prompts(path: Path | None) -> list[str]:
    if path is None:
        return list(DEFAULT_PROMPTS)
    prompts = [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise MergeError(f"{path}: no prompts (one per line)")
    return prompts
