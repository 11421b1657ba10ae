"""Every method through the streaming engine against float64 references written here."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_bf16_rounded, assert_f32_close, read_safetensors, write_safetensors

import lowmem_merge

CHUNK = 65536
# Odd sizes: one tensor 3.3 chunks long (chunks do not divide it), one exactly
# two chunks, one far smaller than a chunk, a vector and a scalar-like tensor.
SHAPES = {"big": (613, 353), "even": (256, 512), "small": (7, 13), "vec": (97,), "one": (1,)}


def make_inputs(tmp_path, n_experts, dtype="BF16", seed=0, spread=0.3, with_base=True):
    rng = np.random.default_rng(seed)
    base_values = {k: rng.standard_normal(s) * 0.05 for k, s in SHAPES.items()}
    base = write_safetensors(tmp_path / "base" / "model.safetensors", base_values, dtype)
    experts = []
    for i in range(n_experts):
        values = {k: v + rng.standard_normal(v.shape) * 0.05 * spread * (i + 1)
                  for k, v in base_values.items()}
        experts.append(write_safetensors(tmp_path / f"e{i}" / "model.safetensors", values, dtype))
    paths = [tmp_path / f"e{i}" for i in range(n_experts)]
    return (tmp_path / "base" if with_base else None), paths, base, experts


def run(tmp_path, paths, method, chunk, dtype=None, **kwargs):
    out = tmp_path / f"out-{method}-{chunk}-{dtype}"
    lowmem_merge.merge(paths, method, out, chunk_elements=chunk, dtype=dtype, force=True,
                       **kwargs)
    return read_safetensors(out)[0]


def check(actual, reference, dtype):
    for name in SHAPES:
        if dtype == "F32":
            assert_f32_close(actual[name], reference[name])
        else:
            assert_bf16_rounded(actual[name], reference[name])


# -- float64 references -----------------------------------------------------

def reference_linear(experts, weights, normalize=True):
    w = np.asarray(weights, float)
    if normalize:
        w = w / w.sum()
    return {k: sum(wi * e[k] for wi, e in zip(w, experts)) for k in SHAPES}


def reference_task_arithmetic(base, experts, weights, lam):
    return {k: base[k] + lam * sum(w * (e[k] - base[k]) for w, e in zip(weights, experts))
            for k in SHAPES}


def reference_slerp(a, b, t):
    """mergekit's slerp, in float64."""
    out = {}
    for k in SHAPES:
        v0, v1 = a[k].ravel(), b[k].ravel()
        n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
        u0 = v0 / n0 if n0 > 1e-8 else v0
        u1 = v1 / n1 if n1 > 1e-8 else v1
        dot = np.sum(u0 * u1)
        if abs(dot) > 0.9995:
            res = (1 - t) * v0 + t * v1
        else:
            theta = np.arccos(dot)
            res = (np.sin(theta * (1 - t)) * v0 + np.sin(theta * t) * v1) / np.sin(theta)
        out[k] = res.reshape(a[k].shape)
    return out


def karcher_vectors(vectors, weights, max_iter=10, tol=1e-5):
    """The paper's Karcher flow on full vectors (not Gram space), float64."""
    alphas = np.asarray(weights, float) / np.sum(weights)
    norms = [np.linalg.norm(v) for v in vectors]
    keep = [i for i, n in enumerate(norms) if n > 0]
    if not keep:
        return np.zeros_like(vectors[0])
    a = alphas[keep] / alphas[keep].sum()
    units = [vectors[i] / norms[i] for i in keep]
    m = sum(ai * u for ai, u in zip(a, units))
    m = m / np.linalg.norm(m) if np.linalg.norm(m) >= tol else units[0].copy()
    for _ in range(max_iter):
        tangent = np.zeros_like(m)
        for ai, u in zip(a, units):
            d = np.clip(m @ u, -1, 1)
            theta = np.arccos(d)
            if tol <= theta <= np.pi - 1e-7:
                tangent += ai * theta / np.sin(theta) * (u - d * m)
        size = np.linalg.norm(tangent)
        if size < tol:
            break
        m = np.cos(size) * m + np.sin(size) * tangent / size
        m /= np.linalg.norm(m)
    return float(np.dot(alphas, norms)) * m


def reference_karcher(experts, weights, base=None):
    out = {}
    for k in SHAPES:
        vectors = [e[k].ravel() - (base[k].ravel() if base else 0) for e in experts]
        merged = karcher_vectors(vectors, weights)
        out[k] = (merged + (base[k].ravel() if base else 0)).reshape(experts[0][k].shape)
    return out


# -- tests --------------------------------------------------------------------

CHUNKS = [CHUNK, 2 * CHUNK, None]


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("out_dtype", ["BF16", "F32"])
def test_linear(tmp_path, chunk, out_dtype):
    _, paths, _, experts = make_inputs(tmp_path, 3)
    weights = [0.5, 0.3, 0.2]
    got = run(tmp_path, paths, "linear", chunk, out_dtype, weights=weights)
    check(got, reference_linear(experts, weights), out_dtype)


def test_linear_without_normalize(tmp_path):
    _, paths, _, experts = make_inputs(tmp_path, 2)
    got = run(tmp_path, paths, "linear", CHUNK, "F32", weights=[0.7, 0.9], normalize=False)
    check(got, reference_linear(experts, [0.7, 0.9], normalize=False), "F32")


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("out_dtype", ["BF16", "F32"])
def test_task_arithmetic(tmp_path, chunk, out_dtype):
    base_path, paths, base, experts = make_inputs(tmp_path, 3)
    got = run(tmp_path, paths, "task_arithmetic", chunk, out_dtype, base=base_path,
              weights=[1.0, 0.5, -0.25], **{"lambda": 0.8})
    check(got, reference_task_arithmetic(base, experts, [1.0, 0.5, -0.25], 0.8), out_dtype)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("out_dtype", ["BF16", "F32"])
def test_slerp(tmp_path, chunk, out_dtype):
    _, paths, _, experts = make_inputs(tmp_path, 2, spread=20)
    got = run(tmp_path, paths, "slerp", chunk, out_dtype, t=0.3)
    check(got, reference_slerp(experts[0], experts[1], 0.3), out_dtype)


def test_slerp_with_base_starts_at_the_base(tmp_path):
    base_path, paths, base, experts = make_inputs(tmp_path, 1, spread=20)
    got = run(tmp_path, paths, "slerp", CHUNK, "F32", base=base_path, t=0.25)
    check(got, reference_slerp(base, experts[0], 0.25), "F32")


def test_slerp_gradient_over_layers(tmp_path):
    a = {f"model.layers.{i}.w": np.random.default_rng(i).standard_normal(50) for i in range(5)}
    b = {k: np.random.default_rng(10 + i).standard_normal(50) for i, k in enumerate(a)}
    a["model.embed.weight"] = np.random.default_rng(20).standard_normal(30)
    b["model.embed.weight"] = np.random.default_rng(21).standard_normal(30)
    sa = write_safetensors(tmp_path / "a.safetensors", a)
    sb = write_safetensors(tmp_path / "b.safetensors", b)
    out = tmp_path / "out"
    lowmem_merge.merge([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], "slerp", out,
                       t=[0.0, 0.5, 1.0])
    got = read_safetensors(out)[0]
    # mergekit: layer i of 5 sits at i/4 along the gradient; other tensors at 0.
    for i, t in enumerate([0.0, 0.25, 0.5, 0.75, 1.0]):
        name = f"model.layers.{i}.w"
        SHAPES_ONE = {name: None}
        ref = _slerp_one(sa[name], sb[name], t)
        assert_f32_close(got[name], ref), SHAPES_ONE
    assert_f32_close(got["model.embed.weight"], sa["model.embed.weight"])


def _slerp_one(v0, v1, t):
    u0, u1 = v0 / np.linalg.norm(v0), v1 / np.linalg.norm(v1)
    theta = np.arccos(u0 @ u1)
    return (np.sin(theta * (1 - t)) * v0 + np.sin(theta * t) * v1) / np.sin(theta)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("out_dtype", ["BF16", "F32"])
def test_karcher_raw_weights(tmp_path, chunk, out_dtype):
    _, paths, _, experts = make_inputs(tmp_path, 3, spread=15)
    weights = [0.5, 0.3, 0.2]
    got = run(tmp_path, paths, "karcher", chunk, out_dtype, weights=weights)
    check(got, reference_karcher(experts, weights), out_dtype)


@pytest.mark.parametrize("chunk", [CHUNK, None])
def test_karcher_task_vectors(tmp_path, chunk):
    base_path, paths, base, experts = make_inputs(tmp_path, 4)
    got = run(tmp_path, paths, "karcher", chunk, "F32", base=base_path, weights=[1, 2, 3, 4])
    check(got, reference_karcher(experts, [1, 2, 3, 4], base=base), "F32")


def test_karcher_raw_mode_with_base_ignores_base_values(tmp_path):
    base_path, paths, _, experts = make_inputs(tmp_path, 3, spread=15)
    got = run(tmp_path, paths, "karcher", CHUNK, "F32", base=base_path, task_vectors=False)
    check(got, reference_karcher(experts, [1, 1, 1]), "F32")


def test_result_does_not_depend_on_chunk_size(tmp_path):
    _, paths, _, _ = make_inputs(tmp_path, 3, spread=15)
    results = [run(tmp_path, paths, "karcher", chunk, "BF16") for chunk in CHUNKS]
    for other in results[1:]:
        for name in SHAPES:
            assert np.array_equal(results[0][name], other[name])


def test_mixed_input_dtypes_merge_exactly(tmp_path):
    rng = np.random.default_rng(5)
    values = [{k: rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(3)]
    stored = [write_safetensors(tmp_path / f"m{i}.safetensors", v, d)
              for i, (v, d) in enumerate(zip(values, ["BF16", "F16", "F32"]))]
    got = run(tmp_path, [tmp_path / f"m{i}.safetensors" for i in range(3)], "linear", CHUNK,
              "F32")
    check(got, reference_linear(stored, [1, 1, 1]), "F32")


def test_non_float_tensors_are_copied_from_the_base(tmp_path):
    tensors = {"w": np.ones((4, 4)), "position_ids": np.arange(10)}
    dtypes = {"position_ids": "I64"}
    write_safetensors(tmp_path / "base.safetensors", tensors, "F32", dtypes)
    write_safetensors(tmp_path / "a.safetensors", {**tensors, "position_ids": np.arange(10) * 3},
                      "F32", dtypes)
    out = tmp_path / "out"
    lowmem_merge.merge([tmp_path / "a.safetensors"], "task_arithmetic", out,
                       base=tmp_path / "base.safetensors")
    values, dtypes_out = read_safetensors(out)
    assert dtypes_out["position_ids"] == "I64"
    assert np.array_equal(values["position_ids"], np.arange(10))


def test_empty_and_scalar_tensors(tmp_path):
    tensors = {"empty": np.zeros((0, 5)), "scalar": np.array(2.0), "w": np.ones(3)}
    for name, scale in (("a", 1.0), ("b", 3.0)):
        write_safetensors(tmp_path / f"{name}.safetensors",
                          {k: v * scale for k, v in tensors.items()})
    out = tmp_path / "out"
    lowmem_merge.merge([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], "karcher", out)
    got = read_safetensors(out)[0]
    assert got["empty"].shape == (0, 5)
    assert got["scalar"].shape == () and got["scalar"] == pytest.approx(4.0)
    np.testing.assert_allclose(got["w"], 2.0)
