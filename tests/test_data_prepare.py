"""prepare_data: the synthetic source end to end, the files source (jsonl, parquet, txt) and every
bad-input error (each must name the key, file or column)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from stages import prepare_data
from stages.api import StageContext
from stages.data.tokenizer import char_encoder, load_tokenizer
from stages.prepare_data import Config


def _ctx(tmp_path: Path, name: str = "out") -> StageContext:
    return StageContext(name="prepare_data", out_dir=tmp_path / name, work_dir=tmp_path / "work", run_dir=tmp_path)


def _small(**kw) -> Config:
    base = dict(train_examples_per_task=40, eval_examples_per_task=6, seq_len=64)
    base.update(kw)
    return Config(**base)


def _digest(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in d.rglob("*.*")}


def test_synthetic_manifest_files_and_determinism(tmp_path):
    from transformers import AutoTokenizer

    from stages.training.optimisation import load_tokens

    m = prepare_data.run(_small(), {}, _ctx(tmp_path, "a"))
    for key in ("tokenizer", "train_tokens", "eval_tokens", "eval_examples"):
        assert Path(m["artifacts"][key]).exists(), key
    assert m["seq_len"] == 64 and m["block_size"] == 16
    assert list(m["tasks"]) == list(prepare_data.DEFAULT_TASKS) and m["tasks"]["add"] == "ltr"
    tok = AutoTokenizer.from_pretrained(m["artifacts"]["tokenizer"])
    assert m["vocab_size"] == len(tok) and m["eos_token_id"] == tok.eos_token_id
    assert m["pad_token_id"] == tok.pad_token_id and m["mask_token_id"] == tok.mask_token_id

    ids, mask = load_tokens(m["artifacts"]["train_tokens"], "train_tokens")
    assert ids.dtype.is_floating_point is False and str(ids.dtype) == "torch.int64"
    assert ids.shape[1] == 64 and ids.shape == mask.shape and m["metrics"]["train_rows"] == ids.shape[0]
    # the mask covers exactly the answers and their EOS: decode masked spans back to answers
    row, row_mask = ids[0].tolist(), mask[0].tolist()
    spans, cur = [], []
    for t, k in zip(row, row_mask):
        if k:
            cur.append(t)
            if t == tok.eos_token_id:
                spans.append(tok.decode(cur[:-1]))
                cur = []
    assert spans, "no answer in the first row"
    assert all(s and "=" not in s for s in spans)
    assert mask[ids == tok.pad_token_id].sum() == 0

    rows = [json.loads(line) for line in open(m["artifacts"]["eval_examples"])]
    assert len(rows) == 6 * len(prepare_data.DEFAULT_TASKS)
    assert set(rows[0]) == {"task", "kind", "prompt", "answer"}
    # same seeds -> byte-identical files; another seed -> different data
    m2 = prepare_data.run(_small(), {}, _ctx(tmp_path, "b"))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    prepare_data.run(_small(seed=1), {}, _ctx(tmp_path, "c"))
    assert (_digest(tmp_path / "a")["train_shards/tokens-00000.npy"]
            != _digest(tmp_path / "c")["train_shards/tokens-00000.npy"])
    assert m2["artifacts"]["train_tokens"].startswith(str(tmp_path / "b"))


def test_eval_prompts_are_held_out_of_training():
    train, evals = prepare_data.synthetic_examples(_small(train_examples_per_task=300, eval_examples_per_task=50), 0)
    train_prompts = {r["prompt"] for r in train}
    leaked = [r for r in evals if r["prompt"] in train_prompts and r["task"] != "facts"]
    assert not leaked
    # facts are a closed book: training must teach the facts that evaluation asks
    assert any(r["prompt"] in train_prompts for r in evals if r["task"] == "facts")


def test_task_weights_set_each_family_share():
    cfg = _small(tasks=["copy", "add", "scan"], train_examples_per_task=100, task_weights={"add": 2.0, "scan": 0.5})
    train, _ = prepare_data.synthetic_examples(cfg, 0)
    counts = {t: sum(r["task"] == t for r in train) for t in cfg.tasks}
    assert counts == {"copy": 100, "add": 200, "scan": 50}
    assert [r["task"] for r in train[:30]] != sorted(r["task"] for r in train[:30])  # shuffled, not blocked
    with pytest.raises(ValueError, match=r"data.task_weights: unknown task family \['mul'\]"):
        prepare_data.validate(_small(task_weights={"mul": 1.0}))


def test_fast_char_encoding_equals_the_tokenizer():
    tok = load_tokenizer(None)
    encode = char_encoder(tok)
    for text in ["add A1B2+A3B4=A4B6", "the capital of peru is lima", "caf\u00e9\n\t~"]:
        assert encode(text) == tok(text).input_ids


def test_packing_keeps_examples_whole():
    ex = [([1, 5, 6, 2], [0, 0, 1, 1]), ([1, 7, 2], [0, 1, 1]), ([1, 8, 9, 9, 2], [0, 0, 0, 1, 1])]
    rows, masks = prepare_data.pack_examples(ex, 8, pad_id=0)
    assert rows == [[1, 5, 6, 2, 1, 7, 2, 0], [1, 8, 9, 9, 2, 0, 0, 0]]
    assert masks == [[0, 0, 1, 1, 0, 1, 1, 0], [0, 0, 0, 1, 1, 0, 0, 0]]
    with pytest.raises(ValueError, match="data.seq_len"):
        prepare_data.pack_examples([([1] * 9, [1] * 9)], 8, pad_id=0)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_files_source_jsonl_text(tmp_path):
    docs = [{"text": f"document number {i}: " + "the quick brown fox jumps over the lazy dog. " * 3} for i in range(40)]
    p = _write_jsonl(tmp_path / "docs.jsonl", docs)
    cfg = Config(source="files", paths=[str(p)], seq_len=32, eval_fraction=0.1, eval_prompt_tokens=16,
                 eval_answer_tokens=8)
    m = prepare_data.run(cfg, {}, _ctx(tmp_path))
    assert m["verifiable"] is False and m["tasks"] == {"text": "global"}
    rows = [json.loads(line) for line in open(m["artifacts"]["eval_examples"])]
    assert rows and len(rows[0]["prompt"]) == 15 and len(rows[0]["reference"]) == 8  # char tokens, <bos> dropped
    assert rows[0]["answer"] == ""  # not verifiable: scored by agreement with AR
    assert m["metrics"]["train_rows"] > 0 and m["metrics"]["eval_rows"] > 0


def test_files_source_parquet_pairs(tmp_path):
    import datasets

    rows = [{"question": f"{i}+{i}=", "solution": str(2 * i), "family": "double" if i % 2 else "twice"}
            for i in range(60)]
    p = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(p))
    cfg = Config(source="files", paths=[str(p)], prompt_column="question", answer_column="solution",
                 task_column="family", seq_len=32, eval_fraction=0.2, eval_examples_per_task=10)
    m = prepare_data.run(cfg, {}, _ctx(tmp_path))
    assert m["verifiable"] is True and set(m["tasks"]) <= {"double", "twice"}
    ev = [json.loads(line) for line in open(m["artifacts"]["eval_examples"])]
    assert len(ev) == 10 and all(int(e["answer"]) == 2 * int(e["prompt"].split("+")[0]) for e in ev)


def test_files_source_txt(tmp_path):
    p = tmp_path / "book.txt"
    p.write_text("".join(f"line {i} of a small book about tiny models and blocks.\n" for i in range(80)),
                 encoding="utf-8")
    cfg = Config(source="files", paths=[str(p)], seq_len=48, eval_prompt_tokens=20, eval_answer_tokens=10)
    m = prepare_data.run(cfg, {}, _ctx(tmp_path))
    assert m["metrics"]["train_rows"] > 0 and m["tasks"] == {"text": "global"}


# ---- bad input: every error names the key, file or column -----------------------------------


def test_seq_len_not_a_multiple_of_block_size(tmp_path):
    with pytest.raises(ValueError, match=r"data.seq_len \(100\).*data.block_size \(16\)"):
        prepare_data.run(Config(seq_len=100), {}, _ctx(tmp_path))


def test_empty_file(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("")
    with pytest.raises(ValueError, match=r"data.paths: .*empty.jsonl is empty"):
        prepare_data.run(Config(source="files", paths=[str(p)]), {}, _ctx(tmp_path))


def test_too_short_dataset(tmp_path):
    p = _write_jsonl(tmp_path / "tiny.jsonl", [{"text": "hi"}, {"text": "yo"}])
    with pytest.raises(ValueError, match=r"data.paths.*tiny.jsonl.*too short.*seq_len=64"):
        prepare_data.run(Config(source="files", paths=[str(p)], seq_len=64), {}, _ctx(tmp_path))


def test_missing_text_column(tmp_path):
    p = _write_jsonl(tmp_path / "cols.jsonl", [{"body": "some text"}] * 5)
    with pytest.raises(ValueError, match=r"data.text_column: column 'text' not found in .*cols.jsonl.*\['body'\]"):
        prepare_data.run(Config(source="files", paths=[str(p)]), {}, _ctx(tmp_path))


def test_missing_answer_column(tmp_path):
    p = _write_jsonl(tmp_path / "qa.jsonl", [{"q": "1+1=", "a": "2"}] * 5)
    with pytest.raises(ValueError, match=r"data.answer_column: column 'answer' not found in .*qa.jsonl"):
        prepare_data.run(Config(source="files", paths=[str(p)], prompt_column="q", answer_column="answer"),
                         {}, _ctx(tmp_path))


def test_non_utf8_file(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 20)
    with pytest.raises(ValueError, match=r"data.paths: .*latin1.txt is not UTF-8.*0xe9 at offset 3"):
        prepare_data.run(Config(source="files", paths=[str(p)]), {}, _ctx(tmp_path))


def test_missing_file_and_bad_extension(tmp_path):
    with pytest.raises(ValueError, match=r"data.paths: .*nope.jsonl does not exist"):
        prepare_data.run(Config(source="files", paths=[str(tmp_path / "nope.jsonl")]), {}, _ctx(tmp_path))
    p = tmp_path / "data.xml"
    p.write_text("<a/>")
    with pytest.raises(ValueError, match=r"data.paths: .*data.xml has an unsupported extension"):
        prepare_data.run(Config(source="files", paths=[str(p)]), {}, _ctx(tmp_path))


@pytest.mark.parametrize(
    ("cfg", "pattern"),
    [
        (Config(source="web"), r"data.source: 'web' is not one of"),
        (Config(source="files"), r"data.paths: the `files` source needs"),
        (Config(source="hf"), r"data.hf_name"),
        (Config(tasks=["copy", "chess"]), r"data.tasks: unknown task family \['chess'\]"),
        (Config(prompt_column="q"), r"data.prompt_column and data.answer_column"),
    ],
)
def test_config_errors_name_the_key(cfg, pattern):
    with pytest.raises(ValueError, match=pattern):
        prepare_data.validate(cfg)
