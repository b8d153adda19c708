"""Worker faults under Ray Train: `train.max_failures` restarts a worker group one of whose workers
was SIGKILLed, from the last checkpoint on storage, at the exact sample, and the run ends where an
uninterrupted one does.

Two CPU workers (DDP over gloo) train a tiny next-token model on token shards through
`ShardLoaders` (each worker its own `RowSampler` part). In the faulted run, rank 1 stops before
step 3, and once Ray Train has registered the checkpoint of step 2 the test process kills it with
SIGKILL. (A worker killed before the controller has polled a checkpoint's report loses that
checkpoint: the group then restarts from the one before, or from scratch.) The training is
deterministic (fixed data order, SGD, no dropout), so every reported loss, the final one included,
must equal an uninterrupted run's (the same steps in this process) up to float noise, which it can
only do if the restart resumed the weights, the optimizer and the data cursor of step 2.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow]

VOCAB, SEQ, BLOCK, ROWS, STEPS = 32, 16, 8, 64, 6
KILL_BEFORE_STEP = 3


def make_module(marker_dir: str):
    """A tiny next-token LM that records each (re)start's step and, in the faulted run, parks
    rank 1 before `KILL_BEFORE_STEP` until the test kills it (only once: `killed` marks it done)."""
    import pytorch_lightning as pl

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = torch.nn.Embedding(VOCAB, 16)
            self.out = torch.nn.Linear(16, VOCAB)

        def on_train_start(self):
            with open(Path(marker_dir) / f"starts-{self.global_rank}", "a") as f:
                f.write(f"{self.global_step}\n")

        def training_step(self, batch, batch_idx):
            ids = batch[0]
            markers = Path(marker_dir)
            if (self.global_rank == 1 and self.global_step == KILL_BEFORE_STEP - 1
                    and (markers / "fault").exists() and not (markers / "killed").exists()):
                (markers / "parked.tmp").write_text(str(os.getpid()))
                os.replace(markers / "parked.tmp", markers / "parked")
                time.sleep(600)  # killed here
            logits = self.out(self.emb(ids[:, :-1]))
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
            self.log("loss", loss, sync_dist=True, on_step=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    return Tiny()


@pytest.fixture(scope="module")
def local_ray():
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not importable there
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def _shards(path: Path):
    from stages.data.rows import ShardRows
    from stages.data.token_shards import ShardWriter, TokenShards

    rng = np.random.default_rng(0)
    with ShardWriter(path, SEQ, VOCAB, shard_tokens=SEQ * 16) as w:  # 4 shards
        for _ in range(ROWS):
            start = int(rng.integers(0, VOCAB))
            w.add((start + np.arange(SEQ)) % VOCAB)  # learnable: each token is the last + 1
    return ShardRows(TokenShards(path), "all", pad_id=-1)


def _run_with_a_kill(tmp_path: Path, name: str, strategy: str = "ddp"):
    from functools import partial

    from stages.data.rows import ShardLoaders
    from stages.train_denoiser import Config as TrainConfig
    from stages.training.train_distributed import config_from_train, fit_distributed

    markers = tmp_path / f"{name}-markers"
    markers.mkdir()
    (markers / "fault").touch()
    rows = _shards(tmp_path / f"{name}-shards")
    train = TrainConfig(max_steps=STEPS, batch_size=4, checkpoint_every=2, accelerator="cpu", max_failures=1,
                        strategy=strategy,
                        grad_clip=0.0, progress_bar=False)
    cfg = config_from_train(train, storage_path=str(tmp_path / "root"), name=name, num_workers=2)
    assert cfg.max_failures == 1

    def checkpointed_steps() -> list[int]:
        """Steps of the checkpoints Ray Train's controller has registered (its snapshot file):
        a checkpoint is only handed to a restarted group once the controller has polled it."""
        snapshot = tmp_path / "root" / name / "checkpoint_manager_snapshot.json"
        try:
            results = json.loads(snapshot.read_text())["checkpoint_results"]
        except (OSError, ValueError, KeyError):
            return []
        return [int(r["metrics"]["step"]) for r in results]

    def killer():
        parked = markers / "parked"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (parked.exists()
                                                   and KILL_BEFORE_STEP - 1 in checkpointed_steps()):
            time.sleep(0.2)
        if parked.exists():
            (markers / "killed").touch()  # the restarted worker must not park again
            os.kill(int(parked.read_text()), signal.SIGKILL)

    threading.Thread(target=killer, daemon=True).start()
    result = fit_distributed(partial(make_module, str(markers)),
                             ShardLoaders(rows, rows, BLOCK, batch_size=4, seed=1), cfg)
    starts = {r: [int(x) for x in (markers / f"starts-{r}").read_text().split()] for r in (0, 1)}
    return result, starts, (markers / "killed").exists()


def uninterrupted_losses(rows) -> list[float]:
    """The same training without Ray, in this process: DDP over 2 equal halves averages the two
    ranks' mean losses and gradients, i.e. one model on both ranks' batches of each step."""
    from stages.data.row_sampler import RowSampler

    module = make_module(os.devnull + "-unused")
    opt = module.configure_optimizers()
    ranks = [RowSampler(len(rows), 4, seed=1, rank=r, world_size=2).epoch_batches(0) for r in (0, 1)]
    out = []
    for step in range(STEPS):
        ids = torch.stack([rows[int(i)][0] for r in ranks for i in r[step]])
        logits = module.out(module.emb(ids[:, :-1]))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        out.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_sigkilled_worker_restarts_from_checkpoint_and_matches_uninterrupted(local_ray, tmp_path, strategy):
    """Under DDP (a whole checkpoint from rank 0) and FSDP2 (one shard per rank, merged by Ray Train)."""
    faulted, starts, killed = _run_with_a_kill(tmp_path, "faulted", strategy)
    assert killed, "rank 1 never reached the step where it is killed"
    assert starts == {0: [0, 2], 1: [0, 2]}  # the worker group restarted from the step-2 checkpoint
    # and the driver's result admits it: one restart, resumed from step 2 (what the summary reports)
    assert [s["resumed_from_step"] for s in faulted.starts] == [0, 2] and faulted.restarts == 1
    expected = uninterrupted_losses(_shards(tmp_path / "reference-shards"))
    assert faulted.history[-1]["step"] == STEPS
    by_step = {int(r["step"]): r["loss"] for r in faulted.history}
    assert by_step == pytest.approx({s: expected[s - 1] for s in (2, 4, 6)}, abs=1e-5)
    assert expected[-1] < expected[0]  # it learned something
