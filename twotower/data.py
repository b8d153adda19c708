"""Batch layout helpers for training the denoiser on prompt/answer pairs.

Decoding starts its first block right after the prompt (block position 0 = the context tower's
greedy first answer token). Training matches that when each row is left-padded so its answer
starts on a block boundary; `attention_mask` makes the pads exact no-ops and `loss_mask` keeps
the prompt clean (only answer tokens are masked and scored).

With `fill_id` (the EOS id) the rest of the answer's last block is filled with it, real and
scored. Decoding denoises all B positions of a block, so the denoiser must learn what comes after
the end: without the fill, training shows it exactly the answer's positions (the pads are
invisible), i.e. it learns with the answer length given away, and at decoding time it has to guess
the length it never had to predict (measured: most diffusion errors were answers one character too
long or too short).
"""
from __future__ import annotations

import torch


def block_aligned_batch(
    prompts: list[list[int]], answers: list[list[int]], block_size: int, pad_id: int, length: int | None = None,
    fill_id: int | None = None,
) -> dict[str, torch.Tensor]:
    """Rows `[pads][prompt][answer][fill][pads]` with every answer starting at a multiple of block_size.

    Returns `input_ids`, `attention_mask` (1 at prompt, answer and fill) and `loss_mask` (1 at
    answer and fill), each `[b, length]`; length defaults to the smallest multiple of block_size
    that fits all rows. `fill_id` None: no fill (the answer's block ends in pads).
    """
    if len(prompts) != len(answers):
        raise ValueError(f"block_aligned_batch: {len(prompts)} prompts but {len(answers)} answers")
    starts = [-(-len(p) // block_size) * block_size for p in prompts]
    need = max(s + len(a) for s, a in zip(starts, answers))
    length = length or -(-need // block_size) * block_size
    if need > length:
        raise ValueError(f"block_aligned_batch: rows need {need} positions, length is {length}")
    # One scatter for all rows (tiny recipe, 70 k rows: 2.8 CPU-s with a per-row loop, 0.7 s this way).
    n = len(prompts)
    plen = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    alen = torch.tensor([len(a) for a in answers], dtype=torch.long)
    start = torch.tensor(starts, dtype=torch.long)
    end = start + alen
    stop = -(-end // block_size) * block_size if fill_id is not None else end
    cols = torch.arange(length)[None, :]
    attn = ((cols >= (start - plen)[:, None]) & (cols < stop[:, None])).long()
    loss = ((cols >= start[:, None]) & (cols < stop[:, None])).long()
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    if fill_id is not None:
        ids[(cols >= end[:, None]) & (cols < stop[:, None])] = fill_id
    for tokens, lens, first in ((prompts, plen, start - plen), (answers, alen, start)):
        flat = torch.tensor([t for seq in tokens for t in seq], dtype=torch.long)
        row = torch.repeat_interleave(torch.arange(n), lens)
        offset = torch.arange(int(lens.sum())) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
        ids[row, first[row] + offset] = flat
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}
