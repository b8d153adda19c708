"""Run one stage: the function each Ray task (or the in-process runner) executes.

`execute(job)` builds the stage's typed config and `StageContext`, calls `run`, commits the
artifact atomically and returns a plain outcome dict. It never raises for a stage error: the
exception's type, base classes, message and traceback come back as data, so the driver can report
"stage X failed: ValueError: <the stage's message>" instead of a Ray wrapper traceback, and decide
whether the failure is transient. Events (`ctx.report`) are appended as JSON lines to a file in the
run directory, which the driver tails: that works from any worker process on a shared filesystem.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from pipeline.config import import_stage
from pipeline.diskspace import disk_error, is_disk_error
from pipeline.locks import check_fence
from pipeline.quiet import quiet_kernel_fallbacks
from pipeline.schema import build
from pipeline.store import ArtifactStore
from stages.api import StageContext

PROGRESS_INTERVAL_S = 0.2
"""Minimum seconds between two progress events written (training may report every step)."""


class EventWriter:
    """`ctx.report` for a worker: appends each event as one JSON line (progress is throttled)."""

    def __init__(self, path: str | Path, tmp_dir: Path | None = None, final_dir: Path | None = None):
        self.path = Path(path)
        self.last_progress = 0.0
        self.tmp, self.final = (str(tmp_dir), str(final_dir)) if tmp_dir and final_dir else (None, None)

    def __call__(self, event: dict[str, Any]) -> None:
        now = time.time()
        if event.get("kind") == "artifact" and self.tmp and str(event.get("path", "")).startswith(self.tmp):
            # a file in ctx.out_dir moves to the final directory: name it where it will be
            event = {**event, "path": self.final + str(event["path"])[len(self.tmp):]}
        if event.get("kind") == "progress":
            final = event.get("total") is not None and event.get("done") == event.get("total")
            if now - self.last_progress < PROGRESS_INTERVAL_S and not final:
                return
            self.last_progress = now
        line = json.dumps({"t": now, **event}, default=str)
        with open(self.path, "a") as fh:
            fh.write(line + "\n")


def _plain(obj: Any) -> Any:
    """JSON for the few non-JSON values a manifest may hold (paths); anything else is an error."""
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"the manifest holds a {type(obj).__name__}: manifests are small plain JSON "
                    "(heavy data goes to files under ctx.out_dir)")


def _failure(err: BaseException, started: float) -> dict[str, Any]:
    return {"ok": False, "error_type": type(err).__name__,
            "error_bases": [c.__name__ for c in type(err).__mro__],
            "message": str(err), "traceback": traceback.format_exc(),
            "duration_s": time.time() - started, "pid": os.getpid()}


def set_threads(n: int) -> None:
    """Intra-op threads for this process from now on: for a torch imported later (the env vars it
    reads at import) and for one already imported (a reused Ray worker)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)


def execute(job: dict[str, Any]) -> dict[str, Any]:
    """Run the stage described by `job` (plain data, see `Runner._job`) and commit its artifact.
    `num_threads` (set by the Ray executor from the stage's CPUs) fixes the intra-op threads first."""
    started = time.time()
    if job.get("num_threads"):
        set_threads(int(job["num_threads"]))
    store = ArtifactStore(job["root"])
    tmp, final = Path(job["tmp_dir"]), Path(job["final_dir"])
    try:
        module = import_stage(job["module"])
        cfg = build(module.Config, job["config"])
        tmp.mkdir(parents=True, exist_ok=True)
        Path(job["work_dir"]).mkdir(parents=True, exist_ok=True)
        report = EventWriter(job["events_path"], tmp, final)
        quiet_kernel_fallbacks(report)  # transformers' "falling back ... much slower" lines: one notice instead
        ctx = StageContext(name=job["stage"], out_dir=tmp, work_dir=Path(job["work_dir"]),
                           run_dir=Path(job["run_dir"]), seed=job["seed"],
                           tracking_uri=job.get("tracking_uri"), mlflow_run_id=job.get("mlflow_run_id"),
                           final_dir=final, report=report)
        manifest = module.run(cfg, job["inputs"], ctx)
        if not isinstance(manifest, dict):
            raise TypeError(f"run() must return a manifest dict, got {type(manifest).__name__}")
        manifest = json.loads(json.dumps(manifest, default=_plain))  # plain JSON, or fail here, named
        if job.get("lock_token"):  # a worker that outlived its run's lock must not publish
            check_fence(job["lock_path"], job["lock_token"], job["stage"])
        store.commit(tmp, final, job["stage"], job["key"], manifest)
    except Exception as err:
        failure: Exception = err
        if is_disk_error(err):  # one error naming the path and the bytes, however it surfaced
            failure = disk_error(err, tmp, Path(job["work_dir"]))
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written artifact behind
        return _failure(failure, started)
    return {"ok": True, "manifest": manifest, "duration_s": time.time() - started, "pid": os.getpid()}
