"""Hub repo ids resolved offline from a cache laid out as huggingface_hub lays it out."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from helpers import read_safetensors, write_safetensors

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo: str, files: dict[str, bytes], commit: str = COMMIT) -> None:
    """Blobs by content hash, snapshot entries as relative symlinks, refs/main -> commit."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (root / "blobs" / digest).write_bytes(data)
        (snapshot / name).symlink_to(Path("../../blobs") / digest)


def model_bytes(tmp_path: Path, name: str, seed: int) -> tuple[dict[str, bytes], dict]:
    rng = np.random.default_rng(seed)
    values = write_safetensors(tmp_path / "src" / f"{name}.safetensors",
                               {"w": rng.standard_normal((8, 8)), "b": rng.standard_normal(8)})
    files = {"model.safetensors": (tmp_path / "src" / f"{name}.safetensors").read_bytes(),
             "config.json": json.dumps({"model_type": "llama", "from": name}).encode()}
    return files, values


def lowmem(cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(cache.parent / "hf-home")}
    return subprocess.run([sys.executable, "-m", "lowmem_merge_cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_merge_hub_models_offline_from_the_cache(tmp_path):
    cache = tmp_path / "hub"
    files_a, values_a = model_bytes(tmp_path, "a", 0)
    files_b, values_b = model_bytes(tmp_path, "b", 1)
    cache_repo(cache, "org/model-a", files_a)
    cache_repo(cache, "org/model-b", files_b, commit="f" * 40)
    out = tmp_path / "out"
    done = lowmem(cache, "merge", "org/model-a", f"org/model-b@{'f' * 40}", "--method",
                  "linear", "--dtype", "float32", "-o", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    merged = read_safetensors(out)[0]
    for name in ("w", "b"):
        np.testing.assert_allclose(merged[name], (values_a[name] + values_b[name]) / 2,
                                   rtol=1e-6)
    assert json.loads((out / "config.json").read_text())["from"] == "a"


def test_inspect_hub_model(tmp_path):
    cache = tmp_path / "hub"
    cache_repo(cache, "org/model-a", model_bytes(tmp_path, "a", 0)[0])
    done = lowmem(cache, "inspect", "org/model-a")
    assert done.returncode == 0, done.stderr
    assert "2 tensors, 72 parameters" in done.stdout


def test_repo_missing_from_the_cache_offline_is_one_clear_error(tmp_path):
    done = lowmem(tmp_path / "hub", "inspect", "org/not-cached")
    assert done.returncode == 1
    assert "org/not-cached: not in the local Hugging Face cache" in done.stderr
    assert "Traceback" not in done.stderr
