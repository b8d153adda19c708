"""Token ids -> text as they commit, with stop strings (OpenAI semantics: the stop string and what
follows are not returned).

A block commits several tokens at once and a token may end inside a multi-byte character, so each
commit decodes the row's whole completion and hands out only what is new and *settled*: text that
ends in a replacement character (an unfinished UTF-8 sequence) or that could still be the start of
a stop string is held back until the next commit decides it.
"""
from __future__ import annotations


class TextStream:
    """One row's completion text, grown commit by commit."""

    def __init__(self, tokenizer, stops: list[str], live: bool = True):
        self.tokenizer = tokenizer
        self.stops = stops
        self.live = live or bool(stops)
        """Decode at every commit (a streaming client, or stop strings to look for); otherwise
        only once, at the end (a decode per commit costs more than a tiny model's forward)."""
        self.ids: list[int] = []
        self.sent = 0
        """Characters of the text already handed out."""
        self.stopped = False
        """A stop string was produced: the completion ends before it."""
        self.text = ""

    def _hold(self, text: str) -> int:
        """How many trailing characters of `text` may still change: an unfinished character, or
        the longest suffix that begins some stop string."""
        if text.endswith("\ufffd"):
            return len(text) - len(text.rstrip("\ufffd"))
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:k]):
                    hold = k
                    break
        return hold

    def add(self, ids: list[int], final: bool = False) -> str:
        """Append a commit's ids; the newly settled text (everything left when `final`)."""
        if self.stopped:
            return ""
        self.ids.extend(ids)
        if not (self.live or final):
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, text, final = True, text[:cut], True
        self.text = text
        end = len(text) if final else len(text) - self._hold(text)
        if end <= self.sent:
            return ""
        piece, self.sent = text[self.sent:end], end
        return piece
