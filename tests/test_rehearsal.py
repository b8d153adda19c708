"""The CPU rehearsal of the shipped Nemotron-3-Nano recipe (recipes/rehearsal/cpu.yaml).

`python -m pipeline run recipes/nemotron_nano.yaml --overlay recipes/rehearsal/cpu.yaml` runs every
stage of the shipped recipe with its own graph, stage code and settings. The overlay may change only
four kinds of key — the backbone (shrunk, random init), the data (a local corpus), the hardware
(CPU workers, cpu/cpu placement, reservations) and the budgets — which the first test enforces; the
second (slow) runs it under real Ray and MLflow and checks what the tiny recipe's e2e test checks.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
RECIPE = "recipes/nemotron_nano.yaml"
OVERLAY = "recipes/rehearsal/cpu.yaml"
KINDS = {
    "backbone": [r"backbone\.random_init\..*", r"backbone\.dtype"],
    "data": [r"data\.(source|paths|tokenizer|seq_len|max_documents|eval_fraction|eval_prompt_tokens|"
             r"eval_answer_tokens)"],
    "hardware": [r"train\.(num_workers|gpus_per_worker|accelerator|strategy|precision)",
                 r"backbone\.(context_device|denoiser_device)", r"graph\.\w+\.resources\.\w+"],
    "budgets": [r"train\.(max_steps|warmup_steps|grad_accum|val_every|val_batches|checkpoint_every)",
                r"(calibrate|evaluate)\.(prompts_per_task|repeats|max_new_tokens|batch_sizes|batch_rounds|"
                r"mode_batches)", r"export\.(verify_prompts|max_new_tokens)"],
}
STAGES = ["prepare_data", "duplicate_backbone", "freeze_context", "attach_conditioning", "train_denoiser",
          "calibrate_gamma", "evaluate", "export"]


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1]


def test_the_overlay_changes_only_backbone_data_hardware_and_budgets():
    from pipeline.config import load_config

    overlay = yaml.safe_load((REPO / OVERLAY).read_text())
    allowed = [re.compile(p) for patterns in KINDS.values() for p in patterns]
    stray = [k for k in _leaves(overlay) if not any(p.fullmatch(k) for p in allowed)]
    assert not stray, f"{OVERLAY} sets keys beyond backbone/data/hardware/budgets: {stray}"
    shipped, rehearsal = load_config(RECIPE), load_config(RECIPE, overlays=[REPO / OVERLAY])
    assert list(rehearsal.stages) == list(shipped.stages) == STAGES  # the shipped graph, every stage
    assert ({n: s.spec.needs for n, s in rehearsal.stages.items()}
            == {n: s.spec.needs for n, s in shipped.stages.items()})
    assert {n: s.module for n, s in rehearsal.stages.items()} == {n: s.module for n, s in shipped.stages.items()}
    for section in ("twotower", "calibrate"):  # settings the overlay must not touch stay the recipe's
        same = {k: v for k, v in shipped.resolved[section].items() if k not in overlay.get(section, {})}
        assert same.items() <= rehearsal.resolved[section].items(), section


def test_a_swept_block_size_above_the_trained_one_is_a_config_error():
    """What the rehearsal's first run found (calibrate failing after training): now refused by validate."""
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"calibrate.block_sizes: \[32\] exceed twotower.block_size=16"):
        load_config(RECIPE, ["calibrate.block_sizes=[8,16,32]"])


@pytest.mark.ray
@pytest.mark.slow
def test_the_rehearsal_runs_every_stage_of_the_shipped_recipe(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "", "RUN_ROOT": str(tmp_path / "runs")}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", RECIPE, "--overlay", OVERLAY, "--quiet"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    summary = json.loads((run_dir / "summary.json").read_text())
    stages = summary["stages"]
    assert set(STAGES) <= set(stages) and all(stages[s]["status"] == "done" or stages[s]["status"] == "success"
                                              or stages[s]["status"] == "ok" for s in STAGES), \
        {s: stages[s]["status"] for s in STAGES}
    dup, train = stages["duplicate_backbone"]["metrics"], stages["train_denoiser"]["metrics"]
    assert dup["n_sublayers"] == 52 and "random init" in dup["source_checkpoint"]
    assert (train["world_size"], train["gpus"], train["steps"]) == (2, 0, 4)
    # the Nano recipe's sharded path ran: FSDP2 wrote one checkpoint shard per worker
    shards = sorted(p.name for p in (tmp_path / "runs").rglob("*.distcp"))
    assert shards and set(shards) == {"__0_0.distcp", "__1_0.distcp"}, shards
    assert (train["restarts"], train["resumed_from_step"]) == (0, 0)
    assert 0.0 < stages["calibrate_gamma"]["metrics"]["gamma"] <= 1.0

    import mlflow

    client = mlflow.MlflowClient(summary["mlflow"]["tracking_uri"])
    parent = summary["mlflow"]["run_id"]
    assert client.get_run(parent).info.status == "FINISHED"
    for name in STAGES:
        assert client.get_run(stages[name]["mlflow_run_id"]).data.tags.get("mlflow.parentRunId") == parent, name
    assert client.get_run(stages["train_denoiser"]["mlflow_run_id"]).data.metrics["restarts"] == 0

    export_dir = Path(stages["export"]["metrics"]["path"])
    assert stages["export"]["metrics"]["mock_ar_equals_ar"] == 1.0
    from twotower import TwoTowerForDiffusionLM

    model = TwoTowerForDiffusionLM.from_pretrained(export_dir)
    assert len(model.layer_map()) == 52
    print(f"rehearsal: {seconds:.0f} s")
