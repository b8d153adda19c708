"""Lightning checkpoints with a sha256 sidecar: a torn or bit-flipped checkpoint is never resumed from.

A resume trusts `work/<stage>/<key>/checkpoints/last.ckpt`. A crash mid-write, a full disk or a
flipped bit would otherwise surface as an unpickling error deep in Lightning, or worse, as weights
that load and are wrong. `ChecksummedCheckpointIO` writes each checkpoint to a temporary sibling,
renames it into place and then writes `<file>.sha256`; loading verifies it. `usable_checkpoint`
is the check before a fit: a checkpoint without a matching sidecar is moved aside to
`<file>.corrupt`, the stage is warned (naming the file) and training starts over, which is what
"only that stage is recomputed" means for a checkpoint.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Callable

from twotower.checksums import sha256_file

SIDECAR = ".sha256"


class CorruptCheckpointError(ValueError):
    """A checkpoint whose bytes do not match the sha256 written when it was saved."""


def sidecar(path: Path) -> Path:
    """`last.ckpt` -> `last.ckpt.sha256`."""
    return Path(str(path) + SIDECAR)


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` must not be resumed from (None: its sha256 matches its sidecar)."""
    path, side = Path(path), sidecar(path)
    if not side.is_file():
        return f"{path}: no {side.name} (written when a checkpoint is saved completely)"
    if sha256_file(path) != side.read_text().strip():
        return f"{path}: sha256 mismatch with {side.name} (the file is truncated or corrupt)"
    return None


def usable_checkpoint(path: Path, warn: Callable[[str], None]) -> Path | None:
    """`path` when it exists and verifies; else None, after moving a bad one aside and warning."""
    path = Path(path)
    if not path.exists():
        return None
    problem = checkpoint_problem(path)
    if problem is None:
        return path
    os.replace(path, path.with_name(path.name + ".corrupt"))
    sidecar(path).unlink(missing_ok=True)
    warn(f"corrupt checkpoint, training starts over: {problem}")
    return None


def make_checkpoint_io():
    """The Lightning plugin (imported lazily: Lightning takes seconds to import)."""
    from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

    class ChecksummedCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
            path = Path(path)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                super().save_checkpoint(checkpoint, tmp, storage_options)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            side = sidecar(path)
            side_tmp = side.with_name(f".{side.name}.{uuid.uuid4().hex[:8]}.tmp")
            side_tmp.write_text(sha256_file(path) + "\n")
            os.replace(side_tmp, side)

        def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
            problem = checkpoint_problem(Path(path))
            if problem is not None:
                raise CorruptCheckpointError(problem)
            kwargs = {} if map_location is None else {"map_location": map_location}
            return super().load_checkpoint(path, weights_only=weights_only, **kwargs)

        def remove_checkpoint(self, path) -> None:
            super().remove_checkpoint(path)
            sidecar(Path(path)).unlink(missing_ok=True)

    return ChecksummedCheckpointIO()
