"""The whole graph through the real CLI, under real Ray and MLflow, with a tiny budget.

`python -m pipeline run recipes/tiny.yaml` (pretrain_backbone prepended) with overrides that shrink
every stage to a few steps and a few prompts, in a fresh run root. Then it checks the user-facing
results: summary.json's stable keys, one MLflow parent run with a nested run per stage (training
curves in train_denoiser's), the export (reloads, generates in all three modes, mock_ar == ar), and
that an unchanged re-run comes entirely from the cache.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY_BUDGET = [
    "data.train_examples_per_task=40", "data.eval_examples_per_task=3", "data.seq_len=64",
    "pretrain.max_steps=3", "pretrain.hidden_size=32", "pretrain.intermediate_size=64",
    "pretrain.mamba_num_heads=2", "pretrain.mamba_head_dim=16", "pretrain.moe_intermediate_size=32",
    "pretrain.moe_shared_expert_intermediate_size=32", "pretrain.eval_every=100", "pretrain.eval_subset=2",
    "pretrain.batch_size=8", "pretrain.warmup_steps=1", "pretrain.num_threads=1",
    "train.max_steps=3", "train.max_minutes=null", "train.val_every=2", "train.val_batches=1",
    "train.checkpoint_every=2", "train.batch_size=8", "train.warmup_steps=1", "train.num_threads=1",
    "train.progress_bar=false",
    "calibrate.gammas=[0.7,0.9]", "calibrate.prompts_per_task=1", "calibrate.repeats=1",
    "calibrate.max_new_tokens=8", "calibrate.num_threads=1", "calibrate.batch_sizes=[1,4]",
    "calibrate.batch_rounds=1", "evaluate.mode_batches=[1,4]",
    "evaluate.prompts_per_task=1", "evaluate.repeats=1", "evaluate.max_new_tokens=8", "evaluate.num_threads=1",
    "export.verify_prompts=1", "export.max_new_tokens=8",
]
STAGES = ["prepare_data", "pretrain_backbone", "duplicate_backbone", "freeze_context", "attach_conditioning",
          "train_denoiser", "calibrate_gamma", "evaluate", "export"]


def _run(root: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", "recipes/tiny.yaml", f"run.root={root}",
                           *TINY_BUDGET], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return proc, time.perf_counter() - t0


def _summary(root: Path) -> dict:
    runs = sorted(p for p in root.iterdir() if p.is_dir() and (p / "summary.json").exists())
    return json.loads((runs[-1] / "summary.json").read_text())


@pytest.mark.ray
@pytest.mark.slow
def test_tiny_recipe_end_to_end_under_ray_and_mlflow(tmp_path):
    root = tmp_path / "runs"
    proc, seconds = _run(root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = _summary(root)
    assert summary["status"] in ("success", "done", "succeeded", "ok"), summary["status"]
    stages = summary["stages"]
    assert set(STAGES) <= set(stages)

    # summary.json's stable keys
    assert 0.0 < stages["calibrate_gamma"]["metrics"]["gamma"] <= 1.0
    ev = stages["evaluate"]["metrics"]
    for key in ("ar_quality", "diffusion_quality", "relative_quality", "speedup", "tokens_per_forward", "per_task"):
        assert key in ev, key
    assert len(ev["per_task"]) >= 5  # every synthetic family
    assert set(ev["modes"]) == {"1", "4"} and set(ev["modes"]["4"]) == {"ar", "diffusion", "verified", "auto"}
    assert ev["modes"]["4"]["verified"]["relative_quality"] == 1.0
    assert set(stages["calibrate_gamma"]["metrics"]) >= {"b1_verified_speedup", "b4_auto_speedup"}
    export_dir = Path(stages["export"]["metrics"]["path"])
    assert (export_dir / "config.json").exists() and (export_dir / "README.md").exists()
    assert stages["export"]["metrics"]["mock_ar_equals_ar"] == 1.0
    assert set(json.loads((export_dir / "generation_config.json").read_text())["auto_modes"]) == {"1", "4"}

    # MLflow: a parent run, a nested run per stage, training curves in train_denoiser's run
    import mlflow

    client = mlflow.MlflowClient(summary["mlflow"]["tracking_uri"])
    parent = summary["mlflow"]["run_id"]
    assert client.get_run(parent).info.status == "FINISHED"
    for name in STAGES:
        run = client.get_run(stages[name]["mlflow_run_id"])
        assert run.data.tags.get("mlflow.parentRunId") == parent, name
    train_metrics = client.get_run(stages["train_denoiser"]["mlflow_run_id"]).data.metrics
    assert "train/loss" in train_metrics and "val/elbo" in train_metrics
    assert "gamma" in client.get_run(stages["calibrate_gamma"]["mlflow_run_id"]).data.metrics

    # the export reloads and generates in all three modes, mock_ar == ar
    import torch
    from transformers import AutoTokenizer

    from twotower import TwoTowerForDiffusionLM

    model = TwoTowerForDiffusionLM.from_pretrained(export_dir)
    tok = AutoTokenizer.from_pretrained(export_dir)
    ids = torch.tensor([tok("copy abc=")["input_ids"]])
    seqs = {m: model.generate(ids, mode=m, gamma=0.9, max_new_tokens=8).sequences
            for m in ("diffusion", "mock_ar", "ar")}
    assert torch.equal(seqs["mock_ar"], seqs["ar"])

    # an unchanged re-run is served from the cache
    proc2, seconds2 = _run(root)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    again = _summary(root)
    assert all(again["stages"][s]["status"] == "cached"
               for s in STAGES), {s: again["stages"][s]["status"] for s in STAGES}
    assert again["stages"]["evaluate"]["metrics"] == ev
    print(f"first run {seconds:.1f}s, cached re-run {seconds2:.1f}s")
