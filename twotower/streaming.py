"""Streaming: tokens handed out as decoding commits them, not when `generate` returns.

Block decoding commits several tokens at a time (a block, or a verified prefix), so a streamer
receives each row's new tokens per commit. Two conventions are accepted by `generate(streamer=)`:

- `RowStreamer` (this module): `put_row(row, tokens, finished)` for every row of a batch, and
  `end()`. Returning True from `put_row` ends that row at once (a stop string was produced, the
  client went away): it leaves the batch like a row that produced EOS, so it costs nothing more.
- transformers' streamer convention (`TextStreamer`, `TextIteratorStreamer`: an object with
  `put(ids)` and `end()`), batch 1 only as in transformers: `put` first receives the prompt, then
  each commit's new ids.
"""
from __future__ import annotations

import torch


class RowStreamer:
    """Receives each row's tokens as they are committed (subclass and override `put_row`)."""

    def put_row(self, row: int, tokens: list[int], finished: bool) -> bool | None:
        """New `tokens` of original row `row` (possibly none when `finished` alone is news).
        `finished`: the row is done (EOS or its token budget). Return True to end the row now."""
        raise NotImplementedError

    def end(self) -> None:
        """Decoding is over (every row finished, or `generate` raised)."""


class _TransformersStreamer(RowStreamer):
    """A transformers-convention streamer (`put`, `end`) seen as a `RowStreamer` of one row."""

    def __init__(self, streamer, prompt: torch.Tensor):
        self.streamer = streamer
        streamer.put(prompt.cpu())  # transformers hands the prompt first (`skip_prompt` drops it)

    def put_row(self, row: int, tokens: list[int], finished: bool) -> None:
        if tokens:
            self.streamer.put(torch.tensor(tokens, dtype=torch.long))

    def end(self) -> None:
        self.streamer.end()


def as_row_streamer(streamer, prompt_ids: torch.Tensor) -> RowStreamer | None:
    """`generate`'s `streamer` argument as a `RowStreamer` (None stays None). `prompt_ids`: the
    packed `[batch, P]` prompts (a transformers-style streamer takes batch 1 only)."""
    if streamer is None or isinstance(streamer, RowStreamer):
        return streamer
    if not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
        raise TypeError(f"generate: streamer must be a twotower.streaming.RowStreamer or have put() and end() "
                        f"(transformers' TextStreamer convention), got {type(streamer).__name__}")
    if prompt_ids.shape[0] != 1:
        raise ValueError(f"generate: a transformers-style streamer takes batch size 1 (as in transformers), "
                         f"got {prompt_ids.shape[0]} prompts: use a twotower.streaming.RowStreamer for batches")
    return _TransformersStreamer(streamer, prompt_ids)
