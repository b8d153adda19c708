"""Tracking that fails costs seconds, never the run: the probe of `tracking.uri` in `validate` and at
the start of `run` (exit 2 naming the key, or a warning with `tracking.required=false`), a server
that dies mid-run (the run goes on; `pipeline track RUN_DIR` replays it into MLflow), and SQLite's
"database is locked" from concurrent runs (retried). Real sockets, a real HTTP server, real SQLite.
"""
from __future__ import annotations

import http.server
import json
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from conftest import cli

from pipeline import PipelineError, load_config, run_pipeline
from pipeline.tracking import MlflowHook, probe


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def silent_uri():
    """A port that accepts connections and never answers (a hung server, a firewall black hole)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args) -> None:
        pass


def test_probe_answers_refuses_and_times_out(silent_uri: str, tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert probe(f"http://127.0.0.1:{server.server_address[1]}", 3) is None
    finally:
        server.shutdown()
        server.server_close()
    assert "Refused" in probe(f"http://127.0.0.1:{_free_port()}", 3)
    started = time.time()
    assert "timed out" in probe(silent_uri, 0.5)
    assert time.time() - started < 2
    assert probe(f"sqlite:///{tmp_path}/new/dir/mlflow.db", 1) is None  # created on first use


def test_validate_exits_2_naming_tracking_uri(engine_defaults: Path, silent_uri: str) -> None:
    started = time.time()
    proc = cli("validate", "--defaults", str(engine_defaults), "tracking.enabled=true",
               f"tracking.uri={silent_uri}", "tracking.probe_timeout_s=1")
    assert proc.returncode == 2, proc.stderr
    assert f"tracking.uri={silent_uri} does not answer within 1 s" in proc.stderr
    assert "tracking.required=false" in proc.stderr and "Traceback" not in proc.stderr
    assert time.time() - started < 60  # interpreter start-up on a loaded box; the probe itself: 1 s
    ok = cli("validate", "--defaults", str(engine_defaults), "tracking.enabled=true",
             f"tracking.uri={silent_uri}", "tracking.probe_timeout_s=1", "tracking.required=false")
    assert ok.returncode == 0 and "running without tracking" in ok.stderr


def test_run_with_a_dead_uri_fails_before_any_stage(engine_defaults: Path, tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{_free_port()}"
    cfg = load_config(None, ["tracking.enabled=true", f"tracking.uri={uri}"], defaults=engine_defaults)
    started = time.time()
    with pytest.raises(PipelineError, match=f"tracking.uri={uri} does not answer"):
        run_pipeline(cfg, runner="local")
    assert time.time() - started < 10
    assert not (tmp_path / "runs" / "calls.log").exists()  # no stage ran
    proc = cli("run", "--defaults", str(engine_defaults), "tracking.enabled=true", f"tracking.uri={uri}")
    assert proc.returncode == 2 and f"tracking.uri={uri}" in proc.stderr, proc.stderr


def test_best_effort_tracking_warns_and_runs(engine_defaults: Path, tmp_path: Path, silent_uri: str,
                                             capsys: pytest.CaptureFixture) -> None:
    cfg = load_config(None, ["tracking.enabled=true", f"tracking.uri={silent_uri}", "tracking.required=false",
                             "tracking.probe_timeout_s=1"], defaults=engine_defaults)
    result = run_pipeline(cfg, runner="local")
    assert result.summary["status"] == "done" and result.summary["mlflow"]["run_id"] is None
    assert "running without tracking (tracking.required=false)" in capsys.readouterr().err


@pytest.mark.slow
def test_server_dies_mid_run_then_track_replays(engine_defaults: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    cfg = load_config(None, ["tracking.enabled=true", f"tracking.uri={uri}"], defaults=engine_defaults)

    class KillServer:  # the server answers the probe, then dies as the run starts
        def on_run_start(self, run) -> None:
            server.shutdown()
            server.server_close()

    started = time.time()
    result = run_pipeline(cfg, runner="local", hooks=[KillServer()])
    assert time.time() - started < 60  # MLflow's client gives up in seconds, not minutes
    assert result.summary["status"] == "done"
    assert "MLflow tracking disabled" in capsys.readouterr().err
    assert result.summary["stages"]["combine"]["metrics"]["sum"] == 30.0  # kept in summary.json
    assert '"loss"' in (result.run_dir / "events" / "combine.jsonl").read_text()  # and the curve in events
    store = f"sqlite:///{tmp_path}/replayed.db"
    proc = cli("track", str(result.run_dir), "--uri", store)
    assert proc.returncode == 0, proc.stderr
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert parent.data.tags["pipeline.replayed"] == "true" and parent.info.status == "FINISHED"
    assert parent.data.metrics["combine.sum"] == 30.0 and parent.data.params["source.n"] == "4"
    assert set(children) == {"source", "scale", "combine"}
    curve = MlflowClient(store).get_metric_history(children["combine"].info.run_id, "loss")
    assert [m.step for m in curve] == [0, 1, 2]
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["mlflow"] == {"tracking_uri": store, "run_id": parent.info.run_id, "replayed": True}


def test_database_is_locked_is_retried(engine_defaults: Path, tmp_path: Path) -> None:
    db = tmp_path / "contended.db"
    sqlite3.connect(db).execute("create table t (x int)").connection.commit()
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("begin exclusive")  # another run's long write transaction
    threading.Timer(1.0, lambda: holder.execute("commit")).start()

    def write() -> None:
        with sqlite3.connect(db, timeout=0.05) as conn:  # raises "database is locked" while held
            conn.execute("insert into t values (1)")

    hook = MlflowHook(load_config(None, ["tracking.enabled=true"], defaults=engine_defaults))
    hook._guard(write)
    assert hook.locked_retries >= 1 and not hook.broken
    assert sqlite3.connect(db).execute("select count(*) from t").fetchone() == (1,)
