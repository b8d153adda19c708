"""Synthetic verifiable task families: prompt + answer pairs scored by exact match.

Each family is a small generator `make(rng) -> (prompt, answer)` plus a label:

- `ltr` ("left-to-right dependent", the analogue of math and code): each answer character depends
  on the answer characters before it (a carry, a running sum). Parallel decoding of a block has to
  guess a dependency chain, so these are the families expected to lose most.
- `global` ("globally coherent"): each answer character is determined by the prompt alone (copy,
  reverse, sort, recall, memorised facts), so a block can be filled in any order.

Everything is deterministic given a `random.Random`: the same seed gives the same examples.
Answers are 3-14 characters, so that a 16-token block has several tokens to fill in parallel.
Addition writes its numbers least-significant digit first (operands and sum): the carry then flows
left to right through the answer, which is what makes the family `ltr`. Its prompt interleaves the
operands column by column (`A72B38C26` is 237 + 682), and its answer is a scratchpad that repeats
each column's two digits before their sum digit (`A729B381C269D0`: sum 919, final carry 0). Plain
sums sat on a parity-like plateau (a sum digit is independent of either operand digit alone, so
neither lookup gets gradient until both do); with the scratchpad, copying the digits is learnt
first, like `copy`, and each sum digit is then a function of the answer characters just before
it: the two digits it sums (inside the 4-token causal conv window of the Mamba layer) and the
previous column, a few characters earlier, which decides the carry. Addition and the running sum tag each digit with an
index letter ("A5B8C2"): Nemotron-H attention has no positional encoding, and the hints turn
"the i-th digit" into a content lookup, which a ~0.5 M-parameter model learns in a few minutes of
CPU training (addition alone: ~150 steps, in the default mixture 500-600; docs/data.md).

Run `python -m stages.data.tasks` to print a few examples of every family.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable, Literal

Kind = Literal["ltr", "global"]

LETTERS = string.ascii_lowercase
DIGITS = string.digits


@dataclass(frozen=True)
class TaskFamily:
    """One family of verifiable tasks."""

    name: str
    """Short name, used in metrics (`em/<name>`) and in `eval_examples.jsonl`'s `task`."""
    kind: Kind
    """`ltr` (answer characters depend on earlier answer characters) or `global`."""
    make: Callable[[random.Random], tuple[str, str]]
    """Draws one (prompt, answer) pair from the given generator."""
    description: str
    """One line for docs and `python -m stages.data.tasks`."""
    closed_book: bool = False
    """True when the answers are knowledge stored in the weights (a closed world of facts): the
    held-out split then asks the same facts as training, and eval prompts are not removed from it."""


def exact_match(prediction: str, answer: str) -> bool:
    """The score of every family: the generated answer equals the reference, ignoring only
    surrounding whitespace (a trailing newline or space is not an error of content)."""
    return prediction.strip() == answer.strip()


def _random_word(rng: random.Random, alphabet: str, lo: int, hi: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


INDEX = string.ascii_uppercase


def _indexed(digits: str) -> str:
    """Digits with index hints: "582" -> "A5B8C2". Nemotron-H attention has no positional
    encoding, so "the i-th digit" must be found by content; the hint letter makes that a lookup
    (index hints, as in the length-generalisation literature on transformer arithmetic)."""
    return "".join(INDEX[i] + d for i, d in enumerate(digits))


ADD_DIGITS = 3
"""Operand digits of `add` (the answer is 4 x ADD_DIGITS + 2 characters: at most 14)."""


def make_add(rng: random.Random) -> tuple[str, str]:
    """Two 3-digit numbers written column by column, least-significant column first, each column
    as its index letter and the two operand digits ("A72" = 7 and 2): 237 + 682 is
    `add A72B38C26=`. The answer is a scratchpad per column, the index letter, both digits again
    and the sum digit with the carry from the previous column, then the final carry:
    `A729B381C269D0` (sum digits 9, 1, 9 and carry 0: 919)."""
    lo, hi = 10 ** (ADD_DIGITS - 1), 10**ADD_DIGITS - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    # Least-significant digit first, so the carry flows left to right through the answer.
    da, db = str(a)[::-1], str(b)[::-1]
    carry, out = 0, []
    for i in range(ADD_DIGITS):
        total = int(da[i]) + int(db[i]) + carry
        carry = total // 10
        out.append(f"{INDEX[i]}{da[i]}{db[i]}{total % 10}")
    prompt = "add " + "".join(f"{INDEX[i]}{da[i]}{db[i]}" for i in range(ADD_DIGITS)) + "="
    return prompt, "".join(out) + f"{INDEX[ADD_DIGITS]}{carry}"


def make_scan(rng: random.Random) -> tuple[str, str]:
    digits = _random_word(rng, DIGITS, 5, 7)
    running, out = 0, []
    for d in digits:
        running = (running + int(d)) % 10
        out.append(str(running))
    return f"scan {_indexed(digits)}=", _indexed("".join(out))


def make_sort(rng: random.Random) -> tuple[str, str]:
    digits = _random_word(rng, DIGITS, 5, 8)
    return f"sort {digits}=", "".join(sorted(digits))


def make_copy(rng: random.Random) -> tuple[str, str]:
    word = _random_word(rng, LETTERS, 5, 8)
    return f"copy {word}=", word


def make_reverse(rng: random.Random) -> tuple[str, str]:
    word = _random_word(rng, LETTERS, 5, 8)
    return f"rev {word}=", word[::-1]


def make_recall(rng: random.Random) -> tuple[str, str]:
    keys = rng.sample(LETTERS, 4)
    values = ["".join(rng.choice(DIGITS) for _ in range(3)) for _ in keys]
    pairs = " ".join(f"{k}:{v}" for k, v in zip(keys, values))
    i = rng.randrange(len(keys))
    return f"kv {pairs} ?{keys[i]}=", values[i]


# A closed world of memorised facts: (country, capital, language). The family tests recall of
# knowledge stored in the weights, so its held-out split asks the same facts as training.
WORLD: tuple[tuple[str, str, str], ...] = (
    ("france", "paris", "french"), ("spain", "madrid", "spanish"), ("italy", "rome", "italian"),
    ("germany", "berlin", "german"), ("japan", "tokyo", "japanese"), ("china", "beijing", "chinese"),
    ("egypt", "cairo", "arabic"), ("peru", "lima", "spanish"), ("russia", "moscow", "russian"),
    ("greece", "athens", "greek"), ("poland", "warsaw", "polish"), ("kenya", "nairobi", "swahili"),
    ("norway", "oslo", "norwegian"), ("sweden", "stockholm", "swedish"), ("cuba", "havana", "spanish"),
    ("austria", "vienna", "german"), ("portugal", "lisbon", "portuguese"), ("ireland", "dublin", "irish"),
    ("turkey", "ankara", "turkish"), ("iran", "tehran", "persian"), ("india", "delhi", "hindi"),
    ("brazil", "brasilia", "portuguese"), ("chile", "santiago", "spanish"), ("finland", "helsinki", "finnish"),
)
FACT_TEMPLATES: tuple[tuple[str, int], ...] = (
    ("the capital of {0} is ", 1),
    ("{1} is the capital of ", 0),
    ("in {0} people speak ", 2),
)


def make_facts(rng: random.Random) -> tuple[str, str]:
    row = rng.choice(WORLD)
    template, answer_index = rng.choice(FACT_TEMPLATES)
    return template.format(*row), row[answer_index]


FAMILIES: dict[str, TaskFamily] = {
    f.name: f
    for f in (
        TaskFamily("add", "ltr", make_add,
                   "sum of two 3-digit numbers with carries: columns interleaved, least-significant first, "
                   "index hints, a scratchpad (each column's digits, then their sum digit)"),
        TaskFamily("scan", "ltr", make_scan, "running sum mod 10 of 5-7 digits, index hints"),
        TaskFamily("sort", "global", make_sort, "5-8 digits in ascending order"),
        TaskFamily("copy", "global", make_copy, "repeat a 5-8 letter word"),
        TaskFamily("reverse", "global", make_reverse, "a 5-8 letter word backwards"),
        TaskFamily("recall", "global", make_recall, "the 3-digit value of a key among 4 key:value pairs"),
        TaskFamily("facts", "global", make_facts, "templated English facts (capital, language) of 24 countries",
                   closed_book=True),
    )
}


def get_families(names: list[str] | tuple[str, ...]) -> list[TaskFamily]:
    """Look up families by name; an unknown name is a ValueError listing the valid ones."""
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ValueError(f"data.tasks: unknown task family {unknown}; valid: {sorted(FAMILIES)}")
    if not names:
        raise ValueError(f"data.tasks: empty list; choose from {sorted(FAMILIES)}")
    return [FAMILIES[n] for n in names]


def generate(names: list[str] | tuple[str, ...], n_per_family: int, seed: int) -> list[dict[str, str]]:
    """`n_per_family` rows `{"task", "kind", "prompt", "answer"}` per family, interleaved
    round-robin, deterministic in `seed` (each family has its own stream, so adding a family does
    not change the others' examples)."""
    families = get_families(names)
    streams = [random.Random(f"{seed}/{f.name}") for f in families]
    rows = []
    for _ in range(n_per_family):
        for fam, rng in zip(families, streams):
            prompt, answer = fam.make(rng)
            rows.append({"task": fam.name, "kind": fam.kind, "prompt": prompt, "answer": answer})
    return rows


if __name__ == "__main__":
    for row in generate(list(FAMILIES), 3, seed=0):
        print(f"{row['task']:8s} {row['kind']:6s} {row['prompt']!r:40s} -> {row['answer']!r}")
