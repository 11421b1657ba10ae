"""Synthetic character-level sequence tasks for the merge-quality testbed.

Every example is a prompt that names its task, e.g. ``add:12+34=``, and an answer, ``46``.
Prompts are split into train and held-out eval by a stable hash of the prompt text, so a
held-out prompt is never produced by the train generator, whatever the seed.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]
CHARS = "0123456789abcdefghijklmnopqrstuvwxyz+%:=()[]"
VOCAB: dict[str, int] = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
PAD_ID, BOS_ID, EOS_ID, UNK_ID = (VOCAB[t] for t in SPECIALS)
ID_TO_CHAR: dict[int, str] = {i: t for t, i in VOCAB.items() if t not in SPECIALS}

EVAL_BUCKETS = 10  # one prompt in ten is held out
LETTERS = "abcdefghijklmnopqrstuvwxyz"
# A fixed substitution cipher: a seeded permutation of the letters, same for every run.
_perm = list(LETTERS)
random.Random(20240613).shuffle(_perm)
CIPHER = dict(zip(LETTERS, _perm, strict=True))


def encode(text: str) -> list[int]:
    """Character ids of ``text`` (no specials)."""
    return [VOCAB[c] for c in text]


def decode(ids: list[int]) -> str:
    """Text of ``ids`` up to the first end-of-sequence token; other specials become "?"."""
    out = []
    for i in ids:
        if i == EOS_ID:
            break
        out.append(ID_TO_CHAR.get(i, "?"))  # "?" matches no answer
    return "".join(out)


def is_held_out(prompt: str) -> bool:
    """True when ``prompt`` belongs to the eval split (stable across runs and machines)."""
    return zlib.crc32(prompt.encode()) % EVAL_BUCKETS == 0


def _word(rng: random.Random, alphabet: str, lo: int, hi: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"add:{a}+{b}=", str(a + b)


def _rev(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, LETTERS, 3, 6)
    return f"rev:{w}=", w[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, "0123456789", 3, 7)
    return f"sort:{w}=", "".join(sorted(w))


def _ciph(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, LETTERS, 3, 6)
    return f"ciph:{w}=", "".join(CIPHER[c] for c in w)


def _cnt(rng: random.Random) -> tuple[str, str]:
    # The letter to count is named in the prompt, so the task needs a comparison, not a lookup.
    w = _word(rng, "abcde", 5, 14)
    c = rng.choice("abcde")
    return f"cnt:{c}:{w}=", str(w.count(c))


def _par(rng: random.Random) -> tuple[str, str]:
    # The answer is the running parity of the prefixes (its last digit is the parity of the whole
    # string): a bare parity bit is not learnable by a small model in minutes, this scratchpad is.
    w = _word(rng, "01", 4, 12)
    acc, out = 0, []
    for bit in w:
        acc ^= bit == "1"
        out.append(str(acc))
    return f"par:{w}=", "".join(out)


def _mod(rng: random.Random) -> tuple[str, str]:
    # (a + b) mod m: every (a + b, m) pair occurs in training, so a held-out (a, b, m) can be
    # answered by composing learnt steps; a bare "a % m" over unseen a is not learnable in minutes.
    a, b, m = rng.randint(0, 19), rng.randint(0, 19), rng.randint(2, 9)
    return f"mod:{a}+{b}%{m}=", str((a + b) % m)


_CLOSE = {")": "(", "]": "["}


def _balanced(s: str) -> bool:
    stack: list[str] = []
    for c in s:
        if c in _CLOSE:
            if not stack or stack.pop() != _CLOSE[c]:
                return False
        else:
            stack.append(c)
    return not stack


def _dyck(rng: random.Random, pairs: int) -> str:
    """A random balanced word of two bracket kinds: a shuffled word rotated to be balanced
    (cycle lemma), then a random kind for each matched pair."""
    s = list("(" * pairs + ")" * pairs)
    rng.shuffle(s)
    depth, low, cut = 0, 0, 0
    for i, c in enumerate(s):
        depth += 1 if c == "(" else -1
        if depth < low:
            low, cut = depth, i + 1
    s = s[cut:] + s[:cut]
    opened: list[int] = []
    for i, c in enumerate(s):
        if c == "(":
            opened.append(i)
        elif rng.random() < 0.5:
            s[opened.pop()], s[i] = "[", "]"
        else:
            opened.pop()
    return "".join(s)


def _brk(rng: random.Random) -> tuple[str, str]:
    # Half balanced, half near misses (one bracket replaced or two swapped): the answer cannot be
    # read off the length or the bracket counts alone.
    w = _dyck(rng, rng.randint(1, 6))
    if rng.random() < 0.5:
        chars = list(w)
        if rng.random() < 0.5 or len(chars) < 3:
            i = rng.randrange(len(chars))
            chars[i] = rng.choice([b for b in "()[]" if b != chars[i]])
        else:
            i, j = rng.sample(range(len(chars)), 2)
            chars[i], chars[j] = chars[j], chars[i]
        w = "".join(chars)
    return f"brk:{w}=", "y" if _balanced(w) else "n"


@dataclass(frozen=True)
class Task:
    """A named generator of (prompt, answer) pairs."""

    name: str
    make: Callable[[random.Random], tuple[str, str]]
    max_answer: int  # longest answer in characters, to bound greedy decoding


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("add", _add, 3),
        Task("rev", _rev, 6),
        Task("sort", _sort, 7),
        Task("ciph", _ciph, 6),
        Task("cnt", _cnt, 2),
        Task("par", _par, 12),
        Task("mod", _mod, 1),
        Task("brk", _brk, 1),
    )
}
TASK_NAMES: list[str] = list(TASKS)


def _task_seed(task: str, seed: int, split: str) -> int:
    return zlib.crc32(f"{task}/{split}/{seed}".encode())


def train_examples(task: str, n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` training pairs of ``task`` (repeats allowed), never a held-out prompt."""
    rng = random.Random(_task_seed(task, seed, "train"))
    out: list[tuple[str, str]] = []
    while len(out) < n:
        prompt, answer = TASKS[task].make(rng)
        if not is_held_out(prompt):
            out.append((prompt, answer))
    return out


def eval_examples(task: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` distinct held-out pairs of ``task``, in a fixed order for a given seed."""
    rng = random.Random(_task_seed(task, seed, "eval"))
    seen: dict[str, str] = {}
    for _ in range(n * 2000):  # bound the rejection sampling; the spaces are far larger
        prompt, answer = TASKS[task].make(rng)
        if is_held_out(prompt) and prompt not in seen:
            seen[prompt] = answer
            if len(seen) == n:
                return list(seen.items())
    raise ValueError(f"task {task}: only {len(seen)} distinct held-out prompts, {n} asked")
