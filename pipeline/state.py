"""What a run knows about itself: the state of each stage and of the run, and the run's errors.

A leaf module (it imports only the config's types), so that the runner, its executors and its hooks
(`pipeline.tracking`, `pipeline.display`, `pipeline.contracts`, `pipeline.replay`) all read the
same records without importing each other.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig

FINISHED = ("cached", "done")


class PipelineError(RuntimeError):
    """The run cannot start or continue (not a stage's own failure)."""


class StageFailed(PipelineError):
    """A stage raised: its name, its exception type and message, and where its traceback is saved."""

    def __init__(self, stage: str, error_type: str, message: str, log: str | None = None):
        self.stage, self.error_type, self.message, self.log = stage, error_type, message, log
        where = f"\n  (traceback: {log})" if log else ""
        super().__init__(f"stage '{stage}' failed: {error_type}: {message}{where}")


@dataclass
class StageState:
    """What the runner (and its hooks) know about one stage during a run."""

    name: str
    """The stage name."""
    key: str
    """Its cache key."""
    status: str = "pending"
    """pending, waiting (another run holds its key's lock), running, cached, done, failed, skipped or
    interrupted."""
    started: float | None = None
    """Wall-clock start of the current attempt (time.time())."""
    duration_s: float = 0.0
    """Seconds the stage ran (0 when cached)."""
    attempts: int = 0
    """Attempts made (retries included)."""
    manifest: dict[str, Any] | None = None
    """The stage's manifest once finished."""
    artifact_dir: str | None = None
    """The artifact's final directory."""
    error: str | None = None
    """`Type: message` of the last failure."""
    progress: dict[str, Any] | None = None
    """The last progress event (`done`, `total`, `message`)."""
    mlflow_run_id: str | None = None
    """The stage's nested MLflow run, set by the tracking hook."""
    damaged: str | None = None
    """Why its cached artifact was refused (a file that fails its checksum): the stage reran."""
    waiting_for: str | None = None
    """`run <id> on <host>`: the run computing this key while this one waits for it."""

    @property
    def metrics(self) -> dict[str, Any]:
        """The manifest's `metrics` dict (empty before the stage finishes)."""
        return dict((self.manifest or {}).get("metrics") or {})


@dataclass
class RunInfo:
    """One pipeline run, as hooks see it."""

    cfg: PipelineConfig
    """The validated config."""
    run_dir: Path
    """`runs/<timestamp>-<name>/`."""
    states: dict[str, StageState]
    """Every stage's state, in topological order."""
    started: float = field(default_factory=time.time)
    """Start time (time.time())."""
    status: str = "running"
    """running, done, failed or interrupted."""
    tracking_uri: str | None = None
    """MLflow tracking URI (set by the tracking hook)."""
    mlflow_run_id: str | None = None
    """The parent MLflow run (set by the tracking hook)."""
    runner: str = "local"
    """The runner asked for: `ray` or `local`."""
    cache_only: bool = False
    """Every stage was a verified cache hit before the run started: no executor (no Ray) was started."""


@dataclass
class RunResult:
    """What `run_pipeline` returns."""

    run_dir: Path
    """The run directory."""
    summary: dict[str, Any]
    """The content of `summary.json`."""
