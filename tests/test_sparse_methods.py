"""TIES, DARE, breadcrumbs and DELLA against float64 references written here."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from helpers import assert_bf16_rounded, assert_f32_close, read_safetensors
from test_methods import CHUNK, SHAPES, make_inputs

import lowmem_merge

MASK64 = (1 << 64) - 1


def stable_rank(delta: np.ndarray) -> np.ndarray:
    """Rank by float32 |delta| descending, ties by index ascending (0 = largest)."""
    key = np.abs(delta).astype(np.float32).view(np.uint32).astype(np.int64)
    order = np.lexsort((np.arange(delta.size), -key))
    rank = np.empty(delta.size, np.int64)
    rank[order] = np.arange(delta.size)
    return rank


def splitmix_uniform(seed: int, index: np.ndarray) -> np.ndarray:
    out = np.empty(index.size)
    for n, j in enumerate(index.tolist()):
        z = (seed + j * 0x9E3779B97F4A7C15) & MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        z ^= z >> 31
        out[n] = (z >> 11) / 2.0**53
    return out


def expert_seed(seed: int, tensor: str, expert: int) -> int:
    digest = hashlib.blake2b(f"{seed}\0{tensor}\0{expert}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def keep_mask(kind, delta, density, gamma, epsilon, seed, name, expert, shape):
    n = delta.size
    if density >= 1:  # mergekit returns the task vector untouched
        return np.ones(n, bool)
    if kind == "magnitude":
        return stable_rank(delta) < int(density * n)
    if kind == "outliers":
        top = int(gamma * n)
        bottom = n - int(density * n) - top
        if bottom < 0:
            top, bottom = top + bottom, 0
        rank = stable_rank(delta)
        return (rank >= top) & (rank < n - bottom)
    u = splitmix_uniform(expert_seed(seed, name, expert), np.arange(n))
    if kind == "random":
        return u < density
    rows = delta.reshape(-1, shape[-1] if len(shape) > 1 else n)
    chance = np.empty_like(rows)
    for r, row in enumerate(rows):
        order = np.argsort(np.abs(row), kind="stable")
        span = max(row.size - 1, 1)
        chance[r, order] = density - epsilon + 2 * epsilon * np.arange(row.size) / span
    return u < chance.ravel()


def reference(kind, consensus, base, experts, weights, densities, *, gamma=0.01, epsilon=0.1,
              normalize, rescale, lam, seed=0):
    out = {}
    for name in SHAPES:
        b = base[name].ravel()
        weighted = []
        for i, expert in enumerate(experts):
            delta = expert[name].ravel() - b
            keep = keep_mask(kind, delta, densities[i], gamma, epsilon, seed, name, i,
                             base[name].shape)
            kept = delta * keep
            if rescale:
                before, after = np.abs(delta).sum(), np.abs(kept).sum()
                if before >= 1e-7 and after >= 1e-7:
                    kept = kept * before / after
            weighted.append(weights[i] * kept)
        weighted = np.array(weighted)
        w = np.array(weights, float)[:, None]
        if consensus:
            majority = np.where(weighted.sum(0) >= 0, 1.0, -1.0)
            mask = np.sign(weighted) == majority
            mixed = (weighted * mask).sum(0)
            divisor = (w * mask).sum(0)
            divisor[divisor == 0] = 1
        else:
            mixed = weighted.sum(0)
            divisor = w.sum() if abs(w.sum()) >= 1e-8 else 1.0
        if normalize:
            mixed = mixed / divisor
        out[name] = (b + lam * mixed).reshape(base[name].shape)
    return out


CASES = {
    "ties": ("magnitude", True, dict(normalize=True, rescale=False)),
    "dare_ties": ("random", True, dict(normalize=False, rescale=True)),
    "dare_linear": ("random", False, dict(normalize=False, rescale=True)),
    "breadcrumbs": ("outliers", False, dict(normalize=False, rescale=False)),
    "breadcrumbs_ties": ("outliers", True, dict(normalize=False, rescale=False)),
    "della": ("rank", True, dict(normalize=True, rescale=True)),
    "della_linear": ("rank", False, dict(normalize=False, rescale=True)),
}


def run_method(tmp_path, method, chunk, dtype, base_path, paths, weights, densities, **extra):
    per_model = [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    if method.startswith("breadcrumbs"):
        per_model = [{**p, "gamma": 0.05} for p in per_model]
    if method.startswith("della"):
        per_model = [{**p, "epsilon": 0.1} for p in per_model]
    out = tmp_path / f"out-{method}-{chunk}-{dtype}"
    job_kwargs = dict(chunk_elements=chunk, dtype=dtype, force=True, base=base_path)
    from lowmem_merge.config import build_job
    from lowmem_merge.engine import run_merge

    run_merge(build_job(paths, out, method=method, model_params=per_model, params=extra,
                        **job_kwargs))
    return read_safetensors(out)[0]


@pytest.mark.parametrize("method", list(CASES))
@pytest.mark.parametrize("chunk", [CHUNK, None])
def test_sparse_methods_match_reference(tmp_path, method, chunk):
    kind, consensus, flags = CASES[method]
    base_path, paths, base, experts = make_inputs(tmp_path, 3, spread=2)
    weights, densities = [1.0, 0.6, -0.3], [0.5, 0.3, 1.0]
    got = run_method(tmp_path, method, chunk, "F32", base_path, paths, weights, densities,
                     **{"lambda": 0.9})
    want = reference(kind, consensus, base, experts, weights, densities, gamma=0.05,
                     lam=0.9, **flags)
    for name in SHAPES:
        assert_f32_close(got[name], want[name])


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della"])
def test_bf16_output_and_flags(tmp_path, method):
    kind, consensus, _ = CASES[method]
    base_path, paths, base, experts = make_inputs(tmp_path, 2, spread=2)
    seed = {} if method == "ties" else {"seed": 7}
    got = run_method(tmp_path, method, CHUNK, "BF16", base_path, paths, [1.0, 1.0], [0.4, 0.7],
                     normalize=False, rescale=True, **seed)
    want = reference(kind, consensus, base, experts, [1.0, 1.0], [0.4, 0.7], normalize=False,
                     rescale=True, lam=1.0, **seed)
    for name in SHAPES:
        assert_bf16_rounded(got[name], want[name])


def test_ties_selection_is_exact_top_k_for_a_tensor_many_chunks_long(tmp_path):
    """Heavily tied bf16 deltas over ~16 chunks: exactly k kept, in rank order."""
    from helpers import write_safetensors

    rng = np.random.default_rng(3)
    shape = (1024, 1031)
    base = write_safetensors(tmp_path / "base.safetensors",
                             {"w": rng.standard_normal(shape) * 0.05}, "BF16")
    expert = write_safetensors(tmp_path / "e.safetensors",
                               {"w": base["w"] + np.round(rng.standard_normal(shape) * 4) / 256},
                               "BF16")
    out = tmp_path / "out"
    lowmem_merge.merge([tmp_path / "e.safetensors"], "ties", out,
                       base=tmp_path / "base.safetensors", chunk_elements=CHUNK, dtype="float32",
                       density=0.3)
    delta = (expert["w"] - base["w"]).ravel()
    kept = read_safetensors(out)[0]["w"].ravel() != base["w"].ravel()
    expected = stable_rank(delta) < int(0.3 * delta.size)
    assert np.array_equal(kept, expected & (delta != 0))
    magnitude = np.abs(delta.astype(np.float32))
    kth = np.sort(magnitude)[::-1][int(0.3 * delta.size) - 1]
    at_threshold = magnitude == kth
    assert at_threshold.sum() > 1000  # many ties at the threshold, only some of them kept
    assert 0 < (kept & at_threshold).sum() < at_threshold.sum()


def test_dare_mask_ignores_chunking_and_threads(tmp_path):
    import numba

    base_path, paths, _, _ = make_inputs(tmp_path, 2, spread=2)
    results = []
    for chunk, threads in [(CHUNK, 1), (2 * CHUNK, 2), (None, numba.config.NUMBA_NUM_THREADS)]:
        out = tmp_path / f"o{chunk}-{threads}"
        lowmem_merge.merge(paths, "dare_ties", out, base=base_path, chunk_elements=chunk,
                           threads=threads, density=0.5, seed=3)
        results.append(read_safetensors(out)[0])
    for other in results[1:]:
        for name in SHAPES:
            assert np.array_equal(results[0][name], other[name])


def test_della_refuses_epsilon_outside_the_interval(tmp_path):
    from lowmem_merge.errors import MergeError

    base_path, paths, _, _ = make_inputs(tmp_path, 1)
    with pytest.raises(MergeError, match=r"density 0.9 \+/- epsilon 0.2"):
        lowmem_merge.merge(paths, "della", tmp_path / "o", base=base_path, density=0.9,
                           epsilon=0.2)


def test_seed_option_reproduces_and_changes_the_mask(tmp_path):
    from click.testing import CliRunner
    from lowmem_merge_cli.main import main

    base_path, paths, _, _ = make_inputs(tmp_path, 2, spread=2)
    outputs = {}
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        result = CliRunner().invoke(main, ["merge", *map(str, paths), "-m", "dare_linear",
                                           "--base", str(base_path), "-p", "density=0.5",
                                           "--seed", seed, "-q", "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        outputs[name] = read_safetensors(tmp_path / name)[0]["big"]
    assert np.array_equal(outputs["a"], outputs["b"])
    assert not np.array_equal(outputs["a"], outputs["c"])
    refused = CliRunner().invoke(main, ["merge", *map(str, paths), "-m", "linear", "--seed",
                                        "1", "-o", str(tmp_path / "d")])
    assert refused.exit_code == 1 and "draws nothing at random" in refused.output
