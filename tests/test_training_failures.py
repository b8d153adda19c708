"""Training failures of `train_denoiser` on a tiny real backbone (real Lightning, no engine):
a NaN injected at a chosen step stops training naming the step and the last good checkpoint, never
saving a non-finite `last.ckpt`; a resume with a lower `train.lr` continues from that checkpoint at
the new LR; a corrupt checkpoint is detected by its sha256 sidecar, named, and training starts over.
The same NaN on the multi-worker path (2 Ray Train workers, DDP over gloo) fails the stage naming the
step and the last checkpoint Ray Train persisted, the fault forwarded to workers that did not inherit it.
The CLI round trip (fail, then `run --resume RUN_DIR train.lr=...`): tests/test_pipeline_nan_resume.py.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_stages_fixtures import BLOCK, make_ctx, tiny_backbone, tiny_data

from stages import attach_conditioning as A
from stages import duplicate_backbone as D
from stages import freeze_context as F
from stages import train_denoiser as T
from stages.training.checkpoint_io import checkpoint_problem, sidecar
from stages.training.finite_guard import FAULT_ENV, NonFiniteError, parse_fault
from stages.training.optimisation import checkpoint_step

TRAIN = dict(max_steps=4, batch_size=8, val_every=0, val_batches=0, checkpoint_every=2, progress_bar=False,
             num_threads=1, warmup_steps=1)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("trainfail")
    bb = tiny_backbone(root / "backbone")
    m = {"prepare_data": tiny_data(root / "data", bb), "pretrain_backbone": {"artifacts": {"model": str(bb)}}}
    m["duplicate_backbone"] = D.run(D.Config(), m, make_ctx(root, "dup"))
    m["freeze_context"] = F.run(F.Config(), {"duplicate_backbone": m["duplicate_backbone"]}, make_ctx(root, "freeze"))
    m["attach_conditioning"] = A.run(A.Config(block_size=BLOCK), {"freeze_context": m["freeze_context"]},
                                     make_ctx(root, "attach"))
    return m


def _all_finite(ckpt: Path) -> bool:
    sd = torch.load(str(ckpt), map_location="cpu", weights_only=False)["state_dict"]
    return all(bool(torch.isfinite(t).all()) for t in sd.values() if torch.is_floating_point(t))


def test_fault_spec_is_checked() -> None:
    assert parse_fault("grad@3") == ("grad", 3) and parse_fault(None) is None
    with pytest.raises(ValueError, match=FAULT_ENV):
        parse_fault("bias@x")


def test_nan_gradient_stops_at_the_step_and_resume_with_lower_lr_continues(inputs, tmp_path, monkeypatch):
    ctx = make_ctx(tmp_path, "train")
    last = Path(ctx.work_dir) / "checkpoints" / "last.ckpt"
    monkeypatch.setenv(FAULT_ENV, "grad@3")
    with pytest.raises(NonFiniteError, match=rf"non-finite gradient norm \(nan\) at optimizer step 3; .*"
                                             rf"Last good checkpoint: {last}"):
        T.run(T.Config(**TRAIN), inputs, ctx)
    assert checkpoint_step(last) == 2 and _all_finite(last) and checkpoint_problem(last) is None
    monkeypatch.delenv(FAULT_ENV)
    out = T.run(T.Config(**{**TRAIN, "lr": 1e-4}), inputs, ctx)  # the same work dir: a resume
    assert out["metrics"]["resumed_from_step"] == 2 and out["metrics"]["steps"] == 4
    assert out["metrics"]["resumed_lr_was"] == pytest.approx(1e-3)  # the checkpoint's LR, replaced
    ckpt = torch.load(str(last), map_location="cpu", weights_only=False)
    assert ckpt["lr_schedulers"][0]["base_lrs"] == [pytest.approx(1e-4)]
    assert ckpt["optimizer_states"][0]["param_groups"][0]["initial_lr"] == pytest.approx(1e-4)


def test_nan_weights_are_never_saved_as_last(inputs, tmp_path, monkeypatch):
    ctx = make_ctx(tmp_path, "train")
    monkeypatch.setenv(FAULT_ENV, "weights@1")  # weights NaN after step 1; a checkpoint is due at step 2
    with pytest.raises(NonFiniteError, match=r"non-finite weight `.*` in the checkpoint to save .* step 2; .*"
                                             r"Last good checkpoint: none"):
        T.run(T.Config(**TRAIN), inputs, ctx)
    assert not list((Path(ctx.work_dir) / "checkpoints").glob("*.ckpt"))


def test_nan_loss_names_the_step(inputs, tmp_path, monkeypatch):
    ctx = make_ctx(tmp_path, "train")
    monkeypatch.setenv(FAULT_ENV, "loss@2")
    with pytest.raises(NonFiniteError, match=r"non-finite loss \(nan\) at optimizer step 2"):
        T.run(T.Config(**TRAIN), inputs, ctx)


def test_corrupt_checkpoint_is_named_and_training_starts_over(inputs, tmp_path):
    events: list = []
    ctx = make_ctx(tmp_path, "train", events=events)
    T.run(T.Config(**{**TRAIN, "max_steps": 2}), inputs, ctx)
    last = Path(ctx.work_dir) / "checkpoints" / "last.ckpt"
    assert sidecar(last).is_file() and checkpoint_problem(last) is None
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0x01
    last.write_bytes(bytes(data))
    out = T.run(T.Config(**TRAIN), inputs, ctx)
    assert out["metrics"]["resumed_from_step"] == 0 and out["metrics"]["steps"] == 4
    warnings = [e["message"] for e in events if e["kind"] == "warning"]
    assert any(f"corrupt checkpoint, training starts over: {last}: sha256 mismatch" in w for w in warnings)
    assert last.with_name("last.ckpt.corrupt").exists() and checkpoint_problem(last) is None
    assert not math.isnan(out["metrics"].get("train_loss", 0.0))


CKPT_DISK_SCRIPT = """
import resource, signal, sys, torch
from pathlib import Path
from stages.training.checkpoint_io import make_checkpoint_io, checkpoint_problem
from pipeline.diskspace import disk_error, is_disk_error
io, path = make_checkpoint_io(), Path(sys.argv[1]) / "checkpoints" / "last.ckpt"
io.save_checkpoint({"state_dict": {"w": torch.zeros(16)}, "global_step": 2}, path)   # a good one first
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))   # then the disk is "full"
try:
    io.save_checkpoint({"state_dict": {"w": torch.zeros(1 << 20)}, "global_step": 4}, path)
except Exception as err:
    print("DISK", is_disk_error(err), disk_error(err, Path(sys.argv[1]) / "out", path.parent))
print("LEFT", sorted(p.name for p in path.parent.iterdir()))
print("GOOD", checkpoint_problem(path), torch.load(str(path), weights_only=False)["global_step"])
"""


def test_disk_full_while_checkpointing_keeps_the_last_good_checkpoint(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", CKPT_DISK_SCRIPT, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout
    assert "DISK True file size limit (ulimit -f) reached while writing" in out, out + proc.stderr
    assert "LEFT ['last.ckpt', 'last.ckpt.sha256']" in out  # no torn temporary file
    assert "GOOD None 2" in out  # the previous checkpoint is intact and still verifies


@pytest.mark.ray
@pytest.mark.slow
def test_nan_in_ray_train_workers_fails_naming_the_step_and_keeps_the_last_good_checkpoint(
        inputs, tmp_path, monkeypatch, ray_session):
    """The multi-worker path (`train.num_workers: 2`, DDP over gloo on 2 CPU Ray Train workers). The
    fault is set only after Ray started, so the workers see it only if the stage forwards it."""
    ctx = make_ctx(tmp_path, "train")
    monkeypatch.setenv(FAULT_ENV, "grad@3")
    cfg = T.Config(**{**TRAIN, "num_workers": 2, "accelerator": "cpu"})
    with pytest.raises(NonFiniteError) as failed:
        T.run(cfg, inputs, ctx)
    message = str(failed.value)
    assert "non-finite gradient norm (nan) at optimizer step 3" in message
    run_dir = Path(ctx.work_dir).resolve() / "distributed"
    saved = sorted(run_dir.glob("checkpoint_*/checkpoint.ckpt"))
    assert saved, list(run_dir.iterdir())
    assert f"Last good checkpoint: {saved[-1]} (optimizer step 2)" in message
    assert checkpoint_step(saved[-1]) == 2 and _all_finite(saved[-1])
    assert all(checkpoint_step(p) <= 2 for p in saved)  # the failing step was never reported
