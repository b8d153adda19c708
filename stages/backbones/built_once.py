"""A directory built once under a cache root, atomically: the shared way backbones are materialised.

Converted GGUF checkpoints (stages/backbones/backbone_source.py) and random-init backbones
(stages/backbones/random_backbone.py) are both written into a temporary sibling directory, completed by a
marker file, and renamed into place. A directory with its marker is final and returned at once; one
without (an interrupted earlier attempt) is replaced; a failure removes the temporary directory, so
nothing half-written is ever trusted.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def build_once(final: Path, marker: str, build: Callable[[Path], str]) -> str:
    """`final` as a string, after `build(tmp)` filled a temporary directory and returned the marker
    file's text (written last), unless `final/marker` already exists."""
    final = Path(final)
    if (final / marker).exists():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        (tmp / marker).write_text(build(tmp))
        if final.exists():  # an interrupted earlier attempt without its marker
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(final)
