"""`data.source: python_stdlib`: the standard library's own definitions as an offline code corpus."""
from __future__ import annotations

import json

import pytest
from gguf_fixtures import tiny_llama, write_llama_gguf

from stages import prepare_data
from stages.api import StageContext
from stages.data import code_corpus
from stages.prepare_data import Config, validate
from stages.training.optimisation import load_tokens

MODULE = '''"""A module docstring."""
import os

X = 1


@decorator
def first(a, b):
    return a + b


class Second:
    def method(self):
        return 2
'''


def test_definitions_are_the_top_level_functions_and_classes_with_decorators():
    defs = code_corpus.definitions(MODULE)
    assert defs == ["@decorator\ndef first(a, b):\n    return a + b\n",
                    "class Second:\n    def method(self):\n        return 2\n"]
    assert code_corpus.definitions("def broken(:\n") == []


def test_stdlib_rows_are_real_definitions_in_a_fixed_order():
    rows = code_corpus.stdlib_rows(40)
    assert len(rows) == 40 and rows == code_corpus.stdlib_rows(40)
    assert all(r["text"].lstrip().startswith(("def ", "class ", "@", "async def ")) for r in rows)
    assert all(len(r["text"]) >= 200 and r["path"].endswith(".py") for r in rows)
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)


def test_prepare_data_packs_stdlib_code_into_whole_blocks_with_completion_prompts(tmp_path):
    gguf = write_llama_gguf(tiny_llama(), tmp_path / "tiny.gguf")
    cfg = Config(source="python_stdlib", tokenizer=str(gguf), seq_len=64, block_size=16, max_documents=60,
                 eval_fraction=0.2, eval_examples_per_task=5, eval_prompt_tokens=24, eval_answer_tokens=8)
    m = prepare_data.run(cfg, {}, StageContext(name="prepare_data", out_dir=tmp_path / "out",
                                               work_dir=tmp_path / "work", run_dir=tmp_path))
    train_rows, train_mask = load_tokens(m["artifacts"]["train_tokens"], "train_tokens")
    assert len(train_rows) and train_rows.shape[1] == 64 and bool(train_mask.all())
    evals = [json.loads(line) for line in open(m["artifacts"]["eval_examples"])]
    assert not m["verifiable"] and len(evals) == 5
    for e in evals:
        assert e["prompt"].lstrip().startswith(("def ", "class ", "@", "async def ")) and e["reference"]
        assert e["answer"] == ""  # scored by agreement with the backbone's own greedy continuation


def test_python_stdlib_takes_no_prompt_column():
    with pytest.raises(ValueError, match="data.prompt_column"):
        validate(Config(source="python_stdlib", prompt_column="p", answer_column="a"))
