"""Synthetic task families and the char tokenizer: determinism, labels, and each family's scorer."""
from __future__ import annotations

import random
import re

import pytest

from stages.data import tasks
from stages.data.tokenizer import SPECIAL_TOKENS, build_char_tokenizer


def _unindex(s: str) -> str:
    """"A5B8C2" -> "582" (and check the hint letters are A, B, C, ... in order)."""
    letters, digits = s[0::2], s[1::2]
    assert letters == tasks.INDEX[: len(letters)]
    return digits


def _add_operands(prompt: str) -> tuple[int, int]:
    """`add A72B38C26=` -> (237, 682): columns least-significant first, index letter + a digit + b digit."""
    m = re.fullmatch(r"add A(\d)(\d)B(\d)(\d)C(\d)(\d)=", prompt)
    assert m, prompt
    a0, b0, a1, b1, a2, b2 = map(int, m.groups())
    return a0 + 10 * a1 + 100 * a2, b0 + 10 * b1 + 100 * b2


def _add_answer_value(answer: str) -> int:
    """The sum an `add` answer states: `A729B381C269D0` -> sum digits 9, 1, 9 + final carry 0 -> 919."""
    m = re.fullmatch(r"A\d\d(\d)B\d\d(\d)C\d\d(\d)D([01])", answer)
    assert m, answer
    return sum(int(d) * 10**i for i, d in enumerate(m.groups()))


def _solve(task: str, prompt: str) -> str:
    """An independent solver per family, to check that generators write correct answers."""
    body = prompt.split(" ", 1)[1].rstrip("=")
    if task == "add":
        a, b = _add_operands(prompt)
        da, db, ds = str(a)[::-1], str(b)[::-1], str(a + b).zfill(4)[::-1]  # integer sum, LSB first
        return "".join(tasks.INDEX[i] + da[i] + db[i] + ds[i] for i in range(3)) + "D" + ds[3]
    if task == "scan":
        digits = _unindex(body)
        return tasks._indexed("".join(str(sum(map(int, digits[: i + 1])) % 10) for i in range(len(digits))))
    if task == "sort":
        return "".join(sorted(body))
    if task == "copy":
        return body
    if task == "reverse":
        return body[::-1]
    if task == "recall":
        pairs, key = body.split(" ?")
        return dict(p.split(":") for p in pairs.split())[key]
    if task == "facts":
        world = {w: row for row in tasks.WORLD for w in row}
        words = prompt.split()
        if prompt.startswith("the capital of"):
            return world[words[3]][1]
        if prompt.startswith("in "):
            return world[words[1]][2]
        return world[words[0]][0]
    raise AssertionError(task)


def test_generation_is_deterministic_and_seed_dependent():
    a = tasks.generate(list(tasks.FAMILIES), 20, seed=3)
    b = tasks.generate(list(tasks.FAMILIES), 20, seed=3)
    c = tasks.generate(list(tasks.FAMILIES), 20, seed=4)
    assert a == b
    assert a != c
    # each family has its own stream: dropping a family leaves the others' examples unchanged
    only_copy = tasks.generate(["copy"], 20, seed=3)
    assert only_copy == [r for r in a if r["task"] == "copy"]


@pytest.mark.parametrize("name", list(tasks.FAMILIES))
def test_every_family_answers_correctly_and_scores_by_exact_match(name):
    fam = tasks.FAMILIES[name]
    rng = random.Random(0)
    for _ in range(200):
        prompt, answer = fam.make(rng)
        assert _solve(name, prompt) == answer, (prompt, answer)
        assert tasks.exact_match(answer, answer)
        assert tasks.exact_match(answer + "\n", answer)
        wrong = answer[:-1] + ("0" if answer[-1] != "0" else "1")
        assert not tasks.exact_match(wrong, answer)
        assert not tasks.exact_match(answer[:-1], answer)
        assert 3 <= len(answer) <= 14
        assert re.fullmatch(r"[ -~]+", prompt + answer)  # printable ASCII: in the char vocabulary


def test_family_labels():
    kinds = {n: f.kind for n, f in tasks.FAMILIES.items()}
    assert {"add", "sort", "copy", "reverse", "recall", "facts"} <= set(kinds)
    assert kinds["add"] == "ltr" and kinds["scan"] == "ltr"
    assert all(kinds[n] == "global" for n in ("sort", "copy", "reverse", "recall", "facts"))


def test_unknown_family_is_a_clear_error():
    with pytest.raises(ValueError, match=r"data.tasks.*'mult'.*valid"):
        tasks.get_families(["copy", "mult"])


def test_char_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tok = build_char_tokenizer()
    tok.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id) == (0, 1, 2, 4)
    text = "add A1B2+A3=\tthe capital of peru is lima\n"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    # char-level: the encoding of prompt + answer is the prompt's encoding followed by the answer's
    assert tok("ab" + "cd").input_ids == tok("ab").input_ids + tok("cd", add_special_tokens=False).input_ids
    assert tok("é").input_ids == [tok.bos_token_id, tok.unk_token_id]


def test_add_states_the_sum_with_carries():
    """The `add` answer is the real sum: parsed back it equals a + b, for every column's carry case."""
    rng = random.Random(7)
    carried = [0, 0, 0]  # examples with a carry out of column A, B, C
    for _ in range(2000):
        prompt, answer = tasks.make_add(rng)
        a, b = _add_operands(prompt)
        assert 100 <= a <= 999 and 100 <= b <= 999
        assert _add_answer_value(answer) == a + b, (prompt, answer)
        for i in range(3):  # the scratchpad repeats each column's operand digits before its sum digit
            assert answer[4 * i : 4 * i + 3] == prompt[4 + 3 * i : 7 + 3 * i]
            carried[i] += (a % 10 ** (i + 1)) + (b % 10 ** (i + 1)) >= 10 ** (i + 1)
        assert len(prompt) == 14 and len(answer) == 14
    assert min(carried) > 500  # carries into B, into C and out of C are all exercised
    # a worked example: 964 + 494 = 1458, carries out of every column
    assert tasks.make_add(random.Random(0)) == ("add A44B69C94=", "A448B695C944D1")
    assert _add_operands("add A44B69C94=") == (964, 494) and _add_answer_value("A448B695C944D1") == 1458


def test_the_example_draws_from_the_pipelines_task_families():
    """One task generator in the project: examples/train_tiny_twotower.py samples `stages.data.tasks`
    and encodes with the pipeline's character tokenizer."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "train_tiny_twotower.py"
    spec = importlib.util.spec_from_file_location("train_tiny_twotower", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert not (path.parent / "tiny_tasks.py").exists()
    rows = example.sample(10, seed=3)
    assert [task for task, _, _ in rows] == list(example.TASKS) * 2
    assert set(example.TASKS) <= set(tasks.FAMILIES)
    tok = build_char_tokenizer()
    expected = tasks.generate(list(example.TASKS), 2, seed=3)
    for (task, prompt, answer), row in zip(rows, expected):
        assert task == row["task"] and answer[-1] == tok.eos_token_id
        assert prompt == tok(row["prompt"])["input_ids"]  # the pipeline tokenizer's ids, BOS first
        assert tasks.exact_match(tok.decode(answer[:-1]), row["answer"])
