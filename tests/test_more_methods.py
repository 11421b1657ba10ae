"""model_stock, multislerp, nuslerp and passthrough against float64 references."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_bf16_rounded, assert_f32_close, read_safetensors
from test_methods import CHUNK, SHAPES, make_inputs

import lowmem_merge


def lines(values: np.ndarray, by_row: bool) -> np.ndarray:
    """The vectors a per-line method interpolates: rows (last dim) or columns; 1-D: whole."""
    if values.ndim < 2:
        return values.reshape(1, -1)
    matrix = values.reshape(-1, values.shape[-1])
    return matrix if by_row else matrix.T


def unlines(result: np.ndarray, like: np.ndarray, by_row: bool) -> np.ndarray:
    if like.ndim < 2 or by_row:
        return result.reshape(like.shape)
    return result.T.reshape(like.shape)


def ref_model_stock(base, experts, filter_wise):
    out = {}
    for name in SHAPES:
        b = lines(base[name], True) if filter_wise else base[name].reshape(1, -1)
        ws = [lines(e[name], True) if filter_wise else e[name].reshape(1, -1) for e in experts]
        offsets = [w - b for w in ws]
        cosines = []
        for i in range(len(offsets)):
            for k in range(i + 1, len(offsets)):
                norm = np.linalg.norm(offsets[i], axis=-1) * np.linalg.norm(offsets[k], axis=-1)
                cosines.append(np.clip((offsets[i] * offsets[k]).sum(-1) / np.maximum(norm, 1e-6),
                                       -1, 1))
        cos = np.mean(cosines, axis=0)[:, None]
        n = len(ws)
        t = n * cos / (1 + (n - 1) * cos)
        out[name] = (t * (sum(ws) / n) + (1 - t) * b).reshape(base[name].shape)
    return out


def ref_multislerp(experts, weights, base=None):
    w = np.array(weights, float) / np.sum(weights)
    out = {}
    for name in SHAPES:
        xs = np.array([e[name].ravel() - (base[name].ravel() if base else 0) for e in experts])
        norms = np.linalg.norm(xs, axis=1)
        units = xs / (norms[:, None] + 1e-8)
        mean = (units * w[:, None]).sum(0)
        result = mean / np.linalg.norm(mean) * (norms @ w)
        out[name] = (result + (base[name].ravel() if base else 0)).reshape(base[name].shape
                                                                          if base else
                                                                          experts[0][name].shape)
    return out


def slerp_lines(t, v0, v1):
    n0 = np.maximum(np.linalg.norm(v0, axis=-1, keepdims=True), 1e-7)
    n1 = np.maximum(np.linalg.norm(v1, axis=-1, keepdims=True), 1e-7)
    cos = np.clip(((v0 / n0) * (v1 / n1)).sum(-1, keepdims=True), -1, 1)
    theta = np.arccos(cos)
    with np.errstate(divide="ignore", invalid="ignore"):
        result = (np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / np.sin(theta)
    colinear = np.abs(np.sin(theta)) < 1e-8  # mergekit's nuslerp falls back to lerp
    return np.where(colinear, (1 - t) * v0 + t * v1, result)


def ref_nuslerp(experts, weights, base, flatten, row_wise):
    t = weights[1] / sum(weights)
    out = {}
    for name in SHAPES:
        b = base[name] if base else 0
        v0, v1 = experts[0][name] - b, experts[1][name] - b
        if flatten:
            result = slerp_lines(t, v0.reshape(1, -1), v1.reshape(1, -1)).reshape(v0.shape)
        else:
            by_row = not row_wise
            result = unlines(slerp_lines(t, lines(v0, by_row), lines(v1, by_row)), v0, by_row)
        out[name] = result + b
    return out


def merged(tmp_path, paths, method, chunk, dtype="F32", **kwargs):
    out = tmp_path / f"out-{method}-{chunk}-{len(kwargs)}"
    lowmem_merge.merge(paths, method, out, chunk_elements=chunk, dtype=dtype, force=True,
                       **kwargs)
    return read_safetensors(out)[0]


def check(got, want, dtype="F32"):
    for name in SHAPES:
        (assert_f32_close if dtype == "F32" else assert_bf16_rounded)(got[name], want[name])


@pytest.mark.parametrize("chunk", [CHUNK, None])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock(tmp_path, chunk, filter_wise):
    base_path, paths, base, experts = make_inputs(tmp_path, 3, spread=1)
    got = merged(tmp_path, paths, "model_stock", chunk, base=base_path, filter_wise=filter_wise)
    check(got, ref_model_stock(base, experts, filter_wise))


@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp(tmp_path, with_base):
    base_path, paths, base, experts = make_inputs(tmp_path, 3, spread=5)
    kwargs = {"base": base_path} if with_base else {}
    got = merged(tmp_path, paths, "multislerp", CHUNK, "BF16", weights=[0.2, 0.3, 0.5], **kwargs)
    check(got, ref_multislerp(experts, [0.2, 0.3, 0.5], base if with_base else None), "BF16")


@pytest.mark.parametrize("flatten, row_wise", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("chunk", [CHUNK, None])
def test_nuslerp(tmp_path, flatten, row_wise, with_base, chunk):
    base_path, paths, base, experts = make_inputs(tmp_path, 2, spread=5)
    kwargs = {"base": base_path} if with_base else {}
    got = merged(tmp_path, paths, "nuslerp", chunk, weights=[1.0, 3.0], nuslerp_flatten=flatten,
                 nuslerp_row_wise=row_wise, **kwargs)
    check(got, ref_nuslerp(experts, [1.0, 3.0], base if with_base else None, flatten, row_wise))


def test_passthrough_scales(tmp_path):
    _, paths, _, experts = make_inputs(tmp_path, 1)
    got = merged(tmp_path, paths, "passthrough", CHUNK, scale=0.5)
    check(got, {k: v * 0.5 for k, v in experts[0].items()})
