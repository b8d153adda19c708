"""Token shards on disk: how `prepare_data` stores a split so that nothing holds the corpus in RAM.

A split is a directory of `.npy` shards plus an `index.json`:

    train_shards/
      index.json              {"format", "seq_len", "dtype", "vocab_size", "rows", "shards": [...]}
      tokens-00000.npy        [rows, seq_len] uint16 (vocabulary <= 65536) or uint32
      mask-00000.npy          [rows, seq_len] uint8 loss mask; absent when every token is scored

Why this layout: numpy `.npy` files open memory-mapped (`np.load(mmap_mode="r")`), so a reader
touches only the pages of the rows it samples, and the page cache is shared by every Ray Train
worker on a node instead of each worker holding its own int64 copy. uint16 ids are a quarter of
int64. Each shard's sha256 is in the index, so a truncated or swapped file is caught by `verify`.

`ShardWriter` buffers at most one shard (`shard_tokens` tokens) and writes the split into
`<dir>.partial/`, renamed to `<dir>` only when the index is complete: a crash never leaves a
directory that looks finished. `TokenShards` is the lazy reader.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from twotower.checksums import sha256_file

INDEX_FILE = "index.json"
FORMAT = "twotower-token-shards/1"
UINT16_VOCAB = 1 << 16
"""Vocabularies up to this size store ids as uint16, larger ones as uint32."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be > 0, got {vocab_size}")
    return np.dtype(np.uint16 if vocab_size <= UINT16_VOCAB else np.uint32)


def _save_npy(path: Path, array: np.ndarray) -> str:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    return sha256_file(path)


class ShardWriter:
    """Appends rows of `seq_len` ids (and their loss masks) and writes them as shards of about
    `shard_tokens` tokens; `close()` writes the index and publishes the directory atomically.

    Use as a context manager: an exception leaves only the `.partial` directory (removed)."""

    def __init__(self, out_dir: str | Path, seq_len: int, vocab_size: int, shard_tokens: int) -> None:
        if shard_tokens < 1:
            raise ValueError(f"data.shard_tokens ({shard_tokens}) must be >= 1")
        self.out_dir = Path(out_dir)
        self.partial = self.out_dir.with_name(self.out_dir.name + ".partial")
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        self.seq_len, self.vocab_size = seq_len, vocab_size
        self.dtype = token_dtype(vocab_size)
        self.rows_per_shard = max(1, shard_tokens // seq_len)
        self.ids = np.empty((self.rows_per_shard, seq_len), dtype=self.dtype)
        self.mask = np.empty((self.rows_per_shard, seq_len), dtype=np.uint8)
        self.fill = 0
        self.shards: list[dict[str, Any]] = []
        self.rows = 0
        self.loss_tokens = 0

    def add(self, ids: list[int] | np.ndarray, mask: list[int] | np.ndarray | None = None) -> None:
        """One row of exactly `seq_len` ids; `mask` None scores every token."""
        row = np.asarray(ids)
        if row.shape != (self.seq_len,):
            raise ValueError(f"data.seq_len: a row of shape {row.shape} is not ({self.seq_len},)")
        if row.size and (int(row.min()) < 0 or int(row.max()) >= self.vocab_size):
            raise ValueError(f"token id outside the vocabulary [0, {self.vocab_size}) in row {self.rows}")
        self.ids[self.fill] = row
        self.mask[self.fill] = 1 if mask is None else np.asarray(mask, dtype=np.uint8)
        self.loss_tokens += int(self.mask[self.fill].sum())
        self.fill += 1
        self.rows += 1
        if self.fill == self.rows_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self.fill:
            return
        k = len(self.shards)
        entry: dict[str, Any] = {"rows": self.fill, "tokens": f"tokens-{k:05d}.npy", "mask": None}
        entry["sha256"] = {"tokens": _save_npy(self.partial / entry["tokens"], self.ids[: self.fill])}
        mask = self.mask[: self.fill]
        if not mask.all():  # an all-ones mask is implied by its absence: plain text stores ids only
            entry["mask"] = f"mask-{k:05d}.npy"
            entry["sha256"]["mask"] = _save_npy(self.partial / entry["mask"], mask)
        self.shards.append(entry)
        self.fill = 0

    def close(self) -> dict[str, Any]:
        """Write the last shard and the index, then rename `<dir>.partial` to `<dir>` (replacing
        a previous one). Returns the index."""
        self._flush()
        index = {"format": FORMAT, "seq_len": self.seq_len, "dtype": self.dtype.name,
                 "vocab_size": self.vocab_size, "rows": self.rows, "loss_tokens": self.loss_tokens,
                 "shards": self.shards}
        tmp = self.partial / (INDEX_FILE + ".tmp")
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, self.partial / INDEX_FILE)
        old = self.out_dir.with_name(self.out_dir.name + ".old")
        if self.out_dir.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.out_dir, old)
        os.replace(self.partial, self.out_dir)
        if old.exists():
            shutil.rmtree(old)
        return index

    def abort(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def is_shard_dir(path: str | Path) -> bool:
    return (Path(path) / INDEX_FILE).is_file()


class TokenShards:
    """Lazy, memory-mapped reader of a shard directory: `len()`, `row(i)`, `batch(indices)`.

    Shards are opened on first use, so the object pickles cheaply to Ray workers (the memory maps
    are dropped from the pickled state and reopened there). Errors name `key_name`, the manifest
    key the path came from."""

    def __init__(self, path: str | Path, key_name: str = "token shards") -> None:
        self.path, self.key_name = Path(path), key_name
        index_path = self.path / INDEX_FILE
        if not index_path.is_file():
            raise ValueError(f"{key_name}: {self.path} has no {INDEX_FILE} (not a token-shard directory, "
                             f"or prepare_data did not finish)")
        self.index = json.loads(index_path.read_text())
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{key_name}: {index_path} has format {self.index.get('format')!r}, expected {FORMAT!r}")
        self.seq_len = int(self.index["seq_len"])
        counts = [int(s["rows"]) for s in self.index["shards"]]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if int(self.starts[-1]) != int(self.index["rows"]) or not counts:
            raise ValueError(f"{key_name}: {index_path} lists {int(self.starts[-1])} rows in "
                             f"{len(counts)} shards, expected {self.index['rows']} (> 0)")
        self._maps: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _shard(self, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        if k not in self._maps:
            entry = self.index["shards"][k]
            ids = np.load(self.path / entry["tokens"], mmap_mode="r")
            mask = np.load(self.path / entry["mask"], mmap_mode="r") if entry["mask"] else None
            if ids.shape != (entry["rows"], self.seq_len) or ids.dtype.name != self.index["dtype"]:
                raise ValueError(f"{self.key_name}: {self.path / entry['tokens']} is {ids.dtype}{list(ids.shape)}, "
                                 f"the index says {self.index['dtype']}[{entry['rows']}, {self.seq_len}]")
            self._maps[k] = (ids, mask)
        return self._maps[k]

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [seq_len], loss mask bool [seq_len]) of row `i`, copied out of the map."""
        if not 0 <= i < len(self):
            raise IndexError(f"{self.key_name}: row {i} of {len(self)}")
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        ids, mask = self._shard(k)
        j = i - int(self.starts[k])
        m = np.ones(self.seq_len, dtype=bool) if mask is None else mask[j].astype(bool)
        return ids[j].astype(np.int64), m

    def batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
        rows = [self.row(int(i)) for i in indices]
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

    def to_tensors(self) -> tuple[Any, Any]:
        """The whole split as (int64 ids, bool mask) tensors: only for splits known to be small
        (eval rows, the synthetic task corpus that `block_aligned` re-lays in memory)."""
        import torch

        ids, mask = self.batch(range(len(self)))
        return torch.from_numpy(ids), torch.from_numpy(mask)

    def verify(self) -> None:
        """Check every shard file against the sha256 in the index (reads the files once)."""
        for entry in self.index["shards"]:
            for kind in ("tokens", "mask"):
                if entry.get(kind):
                    got = sha256_file(self.path / entry[kind])
                    if got != entry["sha256"][kind]:
                        raise ValueError(f"{self.key_name}: {self.path / entry[kind]} has sha256 {got[:12]}…, "
                                         f"the index says {entry['sha256'][kind][:12]}…")
