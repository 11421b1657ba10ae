"""lowmem-merge diagnose: norms and angles against numpy float64, activations, report files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import write_safetensors
from lowmem_merge_cli.main import main

from lowmem_merge.diagnose import weights
from lowmem_merge.diagnose.activations import effective_rank


def angle(a: np.ndarray, b: np.ndarray) -> float:
    cosine = np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)
    return float(np.degrees(np.arccos(np.clip(cosine, -1, 1))))


@pytest.fixture
def models(tmp_path):
    rng = np.random.default_rng(3)
    shapes = {"model.layers.0.mlp.w": (7, 50001 // 7 + 1), "model.layers.0.norm": (33,),
              "model.layers.1.mlp.w": (5, 9), "model.embed_tokens.weight": (11, 13)}
    base = {n: rng.standard_normal(s) for n, s in shapes.items()}
    experts = [{n: v + rng.standard_normal(v.shape) * (0.1 + i) for n, v in base.items()}
               for i in range(3)]
    merged = {n: sum(e[n] for e in experts) / 3 for n in shapes}
    stored = {}
    for label, tensors in [("base", base), ("e0", experts[0]), ("e1", experts[1]),
                           ("e2", experts[2]), ("merged", merged)]:
        stored[label] = write_safetensors(tmp_path / f"{label}.safetensors", tensors)
    return tmp_path, stored


@pytest.mark.parametrize("with_base", [False, True])
def test_norms_and_angles_match_float64_math_across_chunks(models, monkeypatch, with_base):
    folder, stored = models
    monkeypatch.setattr(weights, "CHUNK", 3 * 8192)  # the big tensor spans three chunks
    tensors, layers = weights.weight_diagnostics(
        str(folder / "merged.safetensors"), [str(folder / f"e{i}.safetensors") for i in range(3)],
        str(folder / "base.safetensors") if with_base else None)

    def vector(label: str, names) -> np.ndarray:
        values = np.concatenate([stored[label][n].ravel() for n in names])
        if with_base:
            values = values - np.concatenate([stored["base"][n].ravel() for n in names])
        return values

    for stats in tensors:
        experts = [vector(f"e{i}", [stats.name]) for i in range(3)]
        merged = vector("merged", [stats.name])
        norms = [np.linalg.norm(e) for e in experts]
        assert stats.norm_ratio == pytest.approx(np.linalg.norm(merged) / np.mean(norms),
                                                 rel=1e-9)
        assert stats.merge_angles == pytest.approx([angle(merged, e) for e in experts],
                                                   abs=1e-6)
        assert stats.expert_angles == pytest.approx(
            [angle(experts[0], experts[1]), angle(experts[0], experts[2]),
             angle(experts[1], experts[2])], abs=1e-6)
    assert [s.layer for s in layers] == [0, 1]
    layer0 = [n for n in stored["merged"] if n.startswith("model.layers.0.")]
    experts = [vector(f"e{i}", layer0) for i in range(3)]
    merged = vector("merged", layer0)
    assert layers[0].norm_ratio == pytest.approx(
        np.linalg.norm(merged) / np.mean([np.linalg.norm(e) for e in experts]), rel=1e-9)
    assert layers[0].merge_angles == pytest.approx([angle(merged, e) for e in experts],
                                                   abs=1e-6)


def test_effective_rank_convention():
    rng = np.random.default_rng(0)
    rank_one = np.outer(rng.standard_normal(40), rng.standard_normal(8))
    assert effective_rank(rank_one) == pytest.approx(1.0, abs=1e-6)
    # Centred rows of a scaled orthogonal design: 4 equal singular values -> rank 4.
    design = np.kron(np.eye(4), np.ones((2, 1))) * np.array([1, -1] * 4)[:, None]
    assert effective_rank(design) == pytest.approx(4.0, rel=1e-9)
    noisy = rank_one + rng.standard_normal(rank_one.shape) * 0.1
    assert 1.0 < effective_rank(noisy) < 8


def test_cli_writes_json_and_plot_with_activations(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    from lowmem_merge import merge
    from lowmem_merge.synthetic import LlamaShape, write_experts

    base, experts = write_experts(tmp_path, LlamaShape(hidden_size=64, vocab_size=300), 2,
                                  dtype="F32", spread=1.0)
    merge(experts, "linear", tmp_path / "merged")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\n12+34=\n")
    result = CliRunner().invoke(main, [
        "diagnose", str(tmp_path / "merged"), "-e", str(experts[0]), "-e", str(experts[1]),
        "--base", str(base), "--prompts", str(prompts), "--json", str(tmp_path / "r.json"),
        "--plot", str(tmp_path / "r.png")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "norm ratio" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["layers"]) == 2 and len(report["tensors"]) == 21
    ranks = report["activations"][str(tmp_path / "merged")]["effective_rank"]
    assert len(ranks) == 3 and all(1.0 <= r <= 64 for r in ranks)
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
