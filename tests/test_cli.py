"""The command line as a user runs it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import read_safetensors, write_safetensors
from lowmem_merge_cli.main import main


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_demo_merges_and_reports(tmp_path):
    # The test process holds far more than a fresh one, so give it room.
    result = invoke("demo", "--keep", str(tmp_path), "--max-memory", "2GiB")
    assert result.exit_code == 0, result.output
    for word in ("karcher", "tensors", "read", "written", "time", "peak RSS"):
        assert word in result.output
    merged, dtypes = read_safetensors(tmp_path / "merged")
    assert len(merged) == 21 and set(dtypes.values()) == {"BF16"}
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "llama"


def test_merge_with_params_weights_and_report(tmp_path):
    rng = np.random.default_rng(0)
    a = write_safetensors(tmp_path / "a.safetensors", {"w": rng.standard_normal(100)})
    b = write_safetensors(tmp_path / "b.safetensors", {"w": rng.standard_normal(100)})
    out = tmp_path / "out"
    result = invoke("merge", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                    "--method", "linear", "--weights", "3,1", "--param", "normalize=false",
                    "--dtype", "float32", "--max-memory", "1GiB", "--threads", "1", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "linear (2 experts)" in result.output
    np.testing.assert_allclose(read_safetensors(out)[0]["w"], 3 * a["w"] + b["w"], rtol=1e-6)


def test_quiet_prints_nothing(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", {"w": np.ones(4)})
    result = invoke("merge", str(tmp_path / "a.safetensors"), "-m", "linear", "-q",
                    "-o", str(tmp_path / "out"))
    assert result.exit_code == 0 and result.output == ""


@pytest.mark.parametrize("args, message", [
    (["--weights", "1,x"], "--weights '1,x'"),
    (["--param", "nokey"], "expected key=value"),
    (["--dtype", "int8"], "unknown dtype 'int8'"),
    (["--max-memory", "lots"], "--max-memory: cannot read 'lots'"),
    (["--max-memory", "1MiB"], "too small"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, args, message):
    write_safetensors(tmp_path / "a.safetensors", {"w": np.ones(4)})
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "a.safetensors"), "-m", "linear",
                                       "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_inspect_lists_tensors(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", {"w": np.ones((3, 4)), "b": np.ones(2)},
                      "BF16")
    result = invoke("inspect", str(tmp_path / "a.safetensors"))
    assert result.exit_code == 0
    assert "w" in result.output and "3x4" in result.output
    assert "2 tensors, 14 parameters, 28 B (BF16: 2)" in result.output


def test_methods_lists_parameters_and_defaults():
    result = invoke("methods")
    for text in ("karcher", "max_iter=10", "tol=1e-05", "linear", "normalize=True", "slerp",
                 "t=required", "task_arithmetic", "lambda=1.0"):
        assert text in result.output


def test_loads_in_transformers(tmp_path):
    torch = pytest.importorskip("torch", reason="torch is in the test extra only")
    transformers = pytest.importorskip("transformers")
    # A budget above the demo's default: this process also holds torch, Ray and numba-cuda.
    assert invoke("demo", "--keep", str(tmp_path), "--max-memory", "2GiB").exit_code == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    merged = read_safetensors(tmp_path / "merged")[0]
    state = model.state_dict()
    for name, values in merged.items():
        np.testing.assert_array_equal(state[name].to(torch.float64).numpy(), values)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 512) and torch.isfinite(logits).all()


def test_progress_bar_shows_bytes_and_tensors(tmp_path, capsys):
    import lowmem_merge

    write_safetensors(tmp_path / "a.safetensors", {"w": np.ones(1000), "v": np.ones(10)})
    lowmem_merge.merge([tmp_path / "a.safetensors"], "linear", tmp_path / "out", progress=True)
    bar = capsys.readouterr().err
    assert "merging" in bar and "tensors 2/2" in bar and "B/s" in bar


def test_plan_shows_sizes_chunks_and_streamed_tensors_without_writing(tmp_path):
    from lowmem_merge.synthetic import LlamaShape, write_experts

    base, experts = write_experts(tmp_path, LlamaShape(hidden_size=256, vocab_size=1000), 2,
                                  dtype="F32")
    out = tmp_path / "out"
    result = invoke("plan", *map(str, experts), "--base", str(base), "-m", "ties",
                    "-p", "density=0.5", "-o", str(out), "--max-memory", "4GiB")
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.strip()}
    assert "ties (2 experts)" in lines["method"]
    assert "4.0 GiB (--max-memory)" in lines["budget"]
    assert "fits" in lines["write"]
    # Every input is read once (3 models of 4 bytes per parameter); nothing is streamed.
    params = sum(int(np.prod(s)) for _, s in LlamaShape(hidden_size=256,
                                                        vocab_size=1000).tensors())
    assert f"{params * 4 * 3 / 2**20:.1f} MiB" in lines["read"]
    assert "0 tensors larger than a chunk" in lines["streamed"]
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_plan_of_a_yaml_config_names_streamed_tensors(tmp_path):
    from lowmem_merge.synthetic import LlamaShape, write_experts

    _, experts = write_experts(tmp_path, LlamaShape(hidden_size=512, vocab_size=1000), 2,
                               dtype="F32")
    config = tmp_path / "c.yml"
    config.write_text("merge_method: karcher\nmodels:\n"
                      + "".join(f"  - model: {p}\n" for p in experts))
    from lowmem_merge import config as config_module
    from lowmem_merge.engine import preview_merge

    job = config_module.job_from_yaml(config, tmp_path / "out.gguf", max_memory="4GiB")
    job.chunk_elements = 65536
    preview = preview_merge(job)
    streamed = [line for line in preview.lines() if line.startswith("  token_embd")]
    assert streamed == ["  token_embd.weight: 8 chunks, 2 passes"]  # 1000 x 512 elements
    result = invoke("plan", str(config), str(tmp_path / "out.gguf"))
    assert result.exit_code == 0, result.output
    assert "(gguf)" in result.output
