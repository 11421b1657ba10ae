"""TSV-Merge against a float64 reference, and its refusal when a matrix does not fit."""

import numpy as np
import pytest
from helpers import assert_f32_close, read_safetensors
from test_methods import SHAPES, make_inputs

import lowmem_merge
from lowmem_merge.errors import MergeError


def reference_tsv(base, experts, alpha, fraction=None):
    out = {}
    for name in SHAPES:
        deltas = [e[name] - base[name] for e in experts]
        if base[name].ndim != 2 or min(base[name].shape) < 2:
            out[name] = base[name] + alpha * sum(deltas)
            continue
        keep = max(1, int((fraction or 1 / len(deltas)) * min(base[name].shape)))
        svds = [np.linalg.svd(d, full_matrices=False) for d in deltas]
        u = np.hstack([s[0][:, :keep] for s in svds])
        sigma = np.concatenate([s[1][:keep] for s in svds])
        v = np.hstack([s[2][:keep].T for s in svds])
        pu, _, qu = np.linalg.svd(u, full_matrices=False)
        pv, _, qv = np.linalg.svd(v, full_matrices=False)
        out[name] = base[name] + alpha * (pu @ qu) @ np.diag(sigma) @ (pv @ qv).T
    return out


@pytest.mark.parametrize("fraction", [0.0, 0.2])
def test_tsv_matches_reference(tmp_path, fraction):
    base_path, paths, base, experts = make_inputs(tmp_path, 3, spread=3)
    out = tmp_path / "out"
    lowmem_merge.merge(paths, "tsv", out, base=base_path, dtype="float32", alpha=0.7,
                       rank_fraction=fraction)
    got = read_safetensors(out)[0]
    want = reference_tsv(base, experts, 0.7, fraction)
    for name in SHAPES:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-6, atol=1e-7)
    assert_f32_close(got["vec"], want["vec"])


def test_tsv_refuses_a_matrix_larger_than_the_budget(tmp_path):
    base_path, paths, _, _ = make_inputs(tmp_path, 2)
    with pytest.raises(MergeError, match=r"tensor big: the method needs"):
        lowmem_merge.merge(paths, "tsv", tmp_path / "out", base=base_path, chunk_elements=65536)
    assert not (tmp_path / "out").exists()
