"""The Ray runner on a real local Ray (one for the module): stages run in worker processes, their events
reach the driver's hooks, a stage's exception arrives with its name and message, a GPU stage on a
GPU-less cluster fails at once, and the cache is shared with the in-process runner.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline import PipelineError, StageFailed, load_config, run_pipeline
from pipeline.executors import ResourceError

pytestmark = pytest.mark.ray


class Recorder:
    """A runner hook that keeps every event it receives."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.ends: list[tuple[str, str]] = []

    def on_stage_event(self, run: Any, st: Any, event: dict[str, Any]) -> None:
        self.events.append((st.name, event))

    def on_stage_end(self, run: Any, st: Any) -> None:
        self.ends.append((st.name, st.status))


def test_ray_runner_runs_stages_in_worker_processes(ray_session: Any, engine_defaults: Path) -> None:
    recorder = Recorder()
    cfg = load_config(None, ["run.runner=ray"], defaults=engine_defaults)
    result = run_pipeline(cfg, hooks=[recorder])
    stages = result.summary["stages"]
    assert [s["status"] for s in stages.values()] == ["done", "done", "done"]
    manifest = (result.run_dir / "stages" / "combine.json").read_text()
    worker_pid = int(__import__("json").loads(manifest)["pid"])
    assert worker_pid != os.getpid()  # a real Ray worker process ran the stage
    kinds = [e["kind"] for name, e in recorder.events if name == "combine"]
    assert kinds.count("metrics") == 3 and "progress" in kinds  # events crossed the process boundary
    # the same cache serves the in-process runner: no work the second time
    again = run_pipeline(load_config(None, defaults=engine_defaults), runner="local")
    assert [s["status"] for s in again.summary["stages"].values()] == ["cached"] * 3


def test_ray_stage_gets_the_threads_of_its_cpu_request(ray_session: Any, engine_defaults: Path) -> None:
    # source (1 CPU) imports torch first; a worker reused for combine (2 CPUs) would keep 1 thread
    cfg = load_config(None, ["run.runner=ray", "graph.source.resources.num_cpus=1",
                             "graph.scale.resources.num_cpus=1", "graph.combine.resources.num_cpus=2"],
                      defaults=engine_defaults)
    result = run_pipeline(cfg)
    manifest = __import__("json").loads((result.run_dir / "stages" / "combine.json").read_text())
    expected = int(os.environ.get("OMP_NUM_THREADS", 2))
    assert manifest["torch_threads"] == expected


def test_ray_ship_code_needs_its_own_ray(ray_session: Any, engine_defaults: Path) -> None:
    cfg = load_config(None, ["ray.ship_code=true"], defaults=engine_defaults)
    with pytest.raises(PipelineError, match="already initialized"):
        run_pipeline(cfg, runner="ray")


def test_ray_stage_error_names_stage_and_message(ray_session: Any, engine_defaults: Path) -> None:
    cfg = load_config(None, ["combine.fail=true"], defaults=engine_defaults)
    with pytest.raises(StageFailed) as info:
        run_pipeline(cfg, runner="ray")
    assert str(info.value).startswith("stage 'combine' failed: ValueError: combine exploded: the answer is 42")
    assert "RayTaskError" not in str(info.value)


def test_ray_retries_transient_failure(ray_session: Any, engine_defaults: Path) -> None:
    cfg = load_config(None, ["combine.transient_failures=1"], defaults=engine_defaults)
    result = run_pipeline(cfg, runner="ray")
    assert result.summary["stages"]["combine"]["attempts"] == 2
    assert result.summary["stages"]["combine"]["status"] == "done"


def test_gpu_stage_on_gpu_less_cluster_fails_at_once(ray_session: Any, engine_defaults: Path,
                                                     tmp_path: Path) -> None:
    if ray_session.cluster_resources().get("GPU"):
        pytest.skip("this Ray cluster has a GPU")
    cfg = load_config(None, ["graph.scale.resources.num_gpus=1"], defaults=engine_defaults)
    started = time.time()
    with pytest.raises(ResourceError, match=r"stage 'scale' needs .*1 GPU.*graph.scale.resources"):
        run_pipeline(cfg, runner="ray")
    assert time.time() - started < 30  # not pending forever
    assert not (tmp_path / "runs" / "cache").exists()  # nothing was submitted
