"""MLflow tracking as runner hooks: a parent run per pipeline run, a nested run per stage.

The hook logs the flattened resolved config as params and `config.yaml` as an artifact (re-logging
a param with a new value raises in MLflow, the artifact always holds the truth), each stage's
`ctx.log_metrics` events and manifest `metrics` (also on the parent as `<stage>.<metric>`), files a
stage asks to log, and `summary.json`. The default store is SQLite under `run.root` — MLflow 3
refuses the plain file store — with artifacts beside it in `mlartifacts/`. Stages never import
MLflow; a training stage may hand `ctx.tracking_uri` and `ctx.mlflow_run_id` to Lightning's
`MLFlowLogger(tracking_uri=..., run_id=...)` so its curves land in the stage's own run.
"""
from __future__ import annotations

import math
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.state import RunInfo, StageState

MAX_PARAM_CHARS = 6000
LOCKED_RETRIES = 8
"""Attempts of a tracking call that SQLite refuses with "database is locked" (concurrent runs)."""
HTTP_CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
"""MLflow's HTTP client defaults retry for minutes (measured: 249 s against a dead URI); a server that
dies mid-run should cost seconds, then the run goes on untracked (`pipeline track` replays later).
Set only where the environment does not set them."""
FIGURE_SUFFIXES = {".png", ".svg", ".pdf", ".md", ".csv"}
"""Manifest artifacts logged to the stage's MLflow run when they are files under 5 MiB."""


def default_tracking_uri(root: str | Path) -> str:
    """`sqlite:///<root>/mlflow.db` with `root` made absolute (the UI and workers may run elsewhere)."""
    return f"sqlite:///{Path(root).resolve()}/mlflow.db"


def tracking_uri(cfg: PipelineConfig) -> str:
    """The run's tracking URI: `tracking.uri`, else the SQLite store under `run.root`."""
    return cfg.tracking.uri or default_tracking_uri(cfg.run.root)


class TrackingUnavailable(RuntimeError):
    """`tracking.uri` did not answer the probe."""


def probe(uri: str, timeout_s: float) -> str | None:
    """Why `uri` cannot be tracked to (None: it answers), found within `timeout_s` seconds.

    http(s): any HTTP answer to `GET <uri>/health` counts (an MLflow server says OK; a proxy's 404
    still proves something listens). sqlite: the database file, or the nearest existing directory it
    would be created in, is writable. Other schemes (databricks, file, ...) are not probed.
    """
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
        except urllib.error.HTTPError:
            return None
        except (OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            return f"{type(reason).__name__}: {reason}"
        return None
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        target = path if path.exists() else next((p for p in path.parents if p.exists()), Path("/"))
        if not os.access(target, os.W_OK):
            return f"{target} is not writable"
    return None


def check_tracking(cfg: PipelineConfig, warn: Any = None) -> bool:
    """Probe the run's tracking URI: True when it answers. When it does not: raise
    `TrackingUnavailable` naming `tracking.uri` if `tracking.required`, else warn and return False."""
    uri = tracking_uri(cfg)
    reason = probe(uri, cfg.tracking.probe_timeout_s)
    if reason is None:
        return True
    text = (f"tracking.uri={uri} does not answer within {cfg.tracking.probe_timeout_s:g} s ({reason})")
    if cfg.tracking.required:
        raise TrackingUnavailable(f"{text}; fix tracking.uri, run with --no-track, or set "
                                  "tracking.required=false to run without tracking")
    (warn or (lambda m: print(m, file=sys.stderr)))(
        f"warning: {text}; running without tracking (tracking.required=false): metrics stay in the "
        "run's summary.json and events/, `python -m pipeline track RUN_DIR` logs them later")
    return False


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as `{"a.b.c": leaf}` (lists stay leaves)."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite-or-NaN scalar leaves of a (nested) metrics dict, as floats."""
    out = {}
    for key, value in flatten(metrics).items():
        if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isinf(value)):
            out[key] = float(value)
    return out


class MlflowHook:
    """Runner hooks that mirror a pipeline run into MLflow."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.uri = tracking_uri(cfg)
        self.artifact_root = (Path(cfg.run.root).resolve() / "mlartifacts").as_uri()
        self.client: Any = None
        self.broken = False
        self.pending: dict[str, list[str]] = {}
        self.parent_metrics: dict[str, float] = {}  # cached stages' metrics, logged once at run end
        self.locked_retries = 0  # tracking calls retried after SQLite's "database is locked"
        if self.uri.startswith(("http://", "https://")):
            for var, value in HTTP_CLIENT_ENV.items():
                os.environ.setdefault(var, value)

    def _guard(self, fn: Any, *args: Any) -> None:
        """Tracking must not kill a long run: warn once and stop tracking."""
        if self.broken:
            return
        for attempt in range(LOCKED_RETRIES):
            try:
                fn(*args)
                return
            except Exception as err:
                if "database is locked" in str(err) and attempt + 1 < LOCKED_RETRIES:
                    self.locked_retries += 1  # another run writes the same SQLite store: wait, retry
                    time.sleep(min(0.2 * 2 ** attempt, 5.0))
                    continue
                self.broken = True
                print(f"warning: MLflow tracking disabled after an error: {type(err).__name__}: {err}; "
                      "the run goes on, its metrics stay in summary.json and events/, and "
                      "`python -m pipeline track RUN_DIR` logs them to MLflow later", file=sys.stderr)
                return

    def _log(self, run_id: str, metrics: dict[str, float] | None = None, params: dict[str, Any] | None = None,
             step: int | None = None) -> None:
        from mlflow.entities import Metric, Param
        now = int(time.time() * 1000)
        ms = [Metric(k, v, now, step or 0) for k, v in (metrics or {}).items()]
        ps = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in (params or {}).items()]
        for i in range(0, max(len(ms), len(ps)), 100):  # MLflow's batch limits
            self.client.log_batch(run_id, metrics=ms[i:i + 100], params=ps[i:i + 100])

    def on_run_start(self, run: "RunInfo") -> None:
        self._guard(self._start, run)

    def _start(self, run: "RunInfo") -> None:
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient(tracking_uri=self.uri)
        name = self.cfg.tracking.experiment
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(
            name, artifact_location=self.artifact_root)
        parent = self.client.create_run(exp_id, run_name=run.run_dir.name, tags={
            "pipeline.name": self.cfg.name, "pipeline.run_dir": str(run.run_dir),
            "pipeline.sources": " ".join(self.cfg.sources)[:5000], "pipeline.runner": run.runner,
            "pipeline.cache_only": str(run.cache_only).lower()})
        self.exp_id = exp_id
        run.tracking_uri, run.mlflow_run_id = self.uri, parent.info.run_id
        self._log(parent.info.run_id, params=flatten(self.cfg.resolved))
        config = run.run_dir / "config.yaml"
        if config.exists():
            self.client.log_artifact(parent.info.run_id, str(config))

    def on_stage_start(self, run: "RunInfo", st: "StageState") -> None:
        self._guard(self._stage_start, run, st)

    def _stage_start(self, run: "RunInfo", st: "StageState") -> None:
        stage = self.cfg.stages[st.name]
        tags = {"mlflow.parentRunId": run.mlflow_run_id, "pipeline.stage": st.name,
                "pipeline.cache_key": st.key, "pipeline.code_version": stage.code_version}
        cached = st.status == "cached"
        if cached:  # its outcome is known already: record it in as few SQLite writes as possible
            tags["pipeline.status"] = st.status
        child = self.client.create_run(self.exp_id, run_name=st.name, tags=tags)
        st.mlflow_run_id = child.info.run_id
        params = {f"{stage.section}.{k}": v for k, v in flatten(stage.config).items()}
        params.update({f"resources.{k}": v for k, v in flatten(self.cfg.resolved["graph"][st.name]).items()})
        metrics = numeric(st.metrics) if cached else {}
        self._log(child.info.run_id, metrics=metrics, params=params)
        self.parent_metrics.update({f"{st.name}.{k}": v for k, v in metrics.items()})

    def on_stage_event(self, run: "RunInfo", st: "StageState", event: dict[str, Any]) -> None:
        self._guard(self._event, st, event)

    def _event(self, st: "StageState", event: dict[str, Any]) -> None:
        if st.mlflow_run_id is None:
            return
        if event.get("kind") == "metrics":
            self._log(st.mlflow_run_id, metrics=numeric(event.get("metrics", {})), step=event.get("step"))
        elif event.get("kind") == "artifact":
            if Path(event["path"]).is_file():
                self.client.log_artifact(st.mlflow_run_id, event["path"])
            else:  # inside the artifact directory, which exists once the stage has finished
                self.pending.setdefault(st.name, []).append(event["path"])

    def on_stage_end(self, run: "RunInfo", st: "StageState") -> None:
        self._guard(self._stage_end, run, st)

    def _stage_end(self, run: "RunInfo", st: "StageState") -> None:
        if st.mlflow_run_id is None:
            return
        if st.status == "cached":  # params, metrics and tags went in with `_stage_start`
            self.client.set_terminated(st.mlflow_run_id, "FINISHED")
            return
        metrics = numeric(st.metrics)
        self._log(st.mlflow_run_id, metrics=metrics)
        self._log(run.mlflow_run_id, metrics={f"{st.name}.{k}": v for k, v in metrics.items()})
        for path in self.pending.pop(st.name, []) + self._figures(st):
            if Path(path).is_file():
                self.client.log_artifact(st.mlflow_run_id, path)
        self.client.set_tag(st.mlflow_run_id, "pipeline.status", st.status)
        if st.error:
            self.client.set_tag(st.mlflow_run_id, "pipeline.error", st.error[:5000])
        self.client.set_terminated(st.mlflow_run_id, "FAILED" if st.status == "failed" else "FINISHED")

    @staticmethod
    def _figures(st: "StageState") -> list[str]:
        """Small human-readable files named in the manifest's `artifacts` (plots, tables, cards)."""
        if st.status != "done":
            return []
        out = []
        for value in flatten((st.manifest or {}).get("artifacts") or {}).values():
            path = Path(str(value))
            if path.suffix in FIGURE_SUFFIXES and path.is_file() and path.stat().st_size < 5 * 2**20:
                out.append(str(path))
        return out

    def on_run_end(self, run: "RunInfo", summary: dict[str, Any]) -> None:
        self._guard(self._end, run)

    def _end(self, run: "RunInfo") -> None:
        if run.mlflow_run_id is None:
            return
        if self.parent_metrics:
            self._log(run.mlflow_run_id, metrics=self.parent_metrics)
            self.parent_metrics = {}
        for st in run.states.values():  # stages cut short by an interrupt
            if st.status == "interrupted" and st.mlflow_run_id:
                self.client.set_terminated(st.mlflow_run_id, "KILLED")
        summary = run.run_dir / "summary.json"
        if summary.exists():
            self.client.log_artifact(run.mlflow_run_id, str(summary))
        status = {"done": "FINISHED", "failed": "FAILED"}.get(run.status, "KILLED")
        self.client.set_tag(run.mlflow_run_id, "pipeline.status", run.status)
        self.client.set_terminated(run.mlflow_run_id, status)
