"""The contract between the pipeline engine and a stage.

A stage is a module directly in `stages/` (helpers live in its subpackages) exposing:

    SECTION: str                       # the config section it reads (e.g. "data")
    Config: type                       # a typed dataclass: the schema of that section (choices as
                                       # Literal, numbers as Annotated[int, Range(1)], ...)
    REQUIRES: tuple[str, ...]          # the upstream manifests `run` reads (checked by validate)
    def run(cfg: Config, inputs: dict[str, dict], ctx: StageContext) -> dict

and optionally hooks the engine calls before anything runs, each raising ValueError naming a key:
`validate(cfg)` (its section alone), `check(sections)` (across sections), `check_resources(cfg,
sections, resources, stage)` (against its own graph reservation) and `check_cluster(cfg, cluster)`
(against the Ray cluster's resource totals, `{"CPU": n, "GPU": n}`: what it will ask the cluster
for beyond its own task, e.g. `train_denoiser`'s Ray Train workers; `pipeline/cluster.py`).

`inputs` maps each upstream stage name to the manifest it returned (plain JSON). The returned
manifest is plain JSON too: `{"metrics": {...}, "artifacts": {...}, ...anything small}`. Artifact
paths in it are absolute (the engine hands out `ctx.out_dir` at its final location's sibling and
rewrites nothing), heavy tensors stay on disk, never in a manifest.

The engine derives the stage's code version (part of its cache key) from the project modules it
imports (pipeline/codeversion.py): there is no list to keep. Stages never import MLflow and never
parse arguments, and only distributed training imports Ray (`stages/training/train_distributed.py`
and `distributed_worker.py` hand a fit to Ray Train; `tests/test_structure.py` checks it): the
engine builds the context, runs the stage (in-process or as a Ray task), writes the manifest
atomically with a completion marker, and tracks metrics through hooks. Training stages may hand
`ctx.tracking_uri` / `ctx.mlflow_run_id` to
Lightning's MLFlowLogger so curves land in the stage's own MLflow run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric config field, checked by `validate` before anything runs.

    Used as `Annotated` metadata in a stage's `Config`:

        max_steps: Annotated[int, Range(1)] = 300          # 1 or more
        min_lr_ratio: Annotated[float, Range(0, 1)] = 0.1   # 0 to 1, both included
        gamma: Annotated[float, Range(0, 1, low_open=True)] # (0, 1]
    """

    low: float | None = None
    """Smallest allowed value (None: no lower bound)."""
    high: float | None = None
    """Largest allowed value (None: no upper bound)."""
    low_open: bool = False
    """Exclude `low` itself."""
    high_open: bool = False
    """Exclude `high` itself."""

    def __str__(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return (f"{'(' if self.low_open or self.low is None else '['}{low}, "
                f"{high}{')' if self.high_open or self.high is None else ']'}")

    def allows(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def violation(self, value: Any) -> str | None:
        """None when `value` is allowed, else the message the config error shows."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or self.allows(value):
            return None
        return f"must be in {self}, got {value!r}"


def _ignore(_: dict[str, Any]) -> None:
    return None


@dataclass
class StageContext:
    """Everything a stage may know about the world outside its config and inputs."""

    name: str
    """The stage's name in the DAG."""
    out_dir: Path
    """Where the stage writes its artifacts. It is a temporary directory that the engine renames to
    the cache location only after `run` returns: a crash never leaves a complete-looking artifact."""
    work_dir: Path
    """A persistent scratch directory keyed like the artifact (survives crashes): resumable training
    checkpoints live here."""
    run_dir: Path
    """This pipeline run's directory (`runs/<timestamp>-<recipe>/`)."""
    seed: int = 0
    """The run's seed (`run.seed`)."""
    tracking_uri: str | None = None
    """MLflow tracking URI of this run, for Lightning's MLFlowLogger."""
    mlflow_run_id: str | None = None
    """The stage's nested MLflow run id, to reattach a logger to it."""
    final_dir: Path | None = None
    """Where `out_dir` will live once the stage succeeds. Manifest paths should point here."""
    report: Callable[[dict[str, Any]], None] = field(default=_ignore, repr=False)
    """Engine callback for progress and metrics events (see `progress` and `log_metrics`)."""

    def artifact_path(self, relative: str) -> str:
        """Absolute path that `out_dir / relative` will have after the engine's atomic rename."""
        base = self.final_dir if self.final_dir is not None else self.out_dir
        return str(Path(base) / relative)

    def progress(self, done: float, total: float | None = None, message: str = "") -> None:
        """Report progress (e.g. training steps) for the live display."""
        self.report({"kind": "progress", "done": done, "total": total, "message": message})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log scalar metrics to the stage's MLflow run (through the engine's tracking hook)."""
        self.report({"kind": "metrics", "metrics": dict(metrics), "step": step})

    def warn(self, message: str) -> None:
        """Tell the user something went wrong but the stage goes on (e.g. no γ met the target):
        the one path to the user, shown by the live display and kept in the run's events."""
        self.report({"kind": "warning", "message": message})

    def log_artifact(self, path: str | Path) -> None:
        """Ask the engine to log a file (a plot, a table) as an MLflow artifact of this stage."""
        self.report({"kind": "artifact", "path": str(path)})
