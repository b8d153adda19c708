"""A NaN in `train_denoiser` through the real CLI, then `run --resume RUN_DIR train.lr=<lower>`.

`python -m pipeline run recipes/tiny.yaml` with the tiny budgets of `test_e2e_tiny` (the decoding
stages removed: they add nothing here) and `PIPELINE_FAULT_NONFINITE=grad@3`: training stops at
optimizer step 3 with exit status 1, naming the step and the `last.ckpt` of step 2. The resume,
without the fault and at a lower LR, takes every upstream stage from the cache, continues training
from step 2 with the new LR, and `resume.json` records the change.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli
from test_e2e_tiny import TINY_BUDGET

from stages.training.finite_guard import FAULT_ENV

RUN = [*TINY_BUDGET, "train.max_steps=4", "train.checkpoint_every=2", "~graph.calibrate_gamma",
       "~graph.evaluate", "~graph.export", "--runner", "local", "--quiet", "--no-track"]


@pytest.mark.slow
def test_nan_fails_the_run_and_resume_with_a_lower_lr_continues_from_the_last_good_checkpoint(tmp_path):
    import torch

    root = tmp_path / "runs"
    failed = cli("run", "recipes/tiny.yaml", f"run.root={root}", *RUN, env={FAULT_ENV: "grad@3"})
    assert failed.returncode == 1, failed.stderr[-3000:]
    failed_dir = (root / "latest").resolve()
    key = json.loads((failed_dir / "summary.json").read_text())["stages"]["train_denoiser"]["cache_key"]
    last = root.resolve() / "work" / "train_denoiser" / key / "checkpoints" / "last.ckpt"
    assert ("stage 'train_denoiser' failed: NonFiniteError: non-finite gradient norm (nan) at optimizer "
            "step 3") in failed.stderr, failed.stderr[-3000:]
    assert f"Last good checkpoint: {last}." in failed.stderr
    assert torch.load(str(last), map_location="cpu", weights_only=False)["global_step"] == 2

    resumed = cli("run", "--resume", str(failed_dir), "train.lr=1e-4", "--runner", "local", "--quiet",
                  "--no-track")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run_dir = Path(resumed.stdout.strip().splitlines()[-1])
    stages = json.loads((run_dir / "summary.json").read_text())["stages"]
    assert {n: s["status"] for n, s in stages.items()} == {
        "prepare_data": "cached", "pretrain_backbone": "cached", "duplicate_backbone": "cached",
        "freeze_context": "cached", "attach_conditioning": "cached", "train_denoiser": "done"}
    metrics = stages["train_denoiser"]["metrics"]
    assert metrics["resumed_from_step"] == 2 and metrics["steps"] == 4
    assert metrics["resumed_lr_was"] == pytest.approx(2e-3)  # the recipe's LR, in the checkpoint
    record = json.loads((run_dir / "resume.json").read_text())
    assert record["resumed_run"] == str(failed_dir) and record["overrides"] == ["train.lr=1e-4"]
    assert record["changes"] == {"train.lr": {"old": 2e-3, "new": 1e-4}}
    new_work = root.resolve() / "work" / "train_denoiser" / stages["train_denoiser"]["cache_key"]
    assert record["carried_checkpoints"]["train_denoiser"]["to"] == str(new_work)
    ckpt = torch.load(str(new_work / "checkpoints" / "last.ckpt"), map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4 and ckpt["lr_schedulers"][0]["base_lrs"] == [pytest.approx(1e-4)]
