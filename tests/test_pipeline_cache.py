"""Cache and resume with the in-process runner: hits, misses on a config change, --force/--from,
a failed stage resumed with its upstream cached, a SIGKILL mid-stage, atomic artifacts, summary.json.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TESTS, cli

from pipeline import StageFailed, load_config, run_pipeline
from pipeline.state import PipelineError
from pipeline.store import MARKER


def _run(defaults: Path, *overrides: str, **kwargs):
    return run_pipeline(load_config(None, list(overrides), defaults=defaults), runner="local", **kwargs)


def _statuses(result) -> dict[str, str]:
    return {name: st["status"] for name, st in result.summary["stages"].items()}


def _calls(root: Path) -> list[str]:
    path = root / "calls.log"
    return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


def test_second_identical_run_does_no_work(engine_defaults: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    first = _run(engine_defaults)
    assert _statuses(first) == {"source": "done", "scale": "done", "combine": "done"}
    assert first.summary["stages"]["combine"]["metrics"] == {"sum": 30.0, "nested": {"first": 3.0}}
    second = _run(engine_defaults)
    assert _statuses(second) == {"source": "cached", "scale": "cached", "combine": "cached"}
    assert _calls(root) == ["source", "scale", "combine"]  # nothing ran the second time
    assert second.run_dir != first.run_dir and (root / "latest").resolve() == second.run_dir
    summary = json.loads((second.run_dir / "summary.json").read_text())
    assert summary["status"] == "done" and summary["stages"]["combine"]["metrics"]["sum"] == 30.0
    manifest = json.loads((second.run_dir / "stages" / "combine.json").read_text())
    assert Path(manifest["artifacts"]["result"]).is_file()  # absolute path into the cache
    assert "combine:" in (second.run_dir / "config.yaml").read_text()


def test_config_change_misses_that_stage_and_downstream(engine_defaults: Path, tmp_path: Path) -> None:
    _run(engine_defaults)
    result = _run(engine_defaults, "scale.factor=3")
    assert _statuses(result) == {"source": "cached", "scale": "done", "combine": "done"}
    assert result.summary["stages"]["combine"]["metrics"]["sum"] == 40.0
    result = _run(engine_defaults, "combine.steps=5", "run.seed=0")  # seed unchanged: only combine
    assert _statuses(result) == {"source": "cached", "scale": "cached", "combine": "done"}


def test_force_and_from(engine_defaults: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    _run(engine_defaults)
    result = _run(engine_defaults, force=["scale"])
    assert _statuses(result) == {"source": "cached", "scale": "done", "combine": "done"}
    result = _run(engine_defaults, from_stage="combine")
    assert _statuses(result) == {"source": "cached", "scale": "cached", "combine": "done"}
    assert _calls(root) == ["source", "scale", "combine", "scale", "combine", "combine"]
    with pytest.raises(PipelineError, match="did you mean 'scale'"):
        _run(engine_defaults, force=["scal"])
    with pytest.raises(PipelineError, match="no complete cached artifact"):
        _run(engine_defaults, "source.n=2", from_stage="combine")


def test_failure_then_resume_with_upstream_cached(engine_defaults: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    with pytest.raises(StageFailed) as info:
        _run(engine_defaults, "combine.fail=true", "graph.combine.retries=3")
    err = info.value
    assert err.stage == "combine" and err.error_type == "ValueError"
    assert "combine exploded: the answer is 42" in str(err)
    assert "ValueError" in Path(err.log).read_text()  # the stage's own traceback is kept
    summary = json.loads(((root / "latest") / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["stages"]["combine"]["status"] == "failed" and summary["stages"]["combine"]["attempts"] == 1
    assert not list((root / "cache" / "combine").glob("*/" + MARKER))  # nothing half-written kept
    assert not list((root / "cache" / "combine").glob(".tmp-*"))
    result = _run(engine_defaults)  # the fix: combine.fail back to false (the default)
    assert _statuses(result) == {"source": "cached", "scale": "cached", "combine": "done"}


def test_transient_failures_are_retried(engine_defaults: Path) -> None:
    result = _run(engine_defaults, "combine.transient_failures=2")  # graph.combine.retries is 2
    assert result.summary["stages"]["combine"]["status"] == "done"
    assert result.summary["stages"]["combine"]["attempts"] == 3
    with pytest.raises(StageFailed, match="ConnectionError: transient failure"):
        _run(engine_defaults, "combine.transient_failures=5", "combine.steps=4")


def test_manifest_must_be_plain_json(engine_defaults: Path, tmp_path: Path) -> None:
    result = _run(engine_defaults)
    manifest = json.loads((result.run_dir / "stages" / "source.json").read_text())
    assert manifest["numbers_path"] == manifest["artifacts"]["numbers"]  # a Path became its string
    with pytest.raises(StageFailed, match="stage 'combine' failed: TypeError: the manifest holds a object"):
        _run(engine_defaults, "combine.bad_manifest=true")
    assert not list((tmp_path / "runs" / "cache" / "combine").glob(".tmp-*"))


def test_damaged_artifact_is_not_reused(engine_defaults: Path, tmp_path: Path) -> None:
    first = _run(engine_defaults)
    result_file = Path(first.summary["stages"]["combine"]["artifact_dir"]) / "result.json"
    result_file.write_text(result_file.read_text() + " ")  # size changes: the marker no longer matches
    second = _run(engine_defaults)
    assert _statuses(second)["combine"] == "done"
    assert second.summary["stages"]["combine"]["damaged_artifact"].startswith(f"{result_file}: size")
    # same size, one byte changed: the checksum catches it (checkpoints and tokenizers:
    # tests/test_training_failures.py, tests/test_pipeline_failures.py)
    table = Path(second.summary["stages"]["combine"]["artifact_dir"]) / "table.csv"
    table.write_text(table.read_text().replace("1", "7"))
    third = _run(engine_defaults)
    assert _statuses(third)["combine"] == "done"
    assert third.summary["stages"]["combine"]["damaged_artifact"] == f"{table}: sha256 mismatch (the file is corrupt)"


KILL_SCRIPT = """
import sys
from pipeline import load_config, run_pipeline
cfg = load_config(None, sys.argv[2:], defaults=sys.argv[1])
run_pipeline(cfg, runner="local")
"""


def test_sigkill_mid_stage_then_resume(engine_defaults: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(engine_defaults), "combine.sleep_s=60"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(root.glob("*/combine.started")):
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "combine never started"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # the partial artifact exists, but only as a temporary directory with no completion marker
    assert list((root / "cache" / "combine").glob(".tmp-*/partial.bin"))
    assert not list((root / "cache" / "combine").glob("*/" + MARKER))
    summary = json.loads((root / "latest" / "summary.json").read_text())
    assert summary["stages"]["combine"]["status"] == "running" and summary["status"] == "running"
    status = cli("status", "--root", str(root))
    assert status.returncode == 0 and "killed (its driver process is gone)" in status.stdout
    killed = (root / "latest").resolve()
    resumed = cli("run", "--resume", str(killed), "--runner", "local", "--quiet")  # its saved config
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((Path(resumed.stdout.split()[-1]) / "summary.json").read_text())
    assert {n: s["status"] for n, s in summary["stages"].items()} == {
        "source": "cached", "scale": "cached", "combine": "done"}
    assert summary["name"] == "default" and summary["stages"]["combine"]["metrics"]["sum"] == 30.0
    assert list((root / "cache" / "combine").glob("*/" + MARKER))
    assert not list((root / "cache" / "combine").glob(".tmp-*"))  # the stale partial was cleaned
