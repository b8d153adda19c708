"""`longrope`'s one table switch during decoding, exact: the context cache is rebuilt once per row.

A `longrope` backbone (Phi-3.5, Phi-4-mini) rotates with its short table while the sequence is at
most `original_max_position_embeddings` (orig) tokens long and with its long table after that, for
EVERY position: Phi-3's `generate` drops its cache and recomputes the whole sequence when the
input first reaches orig + 1 tokens. So the logits predicting token t (a forward over t tokens) use
the short table everywhere when t <= orig, the long one everywhere otherwise, and a context cache
of n tokens is short-table when n <= orig, long-table when n > orig.

`adapters.rotary` picks each row's table by its largest position in the call; this module keeps
every call consistent with its cache. `exact_forward` is `twotower.walk.context_forward` for the
decoding modes: a row whose new tokens cross the switch (cache of s <= orig tokens, s + T > orig)
takes its predictions at positions < orig from a short-table forward over those tokens alone, and
the rest from a long-table re-prefill of its whole sequence (`TowerCache.ids`), whose cache
replaces the row's. A verification that crossed but is rolled back to <= orig tokens gets its
short-table cache back (`settle`). Each costs a row one extra forward (not tallied) once.

Left pads are never in a decoding forward; a prefill (an empty cache) needs nothing: a prompt
longer than orig is long-table everywhere, as in transformers. Backbones with Mamba-2 layers are
not handled (no adapter declares `longrope` support with them).
"""
from __future__ import annotations

import dataclasses

import torch

from adapters.rotary import original_max_positions
from twotower.cache import TowerCache
from twotower.walk import Walk, context_forward


def switch_point(walk: Walk) -> int | None:
    """orig, when the tower's rotary is `longrope`; None otherwise (nothing to do)."""
    inner = getattr(walk.model, "model", None)
    module = getattr(inner, "rotary_emb", None)
    if getattr(module, "rope_type", None) != "longrope":
        return None
    return original_max_positions(walk.model.config)


def _crossing(orig: int, start: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """`[N]` bool: rows with a short-table cache (1..orig tokens) whose forward reaches past orig."""
    return (start > 0) & (start <= orig) & (start + new > orig)


COLUMN_FIELDS = {"keys": 2, "values": 2, "hidden": 1, "fused_keys": 2, "fused_values": 2}
"""`TowerCache` fields holding one column per token: field -> its time dim."""


def splice(cache: TowerCache, row: int, part: TowerCache) -> TowerCache:
    """`cache` with row `row`'s columns replaced by those of the one-row `part` (all real tokens:
    as many as the row has, right-aligned) and its Mamba-2 states by `part`'s."""
    n = part.length
    changed = {}
    for name, dim in COLUMN_FIELDS.items():
        store = {}
        for i, t in getattr(cache, name).items():
            t = t.clone()
            t.narrow(0, row, 1).narrow(dim, t.shape[dim] - n, n).copy_(getattr(part, name)[i])
            store[i] = t
        changed[name] = store
    for name in ("conv", "ssm"):
        store = {}
        for i, t in getattr(cache, name).items():
            t = t.clone()
            t[row] = getattr(part, name)[i][0]
            store[i] = t
        changed[name] = store
    return dataclasses.replace(cache, **changed)


def _row_tokens(cache: TowerCache, row: int) -> torch.Tensor:
    if cache.ids is None:
        raise ValueError("longrope: the context cache holds no token ids to rebuild from (TowerCache.ids)")
    return cache.ids[row][cache.valid[row]]


def _no_mamba(walk: Walk) -> None:
    if any(sub.kind == "mamba" for sub in walk.subs):
        raise NotImplementedError("longrope's table switch with Mamba-2 layers (their states would be rebuilt too)")


def exact_forward(walk: Walk, input_ids: torch.Tensor, cache: TowerCache, *, chunk: int, valid=None,
                  keep_hidden: bool = False, rollback: dict | None = None, features=None):
    """`context_forward` (same arguments and result) with `longrope`'s switch applied per row."""
    opts = dict(chunk=chunk, keep_hidden=keep_hidden, features=features)
    hidden, new = context_forward(walk, input_ids, cache, valid=valid, rollback=rollback, **opts)
    orig = switch_point(walk)
    if orig is None:
        return hidden, new
    count = torch.full_like(cache.next_pos, input_ids.shape[1]) if valid is None else valid.long().sum(1)
    cross = _crossing(orig, cache.next_pos, count)
    if not bool(cross.any()):
        return hidden, new
    _no_mamba(walk)
    if valid is not None and not bool(valid[cross].all()):
        raise ValueError("longrope: a forward crossing the table switch has pads")
    for r in cross.nonzero().squeeze(1).tolist():
        row = cache.select(torch.tensor([r], device=cache.valid.device))
        short = orig - int(cache.next_pos[r])  # new tokens at positions < orig: short-table predictions
        parts = []
        if short > 0:
            parts.append(context_forward(walk, input_ids[r:r + 1, :short], row, **opts)[0])
        whole = torch.cat([_row_tokens(row, 0), input_ids[r]])[None]
        h_long, rebuilt = context_forward(walk, whole, TowerCache.empty(1, whole.device), **opts)
        parts.append(h_long[:, orig:])
        hidden[r] = torch.cat(parts, dim=1)[0]
        new = splice(new, r, rebuilt)
    return hidden, new


def settle(walk: Walk, before: TowerCache, block: torch.Tensor, accepted: torch.Tensor, cache: TowerCache, *,
           chunk: int, keep_hidden: bool = False, features=None) -> TowerCache:
    """After a verification of `block` on `before` rolled back to `accepted` `[N]` tokens per row
    (`cache`): a row that crossed the switch in it but kept <= orig tokens gets back the
    short-table cache of its kept tokens."""
    orig = switch_point(walk)
    if orig is None:
        return cache
    start = before.next_pos
    back = _crossing(orig, start, torch.full_like(start, block.shape[1])) & (start + accepted.to(start.device) <= orig)
    for r in back.nonzero().squeeze(1).tolist():
        row = before.select(torch.tensor([r], device=before.valid.device))
        kept = block[r:r + 1, : int(accepted[r])]
        _, short = context_forward(walk, kept, row, chunk=chunk, keep_hidden=keep_hidden, features=features)
        cache = splice(cache, r, short)
    return cache
