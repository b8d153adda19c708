"""The state of one `generate` call's batch: the rows still decoding (`Rows`: their original
indices, tokens so far, the context tower's next token, the cache, `verified`'s draft backoff) and
the forward counts (`Tally`). Rows leave the batch as they finish (`keep`) and join it mid-call
(`admit`: continuous batching), so every per-row tensor and the cache change together here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from twotower.cache import TowerCache

MAX_BACKOFF = 8
"""Longest run of blocks a row verifies without a draft after its drafts kept nothing."""


@dataclass
class Tally:
    """Forward counts of one `generate` call."""

    row_forwards: torch.Tensor
    """`[batch]` forwards per original row."""
    row_den: torch.Tensor
    """`[batch]` denoiser forwards per original row."""
    den: int = 0
    ctx: int = 0
    verify_rows: int = 0
    accepted: int = 0

    def count(self, kind: str, rows: torch.Tensor) -> None:
        """One forward of `kind` ("den" / "ctx") over the original rows `rows`."""
        setattr(self, kind, getattr(self, kind) + 1)
        self.row_forwards[rows.cpu()] += 1
        if kind == "den":
            self.row_den[rows.cpu()] += 1

    def grow(self, rows: int) -> None:
        """Room for `rows` more original rows (joined mid-call)."""
        self.row_forwards = torch.cat([self.row_forwards, torch.zeros(rows, dtype=torch.long)])
        self.row_den = torch.cat([self.row_den, torch.zeros(rows, dtype=torch.long)])


@dataclass
class Rows:
    """The rows still decoding: their original indices, generated tokens so far, the context tower's
    next token, the cache and (verified) the draft backoff. `keep` drops finished rows from all of
    them at once."""

    index: torch.Tensor
    first: torch.Tensor
    cache: TowerCache
    out: list[list[int]] = field(default_factory=list)
    """Per ORIGINAL row, its generated tokens."""
    pause: torch.Tensor | None = None
    """`[n]` verified: blocks this row still verifies without a draft (after rejected drafts)."""
    backoff: torch.Tensor | None = None
    """`[n]` verified: the pause its next rejected draft starts (doubles per rejection)."""
    streamer: Any = None
    """`twotower.streaming.RowStreamer` (or None): told each row's tokens as they are emitted; it
    may end a row early (a stop string, a client gone), which then leaves the batch like an EOS."""

    def __post_init__(self):
        self.pause = torch.zeros_like(self.index)
        self.backoff = torch.ones_like(self.index)

    def after_verify(self, drafted: torch.Tensor, accepted: torch.Tensor) -> None:
        """Backoff: a row whose draft lost at once (only the context tower's token kept) pauses
        drafting for `backoff` blocks, doubled each time up to `MAX_BACKOFF`; a draft that kept a
        token resets it. A paused block is a plain AR step when no row drafts, so a denoiser that is
        always wrong costs verified about AR's speed, not up to B forwards per token."""
        lost = drafted & (accepted <= 1)
        self.pause = torch.where(drafted, torch.where(lost, self.backoff, 0), (self.pause - 1).clamp(min=0))
        self.backoff = torch.where(lost, (self.backoff * 2).clamp(max=MAX_BACKOFF),
                                   torch.where(drafted, torch.ones_like(self.backoff), self.backoff))

    def emit(self, tokens: list[list[int]], eos: int | None, budget: int) -> torch.Tensor:
        """Append each active row's new tokens (cut at EOS and the budget); `[n]` bool: finished."""
        done = []
        for r, toks in zip(self.index.tolist(), tokens):
            seq = self.out[r]
            start = len(seq)
            for tok in toks:
                if len(seq) >= budget:
                    break
                seq.append(tok)
                if tok == eos:
                    break
            finished = len(seq) >= budget or (eos is not None and bool(seq) and seq[-1] == eos)
            if self.streamer is not None and (len(seq) > start or finished):
                finished = bool(self.streamer.put_row(r, seq[start:], finished)) or finished
            done.append(finished)
        return torch.tensor(done, device=self.first.device)

    def admit(self, first: torch.Tensor, cache: TowerCache) -> torch.Tensor:
        """New rows join (their prompts prefilled into `cache`, `first` their next tokens); they take
        the next original indices, which are returned."""
        index = torch.arange(len(self.out), len(self.out) + first.shape[0], device=self.index.device)
        self.index, self.first = torch.cat([self.index, index]), torch.cat([self.first, first.to(self.first.device)])
        self.pause = torch.cat([self.pause, torch.zeros_like(index)])
        self.backoff = torch.cat([self.backoff, torch.ones_like(index)])
        self.cache = self.cache.join(cache)
        self.out.extend([] for _ in range(first.shape[0]))
        return index

    def keep(self, alive: torch.Tensor) -> bool:
        """Compact to the rows where `alive`; False when none is left."""
        if not bool(alive.any()):
            return False
        if not bool(alive.all()):
            sel = alive.nonzero().squeeze(1)
            self.index, self.first = self.index[sel.to(self.index.device)], self.first[sel]
            self.pause, self.backoff = self.pause[sel], self.backoff[sel]
            self.cache = self.cache.select(sel)
        return True
