"""One computation per cache key across processes sharing `run.root` (`pipeline/locks.py`).

Unit tests of the lock file (atomic create, heartbeat, stale by age, stale by dead pid, one breaker),
then two real `python -m pipeline run` processes on one root: every stage runs once, the second run
waits for the first and uses its artifacts; and a `kill -9` of the lock holder mid-stage lets the
waiting run take the stage over, resuming from the holder's work directory. The fence: a worker
whose run lost the lock (judged dead, taken over) does not publish its artifact.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, TESTS

from pipeline.locks import LockLostError, StageLock, check_fence, lock_path, read_holder


def test_lock_is_exclusive_and_names_its_holder(tmp_path: Path) -> None:
    a = StageLock(tmp_path, "train", "k1", run_id="run-a", stale_s=60)
    b = StageLock(tmp_path, "train", "k1", run_id="run-b", stale_s=60)
    assert a.acquire()
    assert not b.acquire()
    assert b.holder["run"] == "run-a" and b.holder["pid"] == os.getpid()
    assert b.describe_holder().startswith("run run-a on ")
    assert StageLock(tmp_path, "train", "k2", run_id="run-b").acquire()  # another key is free
    a.release()
    assert not lock_path(tmp_path, "train", "k1").exists()
    assert b.acquire()
    b.release()


def test_heartbeat_keeps_a_live_holder(tmp_path: Path) -> None:
    a = StageLock(tmp_path, "train", "k", run_id="run-a", stale_s=0.4)
    assert a.acquire()
    time.sleep(1.2)  # three stale periods: only the heartbeat keeps it fresh
    b = StageLock(tmp_path, "train", "k", run_id="run-b", stale_s=0.4)
    assert not b.acquire()
    a.release()


def _foreign_lock(root: Path, host: str, pid: int, age_s: float) -> Path:
    path = lock_path(root, "train", "k")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run": "old-run", "host": host, "pid": pid, "token": "t-old"}))
    old = time.time() - age_s
    os.utime(path, (old, old))
    return path


def test_lock_without_heartbeat_is_broken(tmp_path: Path) -> None:
    _foreign_lock(tmp_path, "another-host", 1, age_s=5)
    fresh = StageLock(tmp_path, "train", "k", run_id="run-b", stale_s=10)
    assert not fresh.acquire()  # 5 s old < 10 s: its owner on another host may be alive
    taker = StageLock(tmp_path, "train", "k", run_id="run-b", stale_s=2)
    assert taker.acquire()
    assert taker.broke["run"] == "old-run"
    assert read_holder(taker.path)["run"] == "run-b"
    taker.release()


def test_lock_of_a_dead_pid_on_this_host_is_broken_at_once(tmp_path: Path) -> None:
    import socket
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    _foreign_lock(tmp_path, socket.gethostname(), proc.pid, age_s=0)
    taker = StageLock(tmp_path, "train", "k", run_id="run-b", stale_s=3600)
    assert taker.acquire() and taker.broke["pid"] == proc.pid
    taker.release()


def test_a_stale_lock_is_broken_by_one_waiter_only(tmp_path: Path) -> None:
    _foreign_lock(tmp_path, "another-host", 1, age_s=100)
    waiters = [StageLock(tmp_path, "train", "k", run_id=f"w{i}", stale_s=1) for i in range(4)]
    won = [w.acquire() for w in waiters]
    assert won.count(True) == 1
    (winner,) = [w for w, ok in zip(waiters, won) if ok]
    assert all(w.holder["run"] == winner.record["run"] for w, ok in zip(waiters, won) if not ok)
    winner.release()


def _start(defaults: Path, *overrides: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]), "COLUMNS": "300"}
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--defaults", str(defaults), "--no-track",
                             *overrides], cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _calls(root: Path) -> list[str]:
    path = root / "calls.log"
    return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _summaries(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("*/summary.json")) if p.parent.name != "latest"]


def test_check_fence_names_the_run_that_took_the_lock_over(tmp_path: Path) -> None:
    mine = StageLock(tmp_path, "train", "k", run_id="run-a", stale_s=3600)
    assert mine.acquire()
    check_fence(mine.path, mine.token, "train")  # still ours: nothing happens
    mine._stop.set()  # the driver died: no more heartbeats, and the lock is taken over
    mine.path.unlink()
    other = StageLock(tmp_path, "train", "k", run_id="run-b", stale_s=3600)
    assert other.acquire()
    try:
        check_fence(mine.path, mine.token, "train")
        raise AssertionError("a lost lock passed the fence")
    except LockLostError as err:
        assert "run run-b on" in str(err) and str(mine.path) in str(err)
    other.release()
    try:
        check_fence(mine.path, mine.token, "train")
        raise AssertionError("a released lock passed the fence")
    except LockLostError as err:
        assert "nobody" in str(err)


def _source_job(root: Path, lock: StageLock) -> dict:
    """A worker job for the engine's `source` stage, as `Runner._job` builds it."""
    from pipeline.store import ArtifactStore

    store = ArtifactStore(root)
    run_dir = root / "run-a"
    (run_dir / "events").mkdir(parents=True)
    return {"stage": "source", "module": "engine_stages:source", "config": {"n": 3}, "inputs": {}, "key": "k",
            "root": str(root), "run_dir": str(run_dir), "seed": 0, "tracking_uri": None, "mlflow_run_id": None,
            "events_path": str(run_dir / "events" / "source.jsonl"),
            "tmp_dir": str(store.new_tmp_dir("source", "k")), "final_dir": str(store.final_dir("source", "k")),
            "work_dir": str(store.work_dir("source", "k")), "lock_path": str(lock.path), "lock_token": lock.token}


def test_a_worker_that_lost_its_runs_lock_does_not_publish(tmp_path: Path) -> None:
    """The stage runs to the end in a worker whose run's lock was taken over meanwhile: the worker
    fails with LockLostError, publishes nothing and removes its temporary directory; the lock's
    holder is untouched. With the lock still held, the same job publishes."""
    from pipeline.worker import execute

    lost = StageLock(tmp_path, "source", "k", run_id="run-a", stale_s=3600)
    assert lost.acquire()
    lost._stop.set()
    lost.path.unlink()
    holder = StageLock(tmp_path, "source", "k", run_id="run-b", stale_s=3600)
    assert holder.acquire()
    job = _source_job(tmp_path, lost)
    result = execute(job)
    assert not result["ok"] and result["error_type"] == "LockLostError", result
    assert "run run-b" in result["message"]
    assert not Path(job["final_dir"]).exists() and not Path(job["tmp_dir"]).exists()
    assert read_holder(holder.path)["token"] == holder.token
    holder.release()

    mine = StageLock(tmp_path / "ok", "source", "k", run_id="run-a", stale_s=3600)
    assert mine.acquire()
    job = _source_job(tmp_path / "ok", mine)
    assert execute(job)["ok"] and (Path(job["final_dir"]) / "_COMPLETE.json").is_file()
    mine.release()


def test_two_runs_on_one_root_compute_each_stage_once(engine_defaults: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    first = _start(engine_defaults, "combine.sleep_s=3", log=tmp_path / "a.log")
    _wait_for(lambda: "combine" in _calls(root), 120, "the first run to reach combine")
    second = _start(engine_defaults, "combine.sleep_s=3", log=tmp_path / "b.log")
    assert first.wait(timeout=180) == 0, (tmp_path / "a.log").read_text()
    assert second.wait(timeout=180) == 0, (tmp_path / "b.log").read_text()
    assert sorted(_calls(root)) == ["combine", "scale", "source"]  # each stage ran exactly once
    a, b = _summaries(root)
    assert a["stages"]["combine"]["status"] == "done" and b["stages"]["combine"]["status"] == "cached"
    assert b["stages"]["combine"]["waited_for"].startswith(f"run {a['run']} on ")
    assert a["stages"]["combine"]["metrics"] == b["stages"]["combine"]["metrics"]
    assert f"waiting for combine (run {a['run']} on " in (tmp_path / "b.log").read_text()
    assert not list((root / "locks").rglob("*.lock"))  # both released
    assert not list((root / "cache").rglob(".tmp-*"))


def test_kill_9_of_the_holder_lets_the_waiter_take_over(engine_defaults: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    # the first attempt of combine sleeps 60 s; its attempt count lives in the key's work dir
    holder = _start(engine_defaults, "combine.sleep_s=60", "run.lock_stale_s=600", log=tmp_path / "a.log")
    _wait_for(lambda: any(root.glob("*/combine.started")), 120, "the holder to start combine")
    waiter = _start(engine_defaults, "combine.sleep_s=60", "run.lock_stale_s=600", log=tmp_path / "b.log")
    _wait_for(lambda: "waiting for combine" in (tmp_path / "b.log").read_text(), 120, "the waiter to wait")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    # a dead pid on this host is noticed at once (not after lock_stale_s = 600 s)
    assert waiter.wait(timeout=120) == 0, (tmp_path / "b.log").read_text()
    out = (tmp_path / "b.log").read_text()
    assert "took over combine" in out and "resuming from its checkpoints" in out
    b = _summaries(root)[-1]
    assert b["status"] == "done" and b["stages"]["combine"]["status"] == "done"
    work = next((root / "work" / "combine").iterdir())
    assert (work / "attempts").read_text() == "2"  # the holder's attempt was seen: resumed, not restarted
    assert _calls(root).count("combine") == 2 and _calls(root).count("source") == 1
    result = json.loads((Path(b["stages"]["combine"]["artifact_dir"]) / "result.json").read_text())
    assert result == [3.0, 6.0, 9.0, 12.0]


def test_a_run_that_loses_its_lock_mid_stage_yields_and_finishes(engine_defaults: Path, tmp_path: Path) -> None:
    """A live run whose stage lock is taken over mid-stage (another run judged it dead, e.g. a
    heartbeat stalled past `run.lock_stale_s`): its worker does not publish, the run waits for the new
    holder instead of failing, and computes the stage itself once that holder lets go unfinished."""
    root = tmp_path / "runs"
    run = _start(engine_defaults, "combine.sleep_s=6", "run.lock_stale_s=600", log=tmp_path / "a.log")
    _wait_for(lambda: any(root.glob("*/combine.started")), 120, "the run to start combine")
    (path,) = list((root / "locks" / "combine").glob("*.lock"))
    path.unlink()  # the takeover, as a waiter that judged the run dead does it
    thief = StageLock(root, "combine", path.name[: -len(".lock")], run_id="thief", stale_s=600)
    assert thief.acquire()
    _wait_for(lambda: "lost the lock of combine" in (tmp_path / "a.log").read_text(), 120, "the run to yield")
    assert run.poll() is None  # waiting, not failed
    assert not list((root / "cache" / "combine").glob("*/_COMPLETE.json"))  # nothing published
    thief.release()  # the new holder gives up without an artifact: the run computes combine again
    assert run.wait(timeout=120) == 0, (tmp_path / "a.log").read_text()
    summary = _summaries(root)[-1]
    assert summary["status"] == "done" and summary["stages"]["combine"]["status"] == "done"
    assert _calls(root).count("combine") == 2
    result = json.loads((Path(summary["stages"]["combine"]["artifact_dir"]) / "result.json").read_text())
    assert result == [3.0, 6.0, 9.0, 12.0]
