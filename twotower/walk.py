"""The context tower's layer walk: prefill, block commits and single-token steps share it.

`Walk` binds an adapter to one HF model (a tower). `context_forward` runs T new tokens through
every sublayer on top of a `TowerCache`, returning the final-normed hidden states and the
extended cache; with `record` it also keeps what the training forward needs from the clean
sequence (pre-convolution inputs and SSM states at every block boundary).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adapters import Adapter, Mamba2Params, Sublayer
from twotower.cache import TowerCache
from twotower.ops import attention, causal_mask, mamba2_mixer


@dataclass
class Walk:
    """One tower's layer walk: the adapter, the HF model and its sublayers."""

    adapter: Adapter
    """The backbone family's adapter."""
    model: nn.Module
    """The HF `*ForCausalLM` this walk reads."""
    subs: list[Sublayer]
    """The ordered sublayers of `model`."""

    @classmethod
    def of(cls, adapter: Adapter, model: nn.Module) -> "Walk":
        return cls(adapter, model, adapter.sublayers(model))

    def mamba(self, sub: Sublayer) -> Mamba2Params:
        """Read at call time (not cached), so moved, cast or re-wrapped parameters are seen."""
        return self.adapter.mamba(sub)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden -> float32 logits."""
        return self.adapter.lm_head(self.model)(hidden).float()


ONE_CHUNK_MAX = 64
"""Inputs up to this many tokens are scanned as one Mamba chunk when no boundary state is recorded
(a decoding prefill): the quadratic one-chunk form has a fraction of the multi-chunk path's ops,
0.5-0.9 ms less on a 24-40 token prompt of the tiny recipe on CPU; its cost grows as T², so longer
inputs keep the caller's chunk."""


def positions_for(cache: TowerCache, valid_new: torch.Tensor) -> torch.Tensor:
    """Per-sequence position ids of new tokens (pads get the position of the next real token)."""
    return cache.next_pos[:, None] + valid_new.long().cumsum(1) - valid_new.long()


def context_forward(
    walk: Walk,
    input_ids: torch.Tensor,
    cache: TowerCache,
    *,
    valid: torch.Tensor | None = None,
    chunk: int,
    record: dict | None = None,
    keep_hidden: bool = False,
) -> tuple[torch.Tensor, TowerCache]:
    """Run `input_ids` `[N, T]` through the tower on top of `cache`.

    valid `[N, T]` marks real tokens (left pads False). chunk is the Mamba scan chunk (= B).
    record (a dict) receives `xbc[i]` `[N, Cd, K-1+T]` and `states[i]` `[N, c+1, H, P, S]` per
    mamba sublayer. Returns (final-normed hidden `[N, T, d]`, extended cache).
    """
    n, length = input_ids.shape
    if record is None:  # only the end state is kept: a short input is cheapest as one scan chunk
        chunk = max(chunk, min(length, ONE_CHUNK_MAX))
    mamba_valid = valid  # None: no pads, skip the zeroing multiplies
    if valid is None:
        valid = torch.ones(n, length, dtype=torch.bool, device=input_ids.device)
    positions = positions_for(cache, valid)
    all_valid = torch.cat([cache.valid, valid], dim=1)
    mask = causal_mask(all_valid, length)
    new = TowerCache(all_valid, cache.next_pos + valid.long().sum(1))
    h = walk.adapter.embed(walk.model, input_ids)
    for sub in walk.subs:
        i = sub.index
        if keep_hidden:
            new.hidden[i] = torch.cat([cache.hidden[i], h], 1) if i in cache.hidden else h
        x = sub.norm(h)
        if sub.kind == "attention":
            q, k, v = walk.adapter.qkv(walk.model, sub, x, positions)
            if i in cache.keys:
                k, v = torch.cat([cache.keys[i], k], dim=2), torch.cat([cache.values[i], v], dim=2)
            new.keys[i], new.values[i] = k, v
            out = walk.adapter.attn_out(sub, attention(q, k, v, mask, walk.adapter.attn_scale(sub)))
        elif sub.kind == "mamba":
            p = walk.mamba(sub)
            out, xbc, states = mamba2_mixer(p, x, cache.conv.get(i), cache.ssm.get(i), mamba_valid, chunk)
            new.conv[i] = xbc[..., xbc.shape[-1] - (p.conv1d.weight.shape[-1] - 1):]
            new.ssm[i] = states[:, -1]
            if record is not None:
                record.setdefault("xbc", {})[i] = xbc
                record.setdefault("states", {})[i] = states
        else:
            out = walk.adapter.ffn(sub, x)
        h = h + out
    return walk.adapter.final_norm(walk.model)(h), new
