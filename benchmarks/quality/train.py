"""Train a small Llama base on all tasks, then one expert per task, on the CPU.

Usage::

    python benchmarks/quality/train.py --out benchmarks/quality/work/models

writes ``base/`` and ``expert-<task>/`` (float32 safetensors, config.json, a character-level
tokenizer.json) and ``manifest.json`` (settings, seeds, per-model times and final losses).
The experts are deliberately heterogeneous (learning rates and step counts differ), since the
claim under test is about merging experts that spread apart.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tasks import BOS_ID, EOS_ID, PAD, PAD_ID, TASK_NAMES, UNK, VOCAB, encode, train_examples
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

IGNORE = -100


@dataclass
class TrainSettings:
    """Everything that determines the trained models (written to manifest.json)."""

    hidden: int = 128
    layers: int = 3
    heads: int = 4
    intermediate: int = 384
    batch: int = 64
    base_steps: int = 1000
    base_lr: float = 2e-3
    pool: int = 20000  # training pairs drawn per task (examples repeat across steps)
    seed: int = 0
    threads: int = 2
    # Share of each expert's fine-tuning examples drawn from the base's task mixture. Without
    # it a model this small forgets every other task and moves 10-30% of its weight norm, far
    # from the small, general-ability-keeping fine-tunes that people merge; merges of such
    # experts all scored below the base.
    replay: float = 0.25
    # (task, learning rate, steps) per expert: spread on purpose so task vectors differ in norm.
    experts: tuple[tuple[str, float, int], ...] = (
        ("add", 1e-3, 500),
        ("rev", 5e-4, 500),
        ("sort", 5e-4, 250),
        ("ciph", 3e-4, 400),
        ("cnt", 1e-3, 500),
        ("par", 1e-3, 400),
        ("mod", 1e-3, 800),
        ("brk", 3e-4, 200),
    )


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over the task vocabulary that transformers can load."""
    tok = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token=PAD, unk_token=UNK)


def build_model(s: TrainSettings) -> LlamaForCausalLM:
    """A freshly initialised Llama of the configured size (seeded by the caller)."""
    config = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=s.hidden, intermediate_size=s.intermediate,
        num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.heads,
        max_position_embeddings=64, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        pad_token_id=PAD_ID, tie_word_embeddings=False, torch_dtype="float32")
    return LlamaForCausalLM(config)


def encode_pairs(pairs: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """Token ids <bos> prompt answer <eos>, with the prompt length (its tokens are not scored)."""
    return [([BOS_ID, *encode(p), *encode(a), EOS_ID], 1 + len(p)) for p, a in pairs]


def collate(items: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
    """Right-padded batch; the loss covers the answer and <eos> only."""
    width = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(items):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, prompt_len: len(ids)] = torch.tensor(ids[prompt_len:])
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def train_loop(model: LlamaForCausalLM, pool: list[tuple[list[int], int]], steps: int,
               lr: float, batch: int, seed: int) -> float:
    """AdamW with linear warm-up and cosine decay; returns the mean loss of the last 50 steps."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + torch.cos(torch.tensor(torch.pi * (step - warmup) / steps)).item())

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    losses: list[float] = []
    for _ in range(steps):
        out = model(**collate(rng.choices(pool, k=batch)))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    model.eval()
    tail = losses[-50:]
    return sum(tail) / len(tail)


def save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    """An ordinary float32 Hugging Face folder: model.safetensors, config, tokenizer."""
    model.save_pretrained(folder)  # transformers 5 always writes safetensors
    tokenizer.save_pretrained(folder)


def train_all(out: Path, s: TrainSettings) -> dict:
    """Train the base and every expert into ``out``; returns (and writes) the manifest."""
    torch.set_num_threads(s.threads)
    tokenizer = build_tokenizer()
    t0 = time.perf_counter()
    torch.manual_seed(s.seed)
    model = build_model(s)
    mixture = [x for t in TASK_NAMES for x in encode_pairs(train_examples(t, s.pool, s.seed))]
    base_loss = train_loop(model, mixture, s.base_steps, s.base_lr, s.batch, s.seed)
    save(model, tokenizer, out / "base")
    base_s = time.perf_counter() - t0
    print(f"base: {s.base_steps} steps, loss {base_loss:.3f}, {base_s:.0f} s", flush=True)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    experts = []
    for i, (task, lr, steps) in enumerate(s.experts):
        t1 = time.perf_counter()
        model.load_state_dict(base_state)
        torch.manual_seed(s.seed + 1 + i)
        # A fresh draw of the task's data (seed + 1 + i), not the base's pool, plus replay.
        pool = encode_pairs(train_examples(task, s.pool, s.seed + 1 + i))
        replayed = round(len(pool) * s.replay / (1.0 - s.replay))
        pool += random.Random(s.seed + 1 + i).sample(mixture, replayed)
        loss = train_loop(model, pool, steps, lr, s.batch, s.seed + 1 + i)
        save(model, tokenizer, out / f"expert-{task}")
        secs = time.perf_counter() - t1
        print(f"expert-{task}: lr {lr:g}, {steps} steps, loss {loss:.3f}, {secs:.0f} s",
              flush=True)
        experts.append({"task": task, "lr": lr, "steps": steps, "final_loss": loss,
                        "seconds": secs, "path": f"expert-{task}"})
    manifest = {"settings": asdict(s), "base": {"final_loss": base_loss, "seconds": base_s},
                "experts": experts, "total_seconds": time.perf_counter() - t0,
                "torch": torch.__version__, "threads": torch.get_num_threads()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"training done in {manifest['total_seconds']:.0f} s", flush=True)
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "work" / "models")
    ap.add_argument("--base-steps", type=int, default=TrainSettings.base_steps)
    ap.add_argument("--seed", type=int, default=TrainSettings.seed)
    ap.add_argument("--threads", type=int, default=TrainSettings.threads)
    args = ap.parse_args()
    hf_logging.disable_progress_bar()
    s = TrainSettings(base_steps=args.base_steps, seed=args.seed, threads=args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    train_all(args.out, s)


if __name__ == "__main__":
    main()
