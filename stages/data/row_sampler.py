"""The order in which training visits rows of a token-shard split: seeded, per epoch, split per
rank, resumable at the exact batch.

Why not torch's `DistributedSampler` + `shuffle=True`: after a restart Lightning restarts the epoch
from its first batch, so a resumed run sees the first batches of the epoch twice and never the
ones it missed. `RowSampler` keeps a cursor `(epoch, position)` of batches *trained on*
(advanced by `RowSamplerCheckpoint` after each training batch, not when the DataLoader prefetches)
and that cursor is saved in every Lightning checkpoint; a resumed run continues at the next
unseen batch.

Order: epoch `e` permutes all rows with `numpy.random.default_rng([seed, e])`; rank `r` of `w`
takes every `w`-th row of the permutation starting at `r` (the ranks' parts are disjoint), cut
into batches of `batch_size` (the tail shorter than a batch is dropped, so every rank has the same
number of batches and DDP's collectives stay in step).
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np


class RowSampler:
    """A batch sampler (yields lists of row indices) for one rank."""

    def __init__(self, n_rows: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.n_rows, self.batch_size, self.seed = n_rows, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = (n_rows // world_size) // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(f"train.batch_size={batch_size} x {world_size} workers needs at least "
                             f"{batch_size * world_size} training rows; the split has {n_rows}")
        self.epoch = 0
        self.position = 0

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """[batches_per_epoch, batch_size] row indices of this rank in `epoch`."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
        mine = order[self.rank: (self.n_rows // self.world_size) * self.world_size: self.world_size]
        return mine[: self.batches_per_epoch * self.batch_size].reshape(self.batches_per_epoch, self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        """The rest of the current epoch, from the cursor (the whole epoch when it is at 0)."""
        batches = self.epoch_batches(self.epoch)
        for b in batches[self.position:]:
            yield b.tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch

    def advance(self, batches: int = 1) -> None:
        """Move the cursor past `batches` trained batches (rolling over to the next epoch)."""
        total = self.epoch * self.batches_per_epoch + self.position + batches
        self.epoch, self.position = divmod(total, self.batches_per_epoch)

    @property
    def samples_seen(self) -> int:
        """Rows this rank has trained on since the start (all epochs)."""
        return (self.epoch * self.batches_per_epoch + self.position) * self.batch_size

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n_rows": self.n_rows,
                "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        same = {k: state.get(k) for k in ("seed", "n_rows", "batch_size", "world_size")}
        mine = {k: getattr(self, k) for k in same}
        if same != mine:
            raise ValueError(f"the checkpoint's row order {same} differs from this run's {mine}: resuming would "
                             f"not continue at the exact sample (train.batch_size, train.num_workers and the "
                             f"data must match the interrupted run)")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def sampler_checkpoint(sampler: RowSampler):
    """A Lightning callback that advances `sampler` after every training batch and saves its
    cursor in checkpoints (restored before the first batch of a resumed fit)."""
    import pytorch_lightning as pl

    class RowSamplerCheckpoint(pl.Callback):
        @property
        def state_key(self) -> str:
            return "RowSamplerCheckpoint"

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sampler.advance(1)

        def state_dict(self) -> dict[str, Any]:
            return sampler.state_dict()

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            sampler.load_state_dict(state_dict)

    return RowSamplerCheckpoint()
