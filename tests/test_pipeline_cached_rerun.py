"""An unchanged re-run under `runner: ray` is served from the cache without starting Ray.

The driver reads every stage's completion marker before it creates an executor: when all are
verified hits, no Ray is started (the display says so, MLflow tags the parent run), while the
summary, the stage records and the MLflow runs keep their content. A run with any stage to execute
still starts Ray and runs that stage in a Ray worker process.
"""
from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from pipeline import load_config, run_pipeline
from pipeline.display import LiveDisplay


def _ray_up() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


class RaySpy:
    """A runner hook noting, at every call, whether Ray is initialized in this process."""

    def __init__(self) -> None:
        self.seen: list[bool] = []
        self.run: Any = None

    def on_run_start(self, run: Any) -> None:
        self.run = run
        self.seen.append(_ray_up())

    def on_stage_end(self, run: Any, st: Any) -> None:
        self.seen.append(_ray_up())

    def on_run_end(self, run: Any, summary: dict[str, Any]) -> None:
        self.seen.append(_ray_up())


def _stable(summary: dict[str, Any]) -> dict[str, Any]:
    """A summary without what differs between any two runs (run name, times, MLflow run ids)."""
    out = {k: v for k, v in summary.items() if k not in ("run", "started", "duration_s", "mlflow")}
    out["stages"] = {n: {k: v for k, v in st.items() if k != "mlflow_run_id"} for n, st in summary["stages"].items()}
    return out


def test_all_cached_rerun_under_ray_does_not_start_ray(engine_defaults: Path) -> None:
    assert not _ray_up(), "another test left Ray running in this process"
    first = run_pipeline(load_config(None, defaults=engine_defaults), runner="local")
    assert [s["status"] for s in first.summary["stages"].values()] == ["done"] * 3
    spy, out = RaySpy(), io.StringIO()
    again = run_pipeline(load_config(None, defaults=engine_defaults), runner="ray",
                         hooks=[spy, LiveDisplay(Console(file=out, width=120))])
    assert spy.seen and not any(spy.seen)  # Ray was never initialized, at any point of the run
    assert spy.run.cache_only and spy.run.runner == "ray"
    assert "all 3 stages cached; Ray not started" in out.getvalue()
    stages = again.summary["stages"]
    assert [s["status"] for s in stages.values()] == ["cached"] * 3
    for name, st in stages.items():  # the same artifacts, keys and metrics as the run that made them
        done = first.summary["stages"][name]
        assert (st["cache_key"], st["artifact_dir"], st["metrics"]) == (done["cache_key"], done["artifact_dir"],
                                                                         done["metrics"])
        assert st["attempts"] == 0 and st["duration_s"] == 0.0
        assert json.loads((again.run_dir / "stages" / f"{name}.json").read_text())["metrics"] == done["metrics"]
    assert (again.run_dir / "config.yaml").read_text() == (first.run_dir / "config.yaml").read_text()
    assert json.loads((again.run_dir / "summary.json").read_text()) == again.summary
    # a third unchanged run, on the local runner, writes the same summary content
    third = run_pipeline(load_config(None, defaults=engine_defaults), runner="local")
    assert _stable(third.summary) == _stable(again.summary)


def test_cached_rerun_still_records_mlflow_runs(engine_defaults: Path) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import numeric
    overrides = ["tracking.enabled=true", "tracking.experiment=cached-rerun"]
    first = run_pipeline(load_config(None, overrides, defaults=engine_defaults), runner="local")
    again = run_pipeline(load_config(None, overrides, defaults=engine_defaults), runner="ray")
    client = MlflowClient(again.summary["mlflow"]["tracking_uri"])
    parent = client.get_run(again.summary["mlflow"]["run_id"])
    first_parent = client.get_run(first.summary["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["pipeline.cache_only"] == "true"
    assert parent.data.tags["pipeline.runner"] == "ray"
    assert first_parent.data.tags["pipeline.cache_only"] == "false"
    assert parent.data.metrics == first_parent.data.metrics and "combine.sum" in parent.data.metrics
    assert parent.data.params == first_parent.data.params
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"config.yaml", "summary.json"}
    for name, st in again.summary["stages"].items():
        child = client.get_run(st["mlflow_run_id"])
        before = client.get_run(first.summary["stages"][name]["mlflow_run_id"])
        assert child.info.status == "FINISHED" and child.data.tags["pipeline.status"] == "cached"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.params == before.data.params
        # the manifest's metrics, as the first run logged them (curves exist only where a stage ran)
        assert child.data.metrics == numeric(st["metrics"]) and numeric(st["metrics"])
        assert all(before.data.metrics[k] == v for k, v in child.data.metrics.items())


@pytest.mark.ray
def test_partly_cached_run_still_uses_ray(engine_defaults: Path) -> None:
    assert not _ray_up(), "another test left Ray running in this process"
    run_pipeline(load_config(None, defaults=engine_defaults), runner="local")
    spy = RaySpy()
    result = run_pipeline(load_config(None, ["combine.steps=2"], defaults=engine_defaults), runner="ray",
                          hooks=[spy])
    stages = result.summary["stages"]
    assert {n: s["status"] for n, s in stages.items()} == {"source": "cached", "scale": "cached",
                                                            "combine": "done"}
    assert not spy.run.cache_only and any(spy.seen)  # the engine started Ray for the stage to run
    worker_pid = json.loads((result.run_dir / "stages" / "combine.json").read_text())["pid"]
    assert worker_pid != os.getpid()  # and the stage ran in a Ray worker process
    assert not _ray_up()  # the engine shut down the Ray it started
