"""The run a distributed fit leaves on shared storage, as both sides of it read and write it.

The driver (`stages.training.train_distributed`) and every worker (`stages.training.distributed_worker`)
must agree on the run directory, the checkpoint and step files and the report log; this leaf module
is that agreement, plus the `DistributedConfig` both are given. No Ray, no torch at import.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.training.optimisation import Optimisation

CHECKPOINT_FILE = "checkpoint.ckpt"
STEP_FILE = "step.json"
"""Beside `CHECKPOINT_FILE` in each reported checkpoint: its optimizer step, readable without
loading the checkpoint (a NaN error names the last good one from the driver)."""
LATEST_CHECKPOINT = "the latest Ray Train checkpoint under {run_dir}"
"""How a worker's `NonFiniteError` names the last good checkpoint: Ray picks the directory, so the
driver replaces this phrase with the path it finds (`_nonfinite_on_driver`)."""
REPORTS_FILE = "reports.jsonl"
STARTS_FILE = "starts.jsonl"
"""One line per start of the worker group (rank 0 appends it): the first, and each restart after a
worker died, with the optimizer step it resumed from. What the summary reports as restarts."""
STRATEGIES = ("fsdp", "ddp")
REPORT_EVERY_AT_MOST = 10
"""Steps between two metric reports at most (and at every checkpoint when those are closer)."""


@dataclass
class DistributedConfig:
    """How to run one Lightning fit on a Ray cluster."""

    storage_path: str
    """Shared storage root for checkpoints and reports (`run.root` on a cluster: NFS, s3://, ...)."""
    name: str = "train_denoiser"
    """Run name under `storage_path`; the same name resumes from the latest checkpoint."""
    num_workers: int = 2
    """Training processes (one per GPU when `use_gpu`)."""
    use_gpu: bool = False
    """One GPU per worker; on CPU the process group is gloo."""
    cpus_per_worker: int = 1
    """CPUs reserved per worker."""
    strategy: str = "fsdp"
    """`fsdp` (FSDP2: each layer unit sharded, sharded checkpoints) or `ddp`."""
    activation_checkpointing: bool = True
    """Recompute each decoder layer in backward (FSDP only)."""
    precision: str = "auto"
    """Lightning precision; `auto` is bf16-mixed on GPU and 32-true on CPU."""
    max_steps: int = Optimisation.max_steps
    """Optimizer steps in total (a resumed run continues to this count)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    grad_clip: float = 0.0
    """Gradient-norm clip; 0 disables (FSDP clips by norm across shards)."""
    report_every: int = 10
    """Report metrics every this many optimizer steps."""
    checkpoint_every: int = Optimisation.checkpoint_every
    """Checkpoint to shared storage every this many optimizer steps (and at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on storage (oldest deleted first)."""
    max_failures: int = 0
    """Worker-group restarts Ray Train attempts from the latest checkpoint."""
    seed: int = 0
    """Seed set on every worker before the module is built (identical initial weights)."""
    wrap_layer_classes: tuple[str, ...] = ()
    """Class names FSDP wraps and checkpoints; empty: the classes of the model's layer lists."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for the workers (e.g. NCCL settings)."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"train.strategy={self.strategy!r}: expected one of {STRATEGIES}")
        if self.num_workers < 1:
            raise ValueError(f"train.num_workers={self.num_workers}: must be >= 1")
        if self.report_every < 1 or self.checkpoint_every < 1:
            raise ValueError("train.report_every and train.checkpoint_every must be >= 1")


def run_dir_of(cfg: DistributedConfig) -> str:
    if "://" in cfg.storage_path:
        return f"{cfg.storage_path.rstrip('/')}/{cfg.name}"
    path = Path(cfg.storage_path).expanduser().resolve() / cfg.name
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def latest_checkpoint(run_dir: str | Path) -> tuple[Path, int | None] | None:
    """(checkpoint file, its optimizer step) of the newest checkpoint Ray Train persisted under
    `run_dir` (directory names differ between Ray versions: the newest by mtime), or None."""
    found = [d for d in Path(run_dir).glob("checkpoint_*") if (d / CHECKPOINT_FILE).is_file()]
    if not found:
        return None
    newest = max(found, key=lambda d: d.stat().st_mtime_ns)
    step_file = newest / STEP_FILE
    step = int(json.loads(step_file.read_text())["step"]) if step_file.is_file() else None
    return newest / CHECKPOINT_FILE, step


def read_starts(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every start rank 0 recorded under `run_dir`, oldest first (empty if none)."""
    path = Path(run_dir) / STARTS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_reports(run_dir: str | Path) -> list[dict[str, float]]:
    """The step-based reports rank 0 appended under `run_dir`, oldest first (empty if none)."""
    path = Path(run_dir) / REPORTS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
