"""The files of one run directory (`runs/<timestamp>-<recipe>/`) that are not the runner's logic:
creating it (and the `latest` link), tailing a stage's event file, writing the resolved config.

    runs/<timestamp>-<recipe>/config.yaml        the resolved config (dump_yaml)
    runs/<timestamp>-<recipe>/events/<stage>.jsonl  a worker's progress/metrics/warning events (EventTail)
    runs/latest -> <timestamp>-<recipe>          updated atomically
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any


def new_run_dir(root: Path, name: str) -> Path:
    """Create `root/<timestamp>-<name>` (suffixed if taken) and point `root/latest` at it."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    for i in range(1000):
        run_dir = root / (f"{stamp}-{name}" + (f"-{i}" if i else ""))
        try:
            run_dir.mkdir()
            break
        except FileExistsError:
            continue
    link = root / "latest"
    tmp = root / f".latest-{os.getpid()}"
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, link)  # atomic: `latest` always points at a real run
    return run_dir


class EventTail:
    """Reads the JSON lines a worker appended to a stage's event file since the last call."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def read(self) -> list[dict[str, Any]]:
        """New complete events (a half-written last line waits for the next call)."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        return [json.loads(line) for line in data[:end].splitlines() if line.strip()]


def dump_yaml(data: dict[str, Any]) -> str:
    """The resolved config as YAML (saved in the run directory and logged to MLflow)."""
    from omegaconf import OmegaConf
    return OmegaConf.to_yaml(OmegaConf.create(data))
