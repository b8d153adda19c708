"""Stage `prepare_data` (config section `data`): build the token files every later stage trains on.

Three sources, all through HF `datasets` except the built-in one:

- `synthetic` (default, offline, deterministic in `seed`): the verifiable task families of
  `stages/data/tasks.py`. Each example is `<bos> prompt answer <eos>`; examples are packed whole into
  rows of `seq_len` tokens (never split across rows) and the rest of a row is `<pad>`.
- `files`: local `.jsonl` / `.json` / `.parquet` / `.txt` files. With `prompt_column` and
  `answer_column` the rows are verifiable prompt/answer pairs and are packed like the synthetic
  ones; otherwise `text_column` holds documents, packed as one `<eos>`-separated token stream.
- `hf`: a hub dataset (`hf_name`, streaming allowed), treated like `files`. Needs the network.
- `python_stdlib` (offline): the Python standard library's own source files as plain-text code
  documents (`stages/data/code_corpus.py`), treated like `files` with a text column.

Outputs (see docs/architecture.md, "prepare_data manifest"): `tokenizer/` (the character-level
tokenizer of `stages/data/tokenizer.py` unless `tokenizer` names another), `train_shards/` and
`eval_shards/` (token shards, `stages/data/token_shards.py`: ids [N, seq_len] as uint16/uint32 plus a
loss mask marking answer tokens and their EOS, implied all-ones for plain text), and `eval_examples.jsonl` (rows
`{"task", "kind", "prompt", "answer"}`; for plain text `answer` is "" and `reference` holds the
document's continuation). The eval split is held out: a synthetic training example
whose prompt is also an eval prompt is dropped (except closed-book families such as `facts`).

Plain text streams with bounded memory (`stream_text`): documents are read one at a time,
tokenized `TOKENIZE_CHUNK` at a time, sent to the eval split by a seeded coin, packed and written
shard by shard. Synthetic and prompt/answer sources are built in memory (their size is set by the
config) and then written the same way.

Bad input raises `ValueError` naming the key, file or column before anything is trained.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from stages.api import Range, StageContext
from stages.data.data_sources import external_rows, iter_external_rows
from stages.data.tasks import FAMILIES, get_families
from stages.data.token_shards import ShardWriter
from stages.data.tokenizer import char_encoder, encode_pairs, load_tokenizer

SECTION = "data"
DEFAULT_TASKS = ("add", "sort", "copy", "reverse", "recall", "facts")
DEFAULT_WEIGHTS = {"add": 1.0, "sort": 1.5, "reverse": 2.0, "facts": 0.5}
SOURCES = ("synthetic", "files", "hf", "python_stdlib")


@dataclass
class Config:
    """The `data` section."""

    source: Literal["synthetic", "files", "hf", "python_stdlib"] = "synthetic"
    """Where examples come from: `synthetic` (built in, offline), `files` (local), `hf` (hub) or
    `python_stdlib` (the interpreter's own standard-library sources, offline)."""
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    """Synthetic task families to generate (names in `stages/data/tasks.py`; `scan` is also available)."""
    train_examples_per_task: Annotated[int, Range(1)] = 10000
    """Synthetic training examples per family (before removing eval prompts), times its weight."""
    task_weights: dict[str, Annotated[float, Range(0, low_open=True)]] = field(
        default_factory=lambda: dict(DEFAULT_WEIGHTS))
    """Relative share of training examples per family (1.0 when absent). The tiny backbone learns
    addition (with its scratchpad) and lookups (copy, recall) first, then reverse and sort: those
    get more examples, the memorised facts fewer, so that every family reaches the target within the
    same few minutes (docs/data.md)."""
    eval_examples_per_task: Annotated[int, Range(1)] = 100
    """Held-out examples per family (synthetic) or eval prompts in total (files / hf)."""
    seq_len: Annotated[int, Range(2)] = 128
    """Tokens per packed row; must be a multiple of `block_size`."""
    block_size: Annotated[int, Range(2)] = 16
    """The denoiser's block size B (keep equal to `twotower.block_size`)."""
    seed: Annotated[int, Range(0)] = 0
    """Data seed, added to the run seed: the same seeds give byte-identical token files."""
    paths: list[str] = field(default_factory=list)
    """`files` source: local .jsonl / .json / .parquet / .txt files."""
    text_column: str = "text"
    """`files` / `hf`: the column holding documents (plain-text files always use `text`)."""
    prompt_column: str | None = None
    """`files` / `hf`: a prompt column; with `answer_column` the rows are verifiable pairs."""
    answer_column: str | None = None
    """`files` / `hf`: the reference answer column (exact-match scored)."""
    task_column: str | None = None
    """`files` / `hf`: optional column naming each pair's task family (default: the source name)."""
    hf_name: str | None = None
    """`hf` source: the dataset's hub name."""
    hf_config: str | None = None
    """`hf` source: the dataset configuration (subset), if it has several."""
    hf_split: str = "train"
    """`hf` source: the split to read."""
    streaming: bool = True
    """`hf` source: stream instead of downloading the whole dataset."""
    max_documents: Annotated[int, Range(1)] = 20000
    """`files` / `hf`: read at most this many rows."""
    eval_fraction: Annotated[float, Range(0, 1, low_open=True, high_open=True)] = 0.05
    """`files` / `hf`: fraction of rows held out for evaluation."""
    eval_prompt_tokens: Annotated[int, Range(1)] = 48
    """Plain text: tokens of a held-out document used as an eval prompt."""
    eval_answer_tokens: Annotated[int, Range(1)] = 32
    """Plain text: tokens after the prompt used as the reference continuation."""
    tokenizer: str | None = None
    """A tokenizer name or directory for `AutoTokenizer`, or a GGUF file (a path or
    `package:MODULE/FILE`, as `backbone.gguf_file`) whose embedded tokenizer is used; None builds
    the offline char tokenizer."""
    shard_tokens: Annotated[int, Range(1)] = 1 << 24
    """Tokens per on-disk shard of a split (`stages/data/token_shards.py`): prepare_data holds at most
    one shard in memory while writing (16 M uint16 ids = 32 MiB by default)."""


def validate(cfg: Config) -> None:
    """Config-only checks (no file is read): a ValueError naming the bad key."""
    if cfg.source not in SOURCES:
        raise ValueError(f"data.source: {cfg.source!r} is not one of {list(SOURCES)}")
    if cfg.block_size <= 0 or cfg.seq_len <= 0:
        raise ValueError(f"data.seq_len ({cfg.seq_len}) and data.block_size ({cfg.block_size}) must be > 0")
    if cfg.seq_len % cfg.block_size:
        raise ValueError(
            f"data.seq_len ({cfg.seq_len}) is not a multiple of data.block_size ({cfg.block_size}): "
            f"the denoiser splits every row into whole blocks; try seq_len="
            f"{(cfg.seq_len // cfg.block_size + 1) * cfg.block_size}"
        )
    if cfg.source == "synthetic":
        get_families(cfg.tasks)
        unknown = sorted(set(cfg.task_weights) - set(FAMILIES))
        if unknown:
            raise ValueError(f"data.task_weights: unknown task family {unknown}; valid: {sorted(FAMILIES)}")
        if any(w <= 0 for w in cfg.task_weights.values()):
            raise ValueError(f"data.task_weights: weights must be > 0, got {dict(cfg.task_weights)}")
        if cfg.train_examples_per_task <= 0 or cfg.eval_examples_per_task <= 0:
            raise ValueError("data.train_examples_per_task and data.eval_examples_per_task must be > 0")
    if cfg.source == "python_stdlib" and cfg.prompt_column:
        raise ValueError("data.prompt_column: the python_stdlib source is plain code with no prompt/answer columns")
    if cfg.source == "files" and not cfg.paths:
        raise ValueError("data.paths: the `files` source needs at least one file")
    if cfg.source == "hf" and not cfg.hf_name:
        raise ValueError("data.hf_name: the `hf` source needs a dataset name")
    if (cfg.prompt_column is None) != (cfg.answer_column is None):
        raise ValueError("data.prompt_column and data.answer_column must be given together")
    if not 0.0 < cfg.eval_fraction < 1.0:
        raise ValueError(f"data.eval_fraction ({cfg.eval_fraction}) must be in (0, 1)")


# ----------------------------------------------------------------------------------------------
# Tokenizer and packing


def pack_examples(
    examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy packing of whole examples into rows of `seq_len` (an example never straddles two
    rows; the tail of a row is padding with mask 0). Examples longer than a row are an error."""
    rows, masks, cur, cur_m = [], [], [], []
    for ids, m in examples:
        if len(ids) > seq_len:
            raise ValueError(f"data.seq_len ({seq_len}) is shorter than an example of {len(ids)} tokens")
        if len(cur) + len(ids) > seq_len:
            rows.append(cur + [pad_id] * (seq_len - len(cur)))
            masks.append(cur_m + [0] * (seq_len - len(cur_m)))
            cur, cur_m = [], []
        cur, cur_m = cur + ids, cur_m + m
    if cur:
        rows.append(cur + [pad_id] * (seq_len - len(cur)))
        masks.append(cur_m + [0] * (seq_len - len(cur_m)))
    return rows, masks


# ----------------------------------------------------------------------------------------------
# Sources


def synthetic_examples(cfg: Config, seed: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train rows, eval rows) of the synthetic families; eval prompts are removed from training
    except for closed-book families, whose eval asks the facts that training taught."""
    from stages.data import tasks

    eval_rows = tasks.generate(cfg.tasks, cfg.eval_examples_per_task, seed=seed * 1000 + 1)
    train_rows = []
    for name in cfg.tasks:  # each family has its own stream: generating them apart changes nothing
        n = max(1, round(cfg.train_examples_per_task * cfg.task_weights.get(name, 1.0)))
        train_rows += tasks.generate([name], n, seed=seed * 1000 + 2)
    random.Random(seed * 1000 + 3).shuffle(train_rows)
    held_out = {r["prompt"] for r in eval_rows if not FAMILIES[r["task"]].closed_book}
    return [r for r in train_rows if r["prompt"] not in held_out], eval_rows


# ----------------------------------------------------------------------------------------------
# Building the splits


def pair_splits(rows: list[dict[str, Any]], cfg: Config, default_task: str, seed: int) -> tuple[list, list]:
    """(train, eval) example dicts from verifiable prompt/answer rows."""
    examples = [
        {"task": str(r[cfg.task_column]) if cfg.task_column else default_task, "kind": "global",
         "prompt": str(r[cfg.prompt_column]), "answer": str(r[cfg.answer_column])}
        for r in rows
    ]
    random.Random(seed).shuffle(examples)
    n_eval = min(cfg.eval_examples_per_task, max(1, int(len(examples) * cfg.eval_fraction)))
    return examples[n_eval:], examples[:n_eval]


def text_eval_examples(docs: list[list[int]], tok: Any, cfg: Config) -> list[dict[str, str]]:
    """Prompts cut from held-out documents; not verifiable (`answer` is ""), the document's next
    `eval_answer_tokens` are kept as `reference`."""
    need = cfg.eval_prompt_tokens + cfg.eval_answer_tokens
    out = []
    for d in docs:
        if len(d) - 1 >= need:  # d ends in EOS
            body = d[: need]
            # answer "" marks the row as not verifiable (scored by agreement with AR greedy);
            # the document's own continuation is kept as `reference`.
            out.append({
                "task": "text", "kind": "global",
                "prompt": tok.decode(body[: cfg.eval_prompt_tokens], skip_special_tokens=True),
                "answer": "",
                "reference": tok.decode(body[cfg.eval_prompt_tokens :], skip_special_tokens=True),
            })
        if len(out) >= cfg.eval_examples_per_task:
            break
    return out


TOKENIZE_CHUNK = 256
"""Documents tokenized per tokenizer call when streaming plain text (bounds what is held at once)."""


class RowPacker:
    """Documents (each ending in EOS) concatenated and cut into rows of `seq_len`, streaming: it holds
    less than one row; the tail shorter than a row is dropped."""

    def __init__(self, seq_len: int) -> None:
        self.seq_len, self.carry = seq_len, []

    def add(self, doc: list[int]) -> list[list[int]]:
        self.carry += doc
        n = len(self.carry) // self.seq_len * self.seq_len
        rows = [self.carry[i: i + self.seq_len] for i in range(0, n, self.seq_len)]
        self.carry = self.carry[n:]
        return rows


def build(cfg: Config, seed: int, cache_dir: str | None = None) -> dict[str, Any]:
    """Tokenizer, packed rows and masks, eval examples and task kinds of the sources that fit in
    memory by construction (synthetic families, prompt/answer pairs); plain text streams instead
    (`stream_text`)."""
    validate(cfg)
    tok = load_tokenizer(cfg.tokenizer)
    source_name = "synthetic" if cfg.source == "synthetic" else cfg.source
    if cfg.source == "synthetic":
        train_ex, eval_ex = synthetic_examples(cfg, seed)
    elif cfg.prompt_column:
        train_ex, eval_ex = pair_splits(external_rows(cfg, cache_dir), cfg, source_name, seed)
    else:
        raise ValueError("data.prompt_column: plain-text sources stream through `stream_text`, not `build`")
    train_rows, train_mask = pack_examples(encode_pairs(tok, [(e["prompt"], e["answer"]) for e in train_ex]),
                                           cfg.seq_len, tok.pad_token_id)
    eval_rows, eval_mask = pack_examples(encode_pairs(tok, [(e["prompt"], e["answer"]) for e in eval_ex]),
                                         cfg.seq_len, tok.pad_token_id)
    check_not_empty(cfg, len(train_rows), len(eval_rows), len(eval_ex))
    kinds = {e["task"]: e["kind"] for e in eval_ex}
    return {"tokenizer": tok, "train": (train_rows, train_mask), "eval": (eval_rows, eval_mask),
            "eval_examples": eval_ex, "tasks": kinds, "verifiable": True}


def check_not_empty(cfg: Config, train_rows: int, eval_rows: int, eval_examples: int) -> None:
    where = (f"data.paths {cfg.paths}" if cfg.source == "files"
             else f"data.{'hf_name' if cfg.source == 'hf' else 'source'}")
    if not train_rows or not eval_rows or not eval_examples:
        raise ValueError(
            f"{where}: dataset too short for data.seq_len={cfg.seq_len}: got {train_rows} training rows, "
            f"{eval_rows} eval rows and {eval_examples} eval prompts; need at least one of each "
            f"(add data, lower data.seq_len or raise data.eval_fraction)"
        )


def stream_text(cfg: Config, tok: Any, seed: int, cache_dir: str | None, train: Any, evals: Any) -> list[dict]:
    """Plain-text documents from the source, one chunk of `TOKENIZE_CHUNK` at a time, each sent
    to the eval split with probability `eval_fraction` (seeded; the first document always, so a
    small corpus has one), packed as an `<eos>`-separated stream into rows written to the shard
    writers `train` / `evals`. Memory: one chunk, one partial row per split, one shard buffer.
    Returns the eval prompts cut from held-out documents."""
    encode = char_encoder(tok)
    rng = random.Random(seed)
    packers = {"train": RowPacker(cfg.seq_len), "eval": RowPacker(cfg.seq_len)}
    writers = {"train": train, "eval": evals}
    eval_ex: list[dict] = []
    chunk: list[str] = []
    n_docs = 0

    def flush() -> None:
        nonlocal n_docs
        ids_list = [encode(t) for t in chunk] if encode is not None else tok(chunk).input_ids
        for ids in ids_list:
            doc = list(ids) + [tok.eos_token_id]
            split = "eval" if n_docs == 0 or rng.random() < cfg.eval_fraction else "train"
            n_docs += 1
            for row in packers[split].add(doc):
                writers[split].add(row)
            if split == "eval" and len(eval_ex) < cfg.eval_examples_per_task:
                eval_ex.extend(text_eval_examples([doc], tok, cfg))
        chunk.clear()

    for row in iter_external_rows(cfg, cache_dir):
        text = str(row[cfg.text_column])
        if text.strip():
            chunk.append(text)
            if len(chunk) == TOKENIZE_CHUNK:
                flush()
    if chunk:
        flush()
    return eval_ex


def write_split(path: Path, rows: list[list[int]], mask: list[list[int]], seq_len: int, vocab_size: int,
                shard_tokens: int) -> dict[str, Any]:
    """In-memory rows -> a token-shard directory (the synthetic and pair sources)."""
    with ShardWriter(path, seq_len, vocab_size, shard_tokens) as writer:
        for r, m in zip(rows, mask):
            writer.add(r, m)
    return json.loads((path / "index.json").read_text())


def run(cfg: Config, inputs: dict[str, dict], ctx: StageContext) -> dict:
    """Build and write the splits as token shards; return the manifest of docs/architecture.md."""
    validate(cfg)
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = str(Path(ctx.work_dir) / "hf_datasets")
    seed = cfg.seed + ctx.seed
    if cfg.source == "synthetic" or cfg.prompt_column:
        built = build(cfg, seed=seed, cache_dir=cache_dir)
        tok, eval_ex, kinds, verifiable = built["tokenizer"], built["eval_examples"], built["tasks"], True
        train_index = write_split(out / "train_shards", *built["train"], cfg.seq_len, len(tok), cfg.shard_tokens)
        eval_index = write_split(out / "eval_shards", *built["eval"], cfg.seq_len, len(tok), cfg.shard_tokens)
    else:
        tok = load_tokenizer(cfg.tokenizer)
        with ShardWriter(out / "train_shards", cfg.seq_len, len(tok), cfg.shard_tokens) as train, \
                ShardWriter(out / "eval_shards", cfg.seq_len, len(tok), cfg.shard_tokens) as evals:
            eval_ex = stream_text(cfg, tok, seed, cache_dir, train, evals)
            check_not_empty(cfg, train.rows, evals.rows, len(eval_ex))
        train_index = json.loads((out / "train_shards" / "index.json").read_text())
        eval_index = json.loads((out / "eval_shards" / "index.json").read_text())
        kinds, verifiable = {"text": "global"}, False
    tok.save_pretrained(str(out / "tokenizer"))
    with open(out / "eval_examples.jsonl", "w", encoding="utf-8") as f:
        for e in eval_ex:
            f.write(json.dumps(e, ensure_ascii=False) + "\n")
    metrics = {
        "train_rows": train_index["rows"],
        "eval_rows": eval_index["rows"],
        "eval_examples": len(eval_ex),
        "train_tokens": train_index["rows"] * cfg.seq_len,
        "train_loss_tokens": train_index["loss_tokens"],
        "train_shards": len(train_index["shards"]),
    }
    ctx.log_metrics(metrics)
    return {
        "metrics": metrics,
        "artifacts": {
            "tokenizer": ctx.artifact_path("tokenizer"),
            "train_tokens": ctx.artifact_path("train_shards"),
            "eval_tokens": ctx.artifact_path("eval_shards"),
            "eval_examples": ctx.artifact_path("eval_examples.jsonl"),
        },
        "source": cfg.source,
        "seq_len": cfg.seq_len,
        "block_size": cfg.block_size,
        "vocab_size": len(tok),
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "mask_token_id": tok.mask_token_id,
        "tasks": kinds,
        "verifiable": verifiable,
    }
