"""llama.cpp itself loads merged GGUF files and computes what transformers computes.

Runs when llama-cpp-python is installed (pip builds llama.cpp from source:
`pip install llama-cpp-python`, several minutes); see the README.
"""

from __future__ import annotations

import ctypes

import gguf
import numpy as np
import pytest

from lowmem_merge import merge
from lowmem_merge.synthetic import LlamaShape, write_experts

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
torch = pytest.importorskip("torch", reason="torch is not installed")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

SHAPE = LlamaShape(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=320)
TOKENS = [318, 5, 17, 42, 99, 200, 7, 250, 33, 64, 128, 3]


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-cpp")
    _, experts = write_experts(root, SHAPE, 2, dtype="F32", spread=2.0)
    merge(experts, "karcher", root / "merged-st", dtype="f32")
    return root, experts


def llama_cpp_logits(path) -> np.ndarray:
    # A float32 KV cache, so that the comparison measures the weights, not cache rounding.
    model = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_threads=2,
                            type_k=gguf.GGMLQuantizationType.F32,
                            type_v=gguf.GGMLQuantizationType.F32, verbose=False)
    try:
        model.eval(TOKENS)
        return np.array(model.scores[: len(TOKENS)], dtype=np.float64)
    finally:
        model.close()


def transformers_logits(folder) -> np.ndarray:
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].double().numpy()


@pytest.mark.parametrize(("dtype", "tolerance"), [("f32", 2e-5), ("f16", 5e-3)])
def test_llama_cpp_logits_match_transformers_on_the_same_merge(merged, dtype, tolerance):
    root, experts = merged
    out = root / f"merged-{dtype}.gguf"
    merge(experts, "karcher", out, dtype=dtype, force=True)
    ours = llama_cpp_logits(out)
    reference = transformers_logits(root / "merged-st")
    scale = np.abs(reference).max()
    assert scale > 0.1  # the model is not trivially flat
    assert np.abs(ours - reference).max() / scale < tolerance


def test_q4_k_m_types_match_llama_cpp_quantize(merged):
    """llama.cpp's own quantizer on our F32 file picks the same type for every tensor, and
    our K-quant blocks decode to values as close to the F32 weights as its blocks do."""
    root, experts = merged
    f32 = root / "for-quantize.gguf"
    merge(experts, "karcher", f32, dtype="f32", force=True)
    theirs = root / "theirs-q4km.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = gguf.LlamaFileType.MOSTLY_Q4_K_M
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(),
                                          ctypes.byref(params)) == 0
    ours = root / "ours-q4km.gguf"
    merge(experts, "karcher", ours, dtype="q4_k_m", force=True)
    reference = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(f32).tensors}
    their_tensors = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    our_tensors = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    assert sorted(their_tensors) == sorted(our_tensors)
    for name, mine in our_tensors.items():
        other = their_tensors[name]
        assert mine.tensor_type == other.tensor_type, name
        exact = reference[name].astype(np.float64).reshape(-1)
        errors = [np.sqrt(np.mean((gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
                                   .reshape(-1) - exact) ** 2)) for t in (mine, other)]
        assert errors[0] <= errors[1] * 1.01 + 1e-12, (name, errors)
    assert llama_cpp_logits(ours).shape == (len(TOKENS), SHAPE.vocab_size)
