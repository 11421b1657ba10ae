"""Exact-match accuracy of greedy decoding on the held-out prompts of each task.

Usage::

    python benchmarks/quality/evaluate.py MODEL_DIR [--tasks add,rev] [--n 100]

Prompts of equal length are decoded together, so a batch needs no padding and the result is
the same as decoding each prompt alone. An answer counts only if the model emits exactly the
answer followed by <eos>.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from tasks import BOS_ID, EOS_ID, TASK_NAMES, TASKS, decode, encode, eval_examples
from transformers import AutoTokenizer, LlamaForCausalLM
from transformers.utils import logging as hf_logging


def load_model(folder: str | Path) -> LlamaForCausalLM:
    """A model folder (as written by save_pretrained or lowmem_merge) in float32, eval mode."""
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval()


def check_tokenizer(folder: str | Path) -> None:
    """Fail loudly if the folder's tokenizer does not give the ids the evaluation uses."""
    tok = AutoTokenizer.from_pretrained(folder)
    sample = "add:12+34=46"
    if tok(sample, add_special_tokens=False)["input_ids"] != encode(sample):
        raise ValueError(f"{folder}: tokenizer.json does not match the task vocabulary")


@torch.no_grad()
def greedy(model: LlamaForCausalLM, prompts: list[str], max_new: int) -> list[str]:
    """Greedy continuations of prompts that all have the same length (no padding needed)."""
    ids = torch.tensor([[BOS_ID, *encode(p)] for p in prompts], dtype=torch.long)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for _ in range(max_new):
        # No KV cache: sequences are ~25 tokens, and a full forward keeps this simple and exact.
        nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        done |= nxt == EOS_ID
        if bool(done.all()):
            break
    start = 1 + len(prompts[0])
    return [decode(row) if EOS_ID in row else "\x00" for row in ids[:, start:].tolist()]


def task_accuracy(model: LlamaForCausalLM, task: str, n: int, seed: int = 0) -> float:
    """Share of ``n`` held-out prompts of ``task`` answered exactly."""
    pairs = eval_examples(task, n, seed)
    by_len: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for prompt, answer in pairs:
        by_len[len(prompt)].append((prompt, answer))
    correct = 0
    for group in by_len.values():
        preds = greedy(model, [p for p, _ in group], TASKS[task].max_answer + 1)
        correct += sum(pred == ans for pred, (_, ans) in zip(preds, group, strict=True))
    return correct / len(pairs)


def evaluate(folder: str | Path, tasks: list[str], n: int = 100,
             seed: int = 0) -> dict[str, float]:
    """Accuracy per task of the model in ``folder``."""
    model = load_model(folder)
    return {t: task_accuracy(model, t, n, seed) for t in tasks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--tasks", default=",".join(TASK_NAMES))
    ap.add_argument("--n", type=int, default=100, help="held-out prompts per task")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (see README)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    check_tokenizer(args.model)
    print(json.dumps(evaluate(args.model, args.tasks.split(","), args.n), indent=1))


if __name__ == "__main__":
    main()
