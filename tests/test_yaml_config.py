"""mergekit YAML configs: the same merge as the equivalent arguments, and clear refusals."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import assert_f32_close, read_safetensors
from lowmem_merge_cli.main import main
from test_methods import SHAPES, make_inputs, reference_task_arithmetic
from test_sparse_methods import reference

from lowmem_merge.config import job_from_yaml
from lowmem_merge.engine import run_merge
from lowmem_merge.errors import MergeError
from lowmem_merge.synthetic import LlamaShape, write_experts


def write_config(tmp_path, text: str):
    path = tmp_path / "merge.yml"
    path.write_text(textwrap.dedent(text))
    return path


def test_ties_config_equals_reference(tmp_path):
    base_path, paths, base, experts = make_inputs(tmp_path, 3, spread=2)
    config = write_config(tmp_path, f"""
        merge_method: ties
        base_model: {base_path}
        models:
          - model: {base_path}
          - model: {paths[0]}
            parameters: {{weight: 1.0, density: 0.5}}
          - model: {paths[1]}
            parameters: {{weight: 0.6, density: 0.3}}
          - model: {paths[2]}
            parameters: {{weight: -0.3}}
        parameters:
          lambda: 0.9
        dtype: float32
        """)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(config), str(out), "-q"])
    assert result.exit_code == 0, result.output
    want = reference("magnitude", True, base, experts, [1.0, 0.6, -0.3], [0.5, 0.3, 1.0],
                     normalize=True, rescale=False, lam=0.9)
    got = read_safetensors(out)[0]
    for name in SHAPES:
        assert_f32_close(got[name], want[name])


def test_filtered_gradient_parameters(tmp_path):
    """weight: [{filter: big, value: [..]}, {value: 1}] as mergekit evaluates it."""
    base_path, paths, base, experts = make_inputs(tmp_path, 1)
    config = write_config(tmp_path, f"""
        merge_method: task_arithmetic
        base_model: {base_path}
        models:
          - model: {paths[0]}
            parameters:
              weight:
                - filter: big
                  value: 0.25
                - value: 2.0
        out_dtype: float32
        """)
    from lowmem_merge import run_config

    run_config(config, tmp_path / "out")
    got = read_safetensors(tmp_path / "out")[0]
    assert_f32_close(got["big"], reference_task_arithmetic(base, experts, [0.25], 1.0)["big"])
    assert_f32_close(got["vec"], reference_task_arithmetic(base, experts, [2.0], 1.0)["vec"])


@pytest.mark.parametrize("body, message", [
    ("merge_method: ties\nmodels: []\nbogus: 1\n", ":3: bogus: unknown key"),
    ("merge_method: nope\nmodels: [{model: a}]\n", ":1: merge_method: unknown merge method"),
    ("merge_method: linear\nmodels:\n  - model: a\n    parameters: {wieght: 1}\n",
     "wieght: unknown key"),
    ("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: abc}\n",
     ":4: weight: weight must be float"),
    ("merge_method: linear\nmodels: [{model: a}]\ntokenizer_source: union\n",
     ":3: tokenizer_source: 'union' needs embedding surgery"),
    ("merge_method: linear\nmodels: [{model: a}]\nchat_template: chatml\n",
     ":3: chat_template: writing a chat template"),
    ("merge_method: linear\nmodels: [{model: a}]\ndtype: int4\n", ":3: dtype: unknown dtype"),
    ("merge_method: ties\nmodels: [{model: a}]\n", "needs a base model"),
    ("merge_method: linear\n", "give exactly one of 'models' or 'slices'"),
    ("- just a list\n", "must be a YAML mapping"),
    ("merge_method: linear\nmodels: [{model: a}\n", "not valid YAML"),
])
def test_bad_configs_name_key_and_line(tmp_path, body, message):
    path = tmp_path / "c.yml"
    path.write_text(body)
    with pytest.raises(MergeError) as caught:
        job_from_yaml(path, tmp_path / "out")
    assert message in str(caught.value) and str(path) in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_passthrough_frankenmerge_with_slices(tmp_path):
    shape = LlamaShape(hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    _, (first, second) = write_experts(tmp_path / "models", shape, 2, seed=1, dtype="F32")
    config = write_config(tmp_path, f"""
        merge_method: passthrough
        slices:
          - sources: [{{model: {first}, layer_range: [0, 2]}}]
          - sources: [{{model: {second}, layer_range: [1, 4]}}]
        """)
    out = tmp_path / "out"
    run_merge(job_from_yaml(config, out))
    got = read_safetensors(out)[0]
    a, b = read_safetensors(first)[0], read_safetensors(second)[0]
    sources = [(a, 0), (a, 1), (b, 1), (b, 2), (b, 3)]
    for layer, (model, source) in enumerate(sources):
        for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight",
                       "input_layernorm.weight"):
            np.testing.assert_array_equal(got[f"model.layers.{layer}.{suffix}"],
                                          model[f"model.layers.{source}.{suffix}"])
    np.testing.assert_array_equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    np.testing.assert_array_equal(got["lm_head.weight"], b["lm_head.weight"])
    assert len(got) == 2 + 1 + 5 * 9
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5


def test_slerp_slices_with_gradient_match_plain_slerp(tmp_path):
    shape = LlamaShape(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    _, (first, second) = write_experts(tmp_path / "models", shape, 2, seed=2, spread=3,
                                       dtype="F32")
    config = write_config(tmp_path, f"""
        merge_method: slerp
        base_model: {first}
        slices:
          - sources:
              - {{model: {second}, layer_range: [0, 3]}}
              - {{model: {first}, layer_range: [0, 3]}}
        parameters:
          t: [0, 0.5, 1]
        dtype: float32
        """)
    run_merge(job_from_yaml(config, tmp_path / "sliced"))
    from lowmem_merge import merge

    merge([first, second], "slerp", tmp_path / "plain", t=[0, 0.5, 1], dtype="float32")
    sliced = read_safetensors(tmp_path / "sliced")[0]
    plain = read_safetensors(tmp_path / "plain")[0]
    assert sliced.keys() == plain.keys()
    for name in plain:
        np.testing.assert_array_equal(sliced[name], plain[name])


def test_tokenizer_source_names_a_model(tmp_path):
    base_path, paths, _, _ = make_inputs(tmp_path, 2)
    (paths[1] / "tokenizer.json").write_text('{"from": "e1"}')
    config = write_config(tmp_path, f"""
        merge_method: linear
        models: [{{model: {paths[0]}}}, {{model: {paths[1]}}}]
        tokenizer_source: {paths[1]}
        """)
    run_merge(job_from_yaml(config, tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "tokenizer.json").read_text()) == {"from": "e1"}
