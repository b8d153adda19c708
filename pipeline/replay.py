"""Log a finished (or broken-off) run to MLflow after the fact: `python -m pipeline track RUN_DIR`.

A run whose tracking server was down (`tracking.required=false`) or died mid-run goes on untracked;
everything MLflow would have received is still in its run directory: the resolved `config.yaml`,
`summary.json` (statuses, durations, manifest metrics), `stages/<name>.json` (manifests) and
`events/<name>.jsonl` (the `ctx.log_metrics` curves and logged artifacts). Replaying feeds those to
the same `MlflowHook` the live run uses, so the replayed parent and nested runs have the same
params, metrics, curves and artifacts as a tracked run (tagged `pipeline.replayed=true`).
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import load_config
from pipeline.rundir import EventTail
from pipeline.state import RunInfo, StageState
from pipeline.store import write_json_atomic
from pipeline.tracking import MlflowHook, TrackingUnavailable, check_tracking


def replay(run_dir: str | Path, uri: str | None = None) -> str:
    """Log `run_dir` to `uri` (default: the run's own `tracking.uri`); returns the parent MLflow run id.

    Raises `TrackingUnavailable` when the URI does not answer or a tracking call fails."""
    run_dir = Path(run_dir).resolve()
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"no summary.json in {run_dir}: not a run directory")
    summary = json.loads(summary_path.read_text())
    overrides = ["tracking.enabled=true", "tracking.required=true"] + ([f"tracking.uri={uri}"] if uri else [])
    cfg = load_config(None, overrides, defaults=run_dir / "config.yaml")
    cfg.name = summary.get("name") or cfg.name
    check_tracking(cfg)
    states = {}
    for name, entry in summary["stages"].items():
        manifest = run_dir / "stages" / f"{name}.json"
        states[name] = StageState(name=name, key=entry["cache_key"], status=entry["status"],
                                  duration_s=entry.get("duration_s", 0.0), attempts=entry.get("attempts", 0),
                                  manifest=json.loads(manifest.read_text()) if manifest.is_file() else None,
                                  artifact_dir=entry.get("artifact_dir"), error=entry.get("error"))
    run = RunInfo(cfg=cfg, run_dir=run_dir, states=states, status=summary.get("status", "done"),
                  runner=(cfg.resolved.get("run") or {}).get("runner", "local"))
    hook = MlflowHook(cfg)
    hook.on_run_start(run)
    for st in states.values():
        if st.status in ("pending", "skipped", "waiting"):
            continue  # never started: nothing to log
        hook.on_stage_start(run, st)
        for event in EventTail(run_dir / "events" / f"{st.name}.jsonl").read():
            hook.on_stage_event(run, st, event)
        hook.on_stage_end(run, st)
    if run.mlflow_run_id is not None and not hook.broken:
        hook._guard(hook.client.set_tag, run.mlflow_run_id, "pipeline.replayed", "true")
    hook.on_run_end(run, summary)
    if hook.broken or run.mlflow_run_id is None:
        raise TrackingUnavailable(f"replaying {run_dir} to {hook.uri} failed (see the warning above)")
    summary["mlflow"] = {"tracking_uri": hook.uri, "run_id": run.mlflow_run_id, "replayed": True}
    for name, st in states.items():
        if st.mlflow_run_id:
            summary["stages"][name]["mlflow_run_id"] = st.mlflow_run_id
    write_json_atomic(summary_path, summary)
    return run.mlflow_run_id
