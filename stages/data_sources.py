"""Rows from outside the repository for `prepare_data`: local files (`data.source: files`) and hub
datasets (`data.source: hf`), read through HF `datasets`, with the checks that name the bad file,
extension, encoding or column before anything is tokenized; and the Python standard library's own
sources (`data.source: python_stdlib`, offline, `stages/code_corpus.py`).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stages.prepare_data import Config

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
"""File extension -> the `datasets` builder that reads it."""


def check_utf8(path: Path) -> None:
    """A clear error for a text file that is not UTF-8 (datasets' own error names no file)."""
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"data.paths: {path} is not UTF-8 text (invalid byte 0x{err.object[err.start]:02x} at offset "
            f"{err.start}); re-encode it, e.g. `iconv -f latin1 -t utf-8`"
        ) from None


def load_file_rows(path_str: str, cfg: Config, cache_dir: str | None) -> tuple[list[dict[str, Any]], list[str]]:
    """All rows of one local file (at most `max_documents`) and its column names."""
    import datasets

    path = Path(path_str).expanduser()
    if not path.is_file():
        raise ValueError(f"data.paths: {path} does not exist or is not a file")
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"data.paths: {path} has an unsupported extension; use one of {sorted(FILE_FORMATS)}")
    if fmt != "parquet":
        check_utf8(path)
    if path.stat().st_size == 0:
        raise ValueError(f"data.paths: {path} is empty")
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as err:  # datasets wraps parser errors in its own types
        raise ValueError(f"data.paths: could not read {path} as {fmt}: {err}") from err
    if len(ds) == 0:
        raise ValueError(f"data.paths: {path} has no rows")
    ds = ds.select(range(min(len(ds), cfg.max_documents)))
    return [dict(r) for r in ds], list(ds.column_names)


def load_hf_rows(cfg: Config) -> tuple[list[dict[str, Any]], list[str]]:
    """At most `max_documents` rows of a hub dataset (streamed by default; needs the network)."""
    import datasets

    ds = datasets.load_dataset(cfg.hf_name, cfg.hf_config, split=cfg.hf_split, streaming=cfg.streaming)
    rows = [dict(r) for _, r in zip(range(cfg.max_documents), ds)]
    if not rows:
        raise ValueError(f"data.hf_name: {cfg.hf_name!r} split {cfg.hf_split!r} has no rows")
    return rows, list(rows[0])


def check_columns(rows_source: str, columns: list[str], cfg: Config, is_txt: bool) -> None:
    needed = [cfg.prompt_column, cfg.answer_column] if cfg.prompt_column else [] if is_txt else [cfg.text_column]
    if cfg.task_column:
        needed.append(cfg.task_column)
    for col in needed:
        if col not in columns:
            key = {cfg.prompt_column: "prompt_column", cfg.answer_column: "answer_column",
                   cfg.task_column: "task_column"}.get(col, "text_column")
            raise ValueError(f"data.{key}: column {col!r} not found in {rows_source}; its columns are {columns}")


def external_rows(cfg: Config, cache_dir: str | None) -> list[dict[str, Any]]:
    """Rows from `files`, `hf` or `python_stdlib`, each checked for the configured columns."""
    if cfg.source == "python_stdlib":
        from stages.code_corpus import stdlib_rows

        return stdlib_rows(cfg.max_documents, cfg.text_column)
    if cfg.source == "hf":
        rows, cols = load_hf_rows(cfg)
        check_columns(f"hub dataset {cfg.hf_name!r}", cols, cfg, is_txt=False)
        return rows
    out: list[dict[str, Any]] = []
    for p in cfg.paths:
        rows, cols = load_file_rows(p, cfg, cache_dir)
        is_txt = Path(p).suffix.lower() == ".txt"
        if is_txt and cfg.prompt_column:
            raise ValueError(f"data.prompt_column: {p} is plain text and has no columns; use .jsonl or .parquet")
        check_columns(str(p), cols, cfg, is_txt)
        if is_txt:
            rows = [{cfg.text_column: r["text"]} for r in rows if r["text"].strip()]
        out.extend(rows)
    return out
