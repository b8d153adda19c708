"""MLflow tracking hooks against a real SQLite store: a parent run per pipeline run, a nested run per
stage, params (flattened config), metrics (manifest and `ctx.log_metrics` curves) and artifacts, read
back through `mlflow.search_runs` and the client.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import StageFailed, load_config, run_pipeline


def test_mlflow_parent_and_nested_runs(engine_defaults: Path, tmp_path: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient
    cfg = load_config(None, ["tracking.enabled=true", "tracking.experiment=engine-test"],
                      defaults=engine_defaults)
    result = run_pipeline(cfg, runner="local")
    uri = f"sqlite:///{(tmp_path / 'runs').resolve()}/mlflow.db"
    assert result.summary["mlflow"]["tracking_uri"] == uri
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["engine-test"], output_format="list")
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(parent) == 1 and set(children) == {"source", "scale", "combine"}
    (parent,) = parent
    assert parent.info.run_id == result.summary["mlflow"]["run_id"] and parent.info.status == "FINISHED"
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children.values())
    assert parent.data.params["source.n"] == "4" and parent.data.params["graph.combine.retries"] == "2"
    assert parent.data.metrics["combine.sum"] == 30.0 and parent.data.metrics["combine.nested.first"] == 3.0
    combine = children["combine"]
    assert combine.data.params["combine.steps"] == "3" and combine.data.metrics["sum"] == 30.0
    client = MlflowClient(uri)
    curve = client.get_metric_history(combine.info.run_id, "loss")
    assert [m.step for m in curve] == [0, 1, 2] and curve[-1].value == pytest.approx(1 / 3)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "summary.json"} <= artifacts
    assert {"plot.svg", "table.csv"} <= {a.path for a in client.list_artifacts(combine.info.run_id)}
    # a second run: new parent, stages marked cached, the same metrics logged again
    run_pipeline(load_config(None, ["tracking.enabled=true", "tracking.experiment=engine-test"],
                             defaults=engine_defaults), runner="local")
    runs = mlflow.search_runs(experiment_names=["engine-test"], filter_string="tags.`pipeline.status` = 'cached'",
                              output_format="list")
    assert {r.info.run_name for r in runs} == {"source", "scale", "combine"}


def test_failed_stage_marks_runs_failed(engine_defaults: Path, tmp_path_factory: pytest.TempPathFactory
                                        ) -> None:
    import mlflow
    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/other.db"  # tracking.uri: a store elsewhere
    cfg = load_config(None, ["tracking.enabled=true", "combine.fail=true", f"tracking.uri={uri}"],
                      defaults=engine_defaults)
    with pytest.raises(StageFailed):
        run_pipeline(cfg, runner="local")
    mlflow.set_tracking_uri(uri)
    runs = {r.info.run_name: r for r in mlflow.search_runs(experiment_names=["twotower"], output_format="list")}
    assert runs["combine"].info.status == "FAILED"
    assert "combine exploded" in runs["combine"].data.tags["pipeline.error"]
    parent = [r for r in runs.values() if "mlflow.parentRunId" not in r.data.tags][0]
    assert parent.info.status == "FAILED"
