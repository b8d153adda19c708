"""Rows from outside the repository for `prepare_data`: local files (`data.source: files`) and hub
datasets (`data.source: hf`), read through HF `datasets`, with the checks that name the bad file,
extension, encoding or column before anything is tokenized; and the Python standard library's own
sources (`data.source: python_stdlib`, offline, `stages/data/code_corpus.py`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

Config = Any
"""`stages.prepare_data.Config` (the `data` section), named loosely: that stage imports this module."""

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
"""File extension -> the `datasets` builder that reads it."""
READ_CHUNK_BYTES = 1 << 20
"""Bytes of a JSON-lines / text file that `datasets` parses at once (its default is 10 MB): with
the Arrow table built from them, what reading a local corpus holds, whatever the file's size."""


def check_utf8(path: Path) -> None:
    """A clear error for a text file that is not UTF-8 (datasets' own error names no file)."""
    import codecs

    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:  # in chunks: a corpus file need not fit in memory
        for chunk in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"data.paths: {path} is not UTF-8 text (invalid byte 0x{err.object[err.start]:02x} at offset "
                    f"{offset + err.start}); re-encode it, e.g. `iconv -f latin1 -t utf-8`"
                ) from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ValueError(f"data.paths: {path} is not UTF-8 text (truncated sequence at its end); "
                             f"re-encode it, e.g. `iconv -f latin1 -t utf-8`") from None


def file_rows(path_str: str, cfg: Config, cache_dir: str | None) -> Iterator[dict[str, Any]]:
    """Rows of one local file (at most `max_documents`), read by `datasets` in streaming mode (in
    blocks, never the whole file, no Arrow copy in the cache), after the checks that name the bad
    file, extension, encoding or column."""
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
    is_txt = path.suffix.lower() == ".txt"
    if is_txt and cfg.prompt_column:
        raise ValueError(f"data.prompt_column: {path_str} is plain text and has no columns; use .jsonl or .parquet")
    try:
        chunks = {"chunksize": READ_CHUNK_BYTES} if fmt in ("json", "text") else {}
        rows = iter(datasets.load_dataset(fmt, data_files=str(path), split="train", streaming=True,
                                          cache_dir=cache_dir, **chunks))
        first = next(rows, None)
    except Exception as err:  # datasets wraps parser errors in its own types
        raise ValueError(f"data.paths: could not read {path} as {fmt}: {err}") from err
    if first is None:
        raise ValueError(f"data.paths: {path} has no rows")
    check_columns(str(path_str), list(first), cfg, is_txt)
    n, row = 0, first
    while row is not None and n < cfg.max_documents:
        n += 1
        if not is_txt:
            yield dict(row)
        elif row["text"].strip():
            yield {cfg.text_column: row["text"]}
        try:
            row = next(rows, None)
        except Exception as err:
            raise ValueError(f"data.paths: could not read {path} as {fmt} (after row {n}): {err}") from err


def check_columns(rows_source: str, columns: list[str], cfg: Config, is_txt: bool) -> None:
    needed = [cfg.prompt_column, cfg.answer_column] if cfg.prompt_column else [] if is_txt else [cfg.text_column]
    if cfg.task_column:
        needed.append(cfg.task_column)
    for col in needed:
        if col not in columns:
            key = {cfg.prompt_column: "prompt_column", cfg.answer_column: "answer_column",
                   cfg.task_column: "task_column"}.get(col, "text_column")
            raise ValueError(f"data.{key}: column {col!r} not found in {rows_source}; its columns are {columns}")


def iter_external_rows(cfg: Config, cache_dir: str | None) -> Iterator[dict[str, Any]]:
    """Rows from `files`, `hf` or `python_stdlib` one at a time, each source checked for the
    configured columns on its first row. Local files and the hub are both read by `datasets` in
    streaming mode, so a caller that does not keep the rows holds only the current one."""
    import datasets

    if cfg.source == "python_stdlib":
        from stages.data.code_corpus import stdlib_rows

        yield from stdlib_rows(cfg.max_documents, cfg.text_column)
        return
    if cfg.source == "hf":
        ds = datasets.load_dataset(cfg.hf_name, cfg.hf_config, split=cfg.hf_split, streaming=cfg.streaming)
        n = 0
        for n, r in enumerate(ds, 1):
            if n == 1:
                check_columns(f"hub dataset {cfg.hf_name!r}", list(r), cfg, is_txt=False)
            yield dict(r)
            if n >= cfg.max_documents:
                break
        if n == 0:
            raise ValueError(f"data.hf_name: {cfg.hf_name!r} split {cfg.hf_split!r} has no rows")
        return
    for p in cfg.paths:
        yield from file_rows(p, cfg, cache_dir)


def external_rows(cfg: Config, cache_dir: str | None) -> list[dict[str, Any]]:
    """All rows of `iter_external_rows` in a list (prompt/answer pairs, which are split in memory)."""
    return list(iter_external_rows(cfg, cache_dir))
