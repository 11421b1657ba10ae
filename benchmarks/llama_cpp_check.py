"""llama.cpp against lowmem-merge's GGUF output: logits and quantizer agreement.

Usage::

    python benchmarks/llama_cpp_check.py [--install] [--out /tmp/llama-cpp-check]

``--install`` first runs ``pip install llama-cpp-python`` (pip builds llama.cpp
from source, about 15 minutes on 2 cores). Then, on two Llama-shaped experts
made here (hidden 512, 4 layers, 8 heads, 2 KV heads, byte-level BPE of 512 tokens):

* merges them with karcher into safetensors (float32) and into GGUF F32,
  F16, Q8_0 and Q4_K_M;
* loads each GGUF in llama.cpp (float32 KV cache) and prints the largest
  difference of its logits for a 32-token prompt from transformers' logits of
  the safetensors merge, relative to the largest logit;
* quantizes the F32 GGUF with llama.cpp's own ``llama_model_quantize`` to
  Q4_K_M and prints how many tensors got the same type as ours and the
  fraction of bit-identical K-quant blocks.
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--install", action="store_true", help="pip install llama-cpp-python")
    parser.add_argument("--out", type=Path, default=Path("/tmp/llama-cpp-check"))
    return parser.parse_args()


def llama_logits(llama_cpp, gguf, path: Path, tokens: list[int]) -> np.ndarray:
    model = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=128, n_threads=2,
                            type_k=gguf.GGMLQuantizationType.F32,
                            type_v=gguf.GGMLQuantizationType.F32, verbose=False)
    try:
        model.eval(tokens)
        return np.array(model.scores[: len(tokens)], dtype=np.float64)
    finally:
        model.close()


def block_agreement(gguf, ours: Path, theirs: Path) -> tuple[int, int, int, int]:
    """(tensors, same type, K-quant blocks, identical K-quant blocks)."""
    mine = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    other = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    same_type = blocks = identical = 0
    for name, tensor in mine.items():
        if tensor.tensor_type != other[name].tensor_type:
            continue
        same_type += 1
        if tensor.tensor_type.name.endswith("_K"):
            size = gguf.GGML_QUANT_SIZES[tensor.tensor_type][1]
            a = np.asarray(tensor.data).reshape(-1, size)
            b = np.asarray(other[name].data).reshape(-1, size)
            blocks += a.shape[0]
            identical += int(np.all(a == b, axis=1).sum())
    return len(mine), same_type, blocks, identical


def main() -> None:
    args = parse_args()
    if args.install:
        subprocess.run([sys.executable, "-m", "pip", "install", "llama-cpp-python"], check=True)
    import gguf
    import llama_cpp
    import torch
    import transformers

    from lowmem_merge import merge
    from lowmem_merge.synthetic import LlamaShape, write_experts

    shutil.rmtree(args.out, ignore_errors=True)
    shape = LlamaShape(hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, vocab_size=512)
    _, experts = write_experts(args.out, shape, 2, dtype="F32", spread=2.0)
    merge(experts, "karcher", args.out / "merged-st", dtype="f32")
    tokens = [int(t) for t in np.random.default_rng(0).integers(0, 510, 32)]
    model = transformers.LlamaForCausalLM.from_pretrained(args.out / "merged-st",
                                                          dtype=torch.float32)
    with torch.no_grad():
        reference = model(torch.tensor([tokens])).logits[0].double().numpy()
    scale = np.abs(reference).max()
    print(f"transformers logits: largest magnitude {scale:.3f}")
    for dtype in ("f32", "f16", "q8_0", "q4_k_m"):
        path = args.out / f"merged-{dtype}.gguf"
        merge(experts, "karcher", path, dtype=dtype)
        difference = np.abs(llama_logits(llama_cpp, gguf, path, tokens) - reference).max()
        print(f"llama.cpp on {dtype:7s} GGUF: max |logit difference| / max |logit| ="
              f" {difference / scale:.2e}")
    theirs = args.out / "llama-cpp-q4_k_m.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = gguf.LlamaFileType.MOSTLY_Q4_K_M
    if llama_cpp.llama_model_quantize(str(args.out / "merged-f32.gguf").encode(),
                                      str(theirs).encode(), ctypes.byref(params)) != 0:
        raise SystemExit("llama_model_quantize failed")
    tensors, same, blocks, identical = block_agreement(gguf, args.out / "merged-q4_k_m.gguf",
                                                       theirs)
    print(f"Q4_K_M against llama.cpp's quantizer: {same}/{tensors} tensors of the same type;"
          f" {identical}/{blocks} K-quant blocks bit-identical ({identical / blocks:.2%})")


if __name__ == "__main__":
    main()
