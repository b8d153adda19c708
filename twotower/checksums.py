"""Streaming sha256 of a file and of a directory tree: the one implementation the whole project
shares (the artifact store's integrity records, checkpoint sidecars, token shards, backbone keys).

Why it lives in the runtime package: it is the lowest layer every other package imports (imports
point down: pipeline -> planning / stages -> twotower -> adapters), and a stage's cache key is the
closure of the project modules it imports (`pipeline/codeversion.py`), so importing this leaf adds
exactly this file to a stage's key, and nothing it does not run.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20
"""Bytes read at a time: memory stays flat on multi-GB checkpoints."""


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def directory_digest(path: str | Path) -> str:
    """sha256 over every file's relative name and bytes, in sorted order: equal contents, equal digest."""
    path = Path(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()
