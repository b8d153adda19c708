"""Training rows for the denoiser: the layout of prompt/answer examples and length bucketing.

`prepare_data` writes packed rows (several examples per row). Decoding sees one example at a time,
with its answer starting on a block boundary; `build_rows` re-lays the examples that way
(`block_aligned`) or keeps the packed rows (`packed`). `BucketSampler` batches rows with the same
real-block pattern and `trim_blocks` drops blocks that are padding in every row of a batch, so no
step computes on padding blocks (pads are exact no-ops, so this changes the cost, not the result).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Layout = Literal["auto", "packed", "block_aligned"]
NoiseOn = Literal["answers", "all"]


def right_pad_mask(ids, pad_id: int):
    """[N, L] bool: everything up to each row's last non-pad token (pad may equal EOS)."""
    return (ids != pad_id).flip(1).cumsum(1).flip(1) > 0


def split_examples(ids, loss_mask, pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """Packed rows -> (prompts, answers): each example is a run of prompt tokens (loss_mask 0,
    not pad) followed by its answer run (loss_mask 1, EOS included)."""
    prompts, answers = [], []
    for row, lm in zip(ids.tolist(), loss_mask.tolist()):
        i, n = 0, len(row)
        while i < n:
            j = i
            while j < n and not lm[j] and row[j] != pad_id:
                j += 1
            k = j
            while k < n and lm[k]:
                k += 1
            if k > j and j > i:
                prompts.append(row[i:j])
                answers.append(row[j:k])
            i = max(k, i + 1)
    return prompts, answers


def build_rows(tokens: tuple[Any, Any], layout: Layout, noise_on: NoiseOn, block_size: int, pad_id: int,
               fill_id: int | None = None):
    """(ids, attention_mask, loss_mask) tensors for training, in the configured layout
    (`fill_id`: block_aligned rows complete each answer's last block with it)."""
    from twotower.data import block_aligned_batch

    ids, lm = tokens
    real = right_pad_mask(ids, pad_id)
    has_answers = bool((real & ~lm).any())
    if layout == "auto":
        layout = "block_aligned" if has_answers else "packed"
    if layout == "block_aligned":
        prompts, answers = split_examples(ids, lm, pad_id)
        if not prompts:
            raise ValueError("train.layout=block_aligned: the token file has no prompt/answer examples "
                             "(loss_mask marks no answers); use train.layout=packed")
        rows = block_aligned_batch(prompts, answers, block_size, pad_id, fill_id=fill_id)
        attn = rows["attention_mask"].bool()
        loss = rows["loss_mask"].bool() if noise_on == "answers" else attn
        return rows["input_ids"], attn, loss
    return ids, real, (lm & real) if noise_on == "answers" else real


def bucket_batches(attn, block_size: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Row indices grouped into batches of rows with the same real-block pattern, shuffled."""
    import torch

    n_rows, length = attn.shape
    sig = attn.view(n_rows, length // block_size, block_size).any(-1)
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(map(tuple, sig.tolist())):
        groups.setdefault(key, []).append(i)
    batches = []
    for rows in groups.values():
        order = [rows[j] for j in torch.randperm(len(rows), generator=g).tolist()]
        batches += [order[k: k + batch_size] for k in range(0, len(order), batch_size)]
    return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]


class BucketSampler:
    """A batch sampler over `bucket_batches`, reshuffled every epoch (deterministic in the seed)."""

    def __init__(self, attn, block_size: int, batch_size: int, seed: int):
        self.attn, self.block_size, self.batch_size, self.seed, self.epoch = attn, block_size, batch_size, seed, 0
        self.n = len(bucket_batches(attn, block_size, batch_size, seed, 0))

    def __iter__(self):
        batches = bucket_batches(self.attn, self.block_size, self.batch_size, self.seed, self.epoch)
        self.epoch += 1
        return iter(batches)

    def __len__(self) -> int:
        return self.n


def trim_blocks(block_size: int):
    """A collate function stacking (ids, attn, loss) rows and dropping blocks that are padding in
    every row of the batch (pads are exact no-ops, so the result is unchanged, only cheaper)."""
    import torch

    def collate(items):
        ids, attn, loss = (torch.stack(t) for t in zip(*items))
        b, length = ids.shape
        keep = attn.view(b, length // block_size, block_size).any(-1).any(0)  # [n_blocks]
        cols = keep.repeat_interleave(block_size)
        return ids[:, cols], attn[:, cols], loss[:, cols]

    return collate


@dataclass
class RowLoaders:
    """Picklable `(train, val)` loader factory for Ray Train workers (Lightning adds the
    DistributedSampler that shards the rows across workers)."""

    train_ids: tuple
    val_ids: tuple
    block_size: int
    batch_size: int

    def __call__(self):
        from torch.utils.data import DataLoader, TensorDataset

        collate = trim_blocks(self.block_size)
        return (DataLoader(TensorDataset(*self.train_ids), batch_size=self.batch_size, shuffle=True,
                           collate_fn=collate, drop_last=True),
                DataLoader(TensorDataset(*self.val_ids), batch_size=self.batch_size, collate_fn=collate))


class ShardRows:
    """Packed training rows read lazily from a token-shard split (`stages.data.token_shards`): item `i`
    is (ids int64, attention bool, loss bool) of row `i`, as `build_rows(..., "packed", ...)` would
    give for the whole split in memory. Pickles without the memory maps (reopened on a worker)."""

    def __init__(self, shards: Any, noise_on: NoiseOn, pad_id: int) -> None:
        self.shards, self.noise_on, self.pad_id = shards, noise_on, pad_id

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, i: int):
        import torch

        ids, lm = (torch.from_numpy(a) for a in self.shards.row(int(i)))
        real = right_pad_mask(ids[None], self.pad_id)[0]
        return ids, real, (lm & real) if self.noise_on == "answers" else real


@dataclass
class ShardLoaders:
    """Picklable `(train, val)` loader factory over token shards for Ray Train workers and the
    single process: the training loader's batch sampler is a `RowSampler` for this worker's rank
    (read from Ray Train's context when there is one), so each worker reads only its own rows, in
    an order that resumes at the exact batch (`stages.data.row_sampler`)."""

    train: ShardRows
    val: ShardRows
    block_size: int
    batch_size: int
    seed: int

    def __call__(self):
        from stages.training.distributed_worker import worker_rank

        return self.for_rank(*worker_rank())

    def for_rank(self, rank: int, world: int):
        """The loaders of worker `rank` of `world`: its `RowSampler` part of the training rows, and
        its part of the eval rows (every `world`-th from `rank`, cut to equal lengths, so each worker
        validates other rows and the logged metrics, averaged over workers, cover `world` times as
        many; an eval split smaller than `world` is validated whole by every worker)."""
        from torch.utils.data import DataLoader, Subset

        from stages.data.row_sampler import RowSampler

        collate = trim_blocks(self.block_size)
        sampler = RowSampler(len(self.train), self.batch_size, self.seed, rank=rank, world_size=world)
        val = self.val
        if world > 1 and len(val) >= world:
            val = Subset(val, range(rank, len(val) // world * world, world))
        return (DataLoader(self.train, batch_sampler=sampler, collate_fn=collate),
                DataLoader(val, batch_size=self.batch_size, collate_fn=collate))
