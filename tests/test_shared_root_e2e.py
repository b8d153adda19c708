"""Two real `python -m pipeline run recipes/tiny.yaml` processes on one `run.root`, under Ray.

First both start together: both succeed, every stage is computed by exactly one of them (the other
waits for its key's lock and takes the artifact from the cache), and the export is valid. Then,
on the same root with a longer training budget (a new `train_denoiser` key, upstream cached), the
holder of `train_denoiser`'s lock is killed with SIGKILL mid-training: the waiting run breaks the
lock (its pid is dead on this host), resumes from the holder's last checkpoint and exports.
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
from test_e2e_tiny import STAGES, TINY_BUDGET

REPO = Path(__file__).resolve().parent.parent


def _start(root: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "", "COLUMNS": "300"}
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", "recipes/tiny.yaml", f"run.root={root}",
                             *TINY_BUDGET, *extra, "--no-track"], cwd=REPO, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _summaries(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("*/summary.json")) if p.parent.name != "latest"]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.ray
@pytest.mark.slow
def test_two_runs_share_a_root_and_survive_the_holders_kill(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    a = _start(root, tmp_path / "a.log")
    time.sleep(1.0)  # both start at once: the second finds the first holding or finishing each stage
    b = _start(root, tmp_path / "b.log")
    assert a.wait(timeout=900) == 0, (tmp_path / "a.log").read_text()[-3000:]
    assert b.wait(timeout=900) == 0, (tmp_path / "b.log").read_text()[-3000:]
    first, second = _summaries(root)
    for stage in STAGES:  # computed once: "done" in one run, "cached" in the other
        assert sorted([first["stages"][stage]["status"], second["stages"][stage]["status"]]) == ["cached", "done"]
    assert any("waited_for" in s for s in second["stages"].values())
    for summary in (first, second):
        export = summary["stages"]["export"]
        assert export["metrics"]["mock_ar_equals_ar"] == 1.0
        assert (Path(export["metrics"]["path"]) / "config.json").exists()
    assert not list((root / "locks").rglob("*.lock")) and not list((root / "cache").rglob(".tmp-*"))

    # kill -9 of the lock holder mid-training: the waiter takes over from its checkpoint
    longer = ["train.max_steps=100000", "train.max_minutes=0.75", "train.checkpoint_every=5"]
    holder = _start(root, tmp_path / "holder.log", *longer)
    _wait_for(lambda: any((root / "locks" / "train_denoiser").glob("*.lock")), 300, "the holder to lock training")
    lock = next((root / "locks" / "train_denoiser").glob("*.lock"))
    assert json.loads(lock.read_text())["pid"] == holder.pid
    waiter = _start(root, tmp_path / "waiter.log", *longer)
    work = root / "work" / "train_denoiser" / lock.stem
    _wait_for(lambda: "waiting for train_denoiser" in (tmp_path / "waiter.log").read_text()
              and (work / "checkpoints" / "last.ckpt").exists(), 300, "a checkpoint and a waiting run")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert waiter.wait(timeout=900) == 0, (tmp_path / "waiter.log").read_text()[-3000:]
    out = (tmp_path / "waiter.log").read_text()
    assert "took over train_denoiser" in out
    summary = _summaries(root)[-1]
    train = summary["stages"]["train_denoiser"]
    assert train["status"] == "done" and train["metrics"]["resumed_from_step"] >= 5
    assert summary["stages"]["prepare_data"]["status"] == "cached"
    assert summary["stages"]["export"]["metrics"]["mock_ar_equals_ar"] == 1.0
