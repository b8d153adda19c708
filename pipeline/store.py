"""The content-addressed artifact store under `run.root`, and atomic file writes.

Layout (all under `run.root`):

    cache/<stage>/<key>/            a complete artifact: the stage's files, manifest.json, _COMPLETE.json
    cache/<stage>/.tmp-<key>-<id>/  being written (ctx.out_dir); renamed to <key>/ only on success
    work/<stage>/<key>/             persistent scratch (training checkpoints survive a crash)

An artifact is complete only after the rename, and `_COMPLETE.json` (written last, inside the
temporary directory) lists every file's size and sha256: a crash, even `kill -9`, never leaves a
directory that looks complete. A lookup re-hashes a file whose stat (size, mtime, inode) differs
from the one recorded in `_VERIFIED.json` when it was last hashed, so a truncated or bit-flipped
file is caught while an unchanged cache costs one stat per file; `verify_checksums` re-hashes all.
A damaged artifact is a miss (its stage is recomputed) and `damage[(stage, key)]` names the file.
`cache_key` hashes the stage's name, code version, resolved config section, the run seed and the
upstream stages' keys, so a re-run in a new run directory reuses work.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from twotower.checksums import sha256_file

MARKER = "_COMPLETE.json"
MANIFEST = "manifest.json"
VERIFIED = "_VERIFIED.json"
"""Per artifact: the stat of each file when its sha256 was last found to match the marker."""


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary sibling and a rename (readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    """`write_atomic` of `obj` as indented JSON."""
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def cache_key(name: str, code_version: str, config: dict[str, Any], upstream: dict[str, str],
              seed: int) -> str:
    """sha256 over everything that determines a stage's output (upstream *keys*, not contents)."""
    payload = {"stage": name, "code": code_version, "config": config, "seed": seed,
               "upstream": dict(sorted(upstream.items()))}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in (MARKER, VERIFIED))


def stat_sig(path: Path) -> list[int]:
    """What a rewrite of a file changes: size, mtime (ns), inode."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def verified_stats(directory: Path) -> dict[str, list[int]]:
    """The `_VERIFIED.json` memo of an artifact directory (empty when absent or unreadable)."""
    try:
        return dict(json.loads((directory / VERIFIED).read_text()))
    except (OSError, ValueError, TypeError):
        return {}


class ArtifactStore:
    """Paths, lookup and atomic commit of stage artifacts under one root."""

    def __init__(self, root: str | Path, verify_checksums: bool = False):
        self.root = Path(root).resolve()
        self.verify_checksums = verify_checksums
        self.damage: dict[tuple[str, str], str] = {}
        """(stage, key) -> why its artifact was refused ("<file>: sha256 mismatch", ...)."""

    def final_dir(self, stage: str, key: str) -> Path:
        """Where the complete artifact of `stage` with `key` lives."""
        return self.root / "cache" / stage / key

    def work_dir(self, stage: str, key: str) -> Path:
        """Persistent scratch for `stage` with `key` (checkpoints to resume from)."""
        return self.root / "work" / stage / key

    def new_tmp_dir(self, stage: str, key: str) -> Path:
        """A fresh temporary directory beside the final one (stale ones of this key are removed)."""
        parent = self.root / "cache" / stage
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob(f".tmp-{key}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        return parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"

    def lookup(self, stage: str, key: str) -> dict[str, Any] | None:
        """The manifest of a complete, intact artifact, else None (a damaged one: see `damage`)."""
        final = self.final_dir(stage, key)
        self.damage.pop((stage, key), None)
        try:
            marker = json.loads((final / MARKER).read_text())
            manifest = json.loads((final / MANIFEST).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            self.damage[(stage, key)] = f"{final}: unreadable marker or manifest ({err})"
            return None
        if marker.get("key") != key:
            return None
        memo = {} if self.verify_checksums else verified_stats(final)
        fresh: dict[str, list[int]] = {}
        for rel, info in marker.get("files", {}).items():
            path = final / rel
            if not path.is_file():
                self.damage[(stage, key)] = f"{path}: missing"
                return None
            sig = stat_sig(path)
            if sig[0] != info["size"]:
                self.damage[(stage, key)] = f"{path}: size {sig[0]} bytes, recorded {info['size']}"
                return None
            if memo.get(rel) != sig:
                if sha256_file(path) != info["sha256"]:
                    self.damage[(stage, key)] = f"{path}: sha256 mismatch (the file is corrupt)"
                    return None
                fresh[rel] = sig
        if fresh:
            try:
                write_json_atomic(final / VERIFIED, {**verified_stats(final), **fresh})
            except OSError:
                pass  # a read-only cache still verifies, it only re-hashes next time
        return manifest

    def commit(self, tmp: Path, final: Path, stage: str, key: str, manifest: dict[str, Any]) -> None:
        """Write the manifest and the completion marker into `tmp`, then rename it to `final`."""
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        files = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
                 for p in _files(tmp)}
        write_json_atomic(tmp / VERIFIED, {rel: stat_sig(tmp / rel) for rel in files})
        write_json_atomic(tmp / MARKER, {"stage": stage, "key": key, "files": files})
        old = None
        if final.exists():  # a forced rerun replaces the previous artifact
            old = final.with_name(f".old-{key}-{uuid.uuid4().hex[:8]}")
            os.rename(final, old)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
