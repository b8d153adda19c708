"""Generated, verifiable tasks and a character tokenizer for the tiny two-tower example.

Tasks (answers are checked by exact match): `add` (two 4-digit numbers, carries), `sort`
(8 digits), `copy` and `reverse` (8 letters), `fact` (templated facts about invented people:
"where <name>?" -> their fixed city, memorised in pretraining). Prompts fit in 16 tokens and
answers (with EOS) in 16, so block-aligned training rows are two blocks of 16.
"""
from __future__ import annotations

import random

PAD, BOS, EOS = 0, 1, 2
CHARS = "0123456789abcdefghijklmnopqrstuvwxyz+=:>?. "
VOCAB = 3 + len(CHARS)
TASKS = ("add", "sort", "copy", "reverse", "fact")

_rng = random.Random(1234)
_NAMES = ["".join(_rng.choice("bcdfghjklmnprstvz") + _rng.choice("aeiou") for _ in range(3)) for _ in range(16)]
_CITIES = ["".join(_rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(7)) for _ in range(16)]
FACTS = dict(zip(_NAMES, _CITIES))


def encode(text: str) -> list[int]:
    return [3 + CHARS.index(c) for c in text]


def decode(ids: list[int]) -> str:
    return "".join(CHARS[i - 3] for i in ids if i >= 3)


def make_example(task: str, rng: random.Random) -> tuple[str, str]:
    """(prompt text, answer text) for one random instance of `task`."""
    if task == "add":
        a, b = rng.randrange(10**3, 10**4), rng.randrange(10**3, 10**4)
        return f"{a}+{b}=", str(a + b)
    if task == "sort":
        digits = "".join(rng.choice("0123456789") for _ in range(8))
        return f"sort:{digits}>", "".join(sorted(digits))
    letters = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(8))
    if task == "copy":
        return f"copy:{letters}>", letters
    if task == "reverse":
        return f"rev:{letters}>", letters[::-1]
    name = rng.choice(_NAMES)
    return f"where {name}?", f"{FACTS[name]}."


def sample(n: int, seed: int, tasks=TASKS) -> list[tuple[str, list[int], list[int]]]:
    """n examples round-robin over tasks: (task, prompt ids with BOS, answer ids with EOS)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        prompt, answer = make_example(task, rng)
        out.append((task, [BOS] + encode(prompt), encode(answer) + [EOS]))
    return out
