"""The CUDA path end to end: --device cuda gives the bytes of --device cpu.

Runs under Numba's CUDA simulator (tests/conftest.py turns it on unless
LOWMEM_TEST_REAL_CUDA=1), so the models are tiny: the simulator runs about a
thousand elements per second.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from helpers import read_safetensors, write_safetensors

import lowmem_merge
from lowmem_merge.engine import devices
from lowmem_merge.errors import MergeError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None,
                                reason="numba-cuda is not installed (the cuda or test extra)")

# Odd sizes: no tensor is a multiple of a thread block, one is a single row.
SHAPES = {"model.layers.0.mlp.weight": (12, 37), "model.layers.0.norm.weight": (37,),
          "model.layers.1.attn.weight": (5, 64)}


def _models(root, dtype: str, n: int = 3):
    rng = np.random.default_rng(7)
    base = {name: rng.normal(0, 0.05, shape) for name, shape in SHAPES.items()}
    write_safetensors(root / "base" / "model.safetensors", base, dtype)
    experts = []
    for i in range(n):
        tensors = {name: v + rng.normal(0, 0.01, v.shape) * (i + 1) for name, v in base.items()}
        tensors["model.layers.0.mlp.weight"][0, :3] = base["model.layers.0.mlp.weight"][0, :3]
        write_safetensors(root / f"e{i}" / "model.safetensors", tensors, dtype)
        experts.append(root / f"e{i}")
    return root / "base", experts


CASES = [
    ("karcher", True, {}),
    ("karcher", False, {}),
    ("linear", False, {}),
    ("task_arithmetic", True, {}),
    ("model_stock", True, {}),
    ("multislerp", True, {}),
    ("ties", True, {"density": 0.4}),
    ("dare_ties", True, {"density": 0.5, "seed": 3}),
    ("dare_linear", True, {"density": 0.5, "seed": 3, "rescale": True}),
    ("breadcrumbs_ties", True, {"density": 0.6, "gamma": 0.1}),
    ("della", True, {"density": 0.5, "epsilon": 0.2, "seed": 5}),
]


@pytest.mark.parametrize("method,use_base,params", CASES,
                         ids=[f"{m}{'' if b else '-nobase'}" for m, b, _ in CASES])
def test_cuda_merge_equals_cpu(tmp_path, method, use_base, params):
    base, experts = _models(tmp_path, "BF16")
    outputs = {}
    for device in ("cpu", "cuda"):
        report = lowmem_merge.merge(experts, method, tmp_path / device,
                                    base=base if use_base else None, device=device,
                                    **params)
        outputs[device] = read_safetensors(tmp_path / device / "model.safetensors")[0]
        assert (report.gpu_tensors > 0) == (device == "cuda")
    for name in SHAPES:
        np.testing.assert_array_equal(outputs["cuda"][name], outputs["cpu"][name], err_msg=name)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_gguf_quantizing_through_the_backend_equals_cpu(qtype):
    """The engine's GGUF encoding step, dispatched to the GPU in several spans."""
    from gguf import GGMLQuantizationType

    from lowmem_merge import kernels
    from lowmem_merge.kernels import dispatch
    from lowmem_merge.kernels.cuda.backend import CudaKernels
    from lowmem_merge.kernels.gguf_quants import block_layout

    code = int(GGMLQuantizationType[qtype])
    block_elements, block_bytes = block_layout(code)
    values = np.random.default_rng(3).normal(0, 0.02, 3 * block_elements).astype(np.float32)
    values[block_elements:2 * block_elements] = 0.0  # an all-zero block
    expected = np.empty(3 * block_bytes, np.uint8)
    kernels.quantize_into(values, code, expected)
    per_block = block_elements * 4 + block_bytes
    gpu = CudaKernels(budget=2 * per_block + 1024, reserved=1024)  # one block per span
    got = np.empty_like(expected)
    with dispatch.running_on(gpu):
        kernels.quantize_into(values, code, got)
    assert got.tobytes() == expected.tobytes()
    assert gpu.copied_to_device == values.nbytes  # it ran on the device, not the fallback


def test_auto_leaves_small_tensors_and_the_simulator_alone(tmp_path):
    base, experts = _models(tmp_path, "BF16", n=2)
    report = lowmem_merge.merge(experts, "linear", tmp_path / "out", device="auto")
    assert report.gpu_tensors == 0
    assert report.device.startswith("cpu")


def test_cuda_without_numba_cuda_is_one_clear_error(tmp_path, monkeypatch):
    base, experts = _models(tmp_path, "BF16", n=2)
    monkeypatch.setattr(devices.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MergeError, match=r"--device cuda: numba-cuda is not installed.*\[cuda\]"):
        lowmem_merge.merge(experts, "linear", tmp_path / "out", device="cuda")
    assert not (tmp_path / "out").exists()


def test_cuda_without_driver_is_one_clear_error(tmp_path, monkeypatch):
    from numba import config, cuda

    class NoDriver:
        def __len__(self):
            raise RuntimeError("Error at driver init: \n\nCUDA driver library cannot"
                                 " be found.\n:")

    base, experts = _models(tmp_path, "BF16", n=2)
    monkeypatch.setattr(config, "ENABLE_CUDASIM", 0)
    monkeypatch.setattr(cuda, "gpus", NoDriver())
    with pytest.raises(MergeError, match="no usable CUDA driver .CUDA driver library cannot"):
        lowmem_merge.merge(experts, "linear", tmp_path / "out", device="cuda")


def test_plan_shows_the_gpu_tensors(tmp_path):
    from lowmem_merge.config import build_job
    from lowmem_merge.engine import preview_merge

    base, experts = _models(tmp_path, "BF16", n=2)
    job = build_job(experts, tmp_path / "out", method="linear", device="cuda",
                    max_gpu_memory="64MiB")
    lines = "\n".join(preview_merge(job).lines())
    assert "device          cuda: Numba CUDA simulator, budget 64.0 MiB" in lines
    assert "on the GPU      3 tensors, 801 elements" in lines
    assert not (tmp_path / "out").exists()


def test_spans_stream_within_a_small_gpu_budget():
    """A budget that holds a few hundred elements still gives the CPU's results."""
    from lowmem_merge import kernels
    from lowmem_merge.kernels import dispatch
    from lowmem_merge.kernels.cuda.backend import CudaKernels

    rng = np.random.default_rng(1)
    n, width = 2, kernels.REDUCTION_BLOCK + 77  # two spans, the second a partial block
    stack = rng.normal(size=(n, width)).astype(np.float32).view(np.uint32)
    base = rng.normal(size=width).astype(np.float32).view(np.uint32)
    per_element = n * 4 + 4
    gpu = CudaKernels(budget=2 * 8192 * per_element + 4096, reserved=4096)
    assert gpu.span_elements(per_element, kernels.REDUCTION_BLOCK) == kernels.REDUCTION_BLOCK
    blocks = -(-width // kernels.REDUCTION_BLOCK)
    expected = np.empty((blocks, n, n))
    kernels.gram_blocks(stack, kernels.F32, base, kernels.F32, True, expected)
    got = np.empty_like(expected)
    with dispatch.running_on(gpu):
        kernels.gram_blocks(stack, kernels.F32, base, kernels.F32, True, got)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # float64 reference written here: the Gram of the deltas, block by block.
    deltas = stack.view(np.float32).astype(np.float64) - base.view(np.float32)
    for b in range(blocks):
        part = deltas[:, b * kernels.REDUCTION_BLOCK:(b + 1) * kernels.REDUCTION_BLOCK]
        np.testing.assert_allclose(got[b], part @ part.T, rtol=1e-12)
    assert gpu.copied_to_device >= stack.nbytes + base.nbytes
