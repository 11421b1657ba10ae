"""Write a synthetic base model and N experts for the merge benchmarks.

Usage::

    python benchmarks/make_experts.py --out /work/bench --shape tinyllama --experts 3

makes ``OUT/base`` and ``OUT/expert-1`` .. ``OUT/expert-N``: Llama-shaped
safetensors models (see ``lowmem_merge.synthetic``), each expert the base plus
a small seeded task vector. Models are generated block by block, so memory
stays small whatever the shape. A model whose folder already has a
``config.json`` (written last, so the model is complete) is skipped unless
``--force`` is given. Shapes: ``tinyllama`` (1.1B parameters, 2.2 GB per
model in BF16), ``small`` (hidden 1024, 8 layers: about 0.2B) and ``tiny``
(the library's default test shape, a few hundred KB).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from lowmem_merge.synthetic import TINYLLAMA, LlamaShape, write_model
from lowmem_merge.units import format_bytes

SHAPES = {
    "tinyllama": TINYLLAMA,
    "small": LlamaShape(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                        num_attention_heads=16, num_key_value_heads=4, vocab_size=32000),
    "tiny": LlamaShape(),
}
DTYPES = ("BF16", "F16", "F32")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for base/, expert-N/")
    parser.add_argument("--experts", type=int, default=3, help="number of experts (default 3)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=DTYPES, default="BF16")
    parser.add_argument("--spread", type=float, default=0.1,
                        help="expert noise relative to the base's (default 0.1)")
    parser.add_argument("--force", action="store_true", help="rewrite existing models")
    args = parser.parse_args(argv)
    if args.experts < 1:
        parser.error("--experts must be at least 1")
    return args


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def make_model(folder: Path, args: argparse.Namespace, expert: int | None) -> None:
    """Write one model (expert None: the base) unless it is already complete."""
    if (folder / "config.json").is_file() and not args.force:
        print(f"{folder}: exists, skipped ({format_bytes(folder_bytes(folder))})")
        return
    if folder.exists():
        shutil.rmtree(folder)  # no stale shards from an earlier shape
    started = time.perf_counter()
    write_model(folder, SHAPES[args.shape], seed=args.seed, expert=expert, spread=args.spread,
                dtype=args.dtype)
    seconds = time.perf_counter() - started
    print(f"{folder}: written, {format_bytes(folder_bytes(folder))} in {seconds:.1f} s",
          flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    make_model(args.out / "base", args, None)
    for index in range(args.experts):
        make_model(args.out / f"expert-{index + 1}", args, index)


if __name__ == "__main__":
    main()
