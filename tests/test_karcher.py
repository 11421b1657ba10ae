"""Properties of the Gram-space Karcher mean (arXiv:2603.04972)."""

import numpy as np
import pytest
from helpers import bf16_bits, bf16_values, read_safetensors, write_safetensors
from test_methods import karcher_vectors

import lowmem_merge
from lowmem_merge.methods.karcher import karcher_coefficients


def merged(vectors, weights, **kwargs):
    stack = np.stack(vectors)
    return karcher_coefficients(stack @ stack.T, np.asarray(weights, float), **kwargs) @ stack


def spherical_slerp(a, b, t):
    ua, ub = a / np.linalg.norm(a), b / np.linalg.norm(b)
    theta = np.arccos(np.clip(ua @ ub, -1, 1))
    direction = (np.sin((1 - t) * theta) * ua + np.sin(t * theta) * ub) / np.sin(theta)
    return ((1 - t) * np.linalg.norm(a) + t * np.linalg.norm(b)) * direction


@pytest.mark.parametrize("t", [0.1, 0.5, 0.8])
def test_two_models_equal_slerp(t):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(1000), rng.standard_normal(1000) * 3
    np.testing.assert_allclose(merged([a, b], [1 - t, t]), spherical_slerp(a, b, t),
                               rtol=1e-9, atol=1e-9)


def test_two_models_of_equal_norm_equal_mergekit_slerp():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(500), rng.standard_normal(500)
    b *= np.linalg.norm(a) / np.linalg.norm(b)
    theta = np.arccos(a @ b / (a @ a))
    slerp = (np.sin(0.7 * theta) * a + np.sin(0.3 * theta) * b) / np.sin(theta)
    np.testing.assert_allclose(merged([a, b], [0.7, 0.3]), slerp, rtol=1e-9, atol=1e-12)


def test_identical_inputs_return_the_input():
    x = np.random.default_rng(2).standard_normal(300)
    np.testing.assert_allclose(merged([x, x, x], [0.2, 0.3, 0.5]), x, rtol=1e-12)


def test_output_norm_is_the_weighted_mean_norm():
    rng = np.random.default_rng(3)
    vectors = [rng.standard_normal(400) * s for s in (1, 2, 5, 0.5)]
    weights = np.array([1, 2, 3, 4.0])
    expected = (weights / weights.sum()) @ [np.linalg.norm(v) for v in vectors]
    assert np.linalg.norm(merged(vectors, weights)) == pytest.approx(expected, rel=1e-12)


def test_permuting_models_with_their_weights_changes_nothing():
    rng = np.random.default_rng(4)
    vectors = [rng.standard_normal(200) + 1.5 for _ in range(5)]
    weights = [0.1, 0.4, 0.2, 0.2, 0.1]
    order = [3, 0, 4, 1, 2]
    np.testing.assert_allclose(merged([vectors[i] for i in order], [weights[i] for i in order]),
                               merged(vectors, weights), rtol=1e-10, atol=1e-12)


def test_matches_the_full_vector_karcher_flow_for_many_spread_experts():
    rng = np.random.default_rng(5)
    vectors = [rng.standard_normal(300) + rng.standard_normal(300) * 2 for _ in range(8)]
    weights = rng.random(8) + 0.1
    np.testing.assert_allclose(merged(vectors, weights), karcher_vectors(vectors, weights),
                               rtol=1e-9, atol=1e-10)


def test_zero_expert_keeps_its_weight_in_the_scale_only():
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal(100), rng.standard_normal(100)
    zero = np.zeros(100)
    got = merged([a, b, zero], [1, 1, 2])
    direction = merged([a, b], [1, 1])
    expected_norm = (np.linalg.norm(a) + np.linalg.norm(b)) / 4
    np.testing.assert_allclose(got, direction / np.linalg.norm(direction) * expected_norm,
                               rtol=1e-12)


def test_all_zero_experts_give_zero():
    assert not merged([np.zeros(10), np.zeros(10)], [1, 1]).any()


def test_antipodal_inputs_start_from_the_first_expert(caplog):
    x = np.random.default_rng(7).standard_normal(50)
    with caplog.at_level("INFO"):
        got = merged([x, -x], [1, 1], tensor="w")
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, x, rtol=1e-12)
    assert "near-antipodal" in caplog.text and "w" in caplog.text


def test_near_antipodal_inputs_stay_finite_and_keep_the_norm():
    rng = np.random.default_rng(8)
    x = rng.standard_normal(50)
    y = -x + rng.standard_normal(50) * 1e-9
    got = merged([x, y, x * 2], [1, 1, 0.001])
    assert np.isfinite(got).all()
    norms = np.array([np.linalg.norm(v) for v in (x, y, 2 * x)])
    assert np.linalg.norm(got) == pytest.approx(np.array([1, 1, 0.001]) @ norms / 2.001)


def test_bf16_inputs_with_cosine_above_0_998_still_move(tmp_path):
    """A bf16 dot product rounds these cosines to 1 and stops; the float64 Gram does not."""
    rng = np.random.default_rng(9)
    a = rng.standard_normal(4096)
    b = a + rng.standard_normal(4096) * 0.05
    stored = [bf16_values(bf16_bits(v.astype(np.float32))) for v in (a, b)]
    cosine = stored[0] @ stored[1] / np.linalg.norm(stored[0]) / np.linalg.norm(stored[1])
    assert 0.998 < cosine < 0.9995
    bf16_cosine = bf16_values(bf16_bits(np.float32(cosine)))
    assert bf16_cosine == 1.0  # what a bf16 dot product would see
    for i, values in enumerate(stored):
        write_safetensors(tmp_path / f"m{i}.safetensors", {"w": values}, "BF16")
    out = tmp_path / "out"
    lowmem_merge.merge([tmp_path / "m0.safetensors", tmp_path / "m1.safetensors"], "karcher",
                       out, weights=[0.5, 0.5], dtype="float32")
    got = read_safetensors(out)[0]["w"]
    reference = karcher_vectors(stored, [0.5, 0.5])
    np.testing.assert_allclose(got, reference, rtol=1e-6, atol=1e-7)
    linear = (stored[0] + stored[1]) / 2
    assert np.linalg.norm(got) > np.linalg.norm(linear) * (1 + 1e-4)  # it left the chord
