"""The layer walk: one sublayer step for every tower and every path.

`Walk` binds an adapter to one HF model (a tower). `sublayer_step` is the only place a residual
step is computed: norm, AdaLN modulation, the kind's mixer, the family's post-norm and residual
multiplier, cross-attention, the gated residual add. What differs between the context tower and
the denoiser is only where attention keys and Mamba-2 states come from, a `Mixing`:
`CacheExtension` (here) extends a `TowerCache` by new tokens; the denoiser's block contexts
(`twotower.denoiser`) show a block the context tower's keys and states. `context_forward` runs T
new tokens through every sublayer on top of a `TowerCache` (prefill, block commits, single-token
steps); with `record` it also keeps what the training forward needs from the clean sequence
(pre-convolution inputs and SSM states at every block boundary).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from adapters import Adapter, Mamba2Params, Sublayer
from twotower.cache import TowerCache
from twotower.ops import attention, causal_mask, mamba2_mixer, ssd_state_at, window_mask


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
        """Final-normed hidden -> float32 logits (the family's logit transforms applied)."""
        return self.adapter.logits(self.model, hidden).float()


class Mixing(Protocol):
    """Where a sublayer's attention keys and Mamba-2 states come from."""

    def attend(self, sub: Sublayer, q, k, v, scale: float) -> torch.Tensor:
        """New q/k/v `[N, H(kv), T, hd]` -> attention output `[N, T, H·hd]` (masks, windows,
        soft-capping applied)."""
        ...

    def mamba(self, sub: Sublayer, p: Mamba2Params, x: torch.Tensor) -> torch.Tensor:
        """Normed hidden `[N, T, d]` -> Mamba-2 mixer output `[N, T, d]`."""
        ...


Modulation = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""AdaLN of one sublayer: (shift, 1 + scale, 1 + gate), each `[N, 1, d]`."""


def sublayer_step(
    walk: Walk,
    sub: Sublayer,
    h: torch.Tensor,
    mixing: Mixing,
    positions: torch.Tensor,
    mod: Modulation | None = None,
    cross: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """One residual step on hidden `h` `[N, T, d]` at `positions` `[N, T]`:
    `r + (1+gate)·(residual_scale·post_norm(mixer(norm(h)·(1+scale)+shift)) + cross)`, with `r` =
    `residual` when given (a parallel step: `h` is its group's input, `r` what the group has added
    so far; `walk_inputs` pairs them), else `h`.

    Without `mod` and `cross` this is the backbone's own step (the context tower); with them at
    their zero init it computes the same thing (invariant 4)."""
    x = sub.norm(h)
    if mod is not None:
        x = torch.addcmul(mod[0], x, mod[1])
    adapter = walk.adapter
    if sub.kind == "attention":
        q, k, v = adapter.qkv(walk.model, sub, x, positions)
        out = adapter.attn_out(sub, mixing.attend(sub, q, k, v, adapter.attn_scale(sub)))
    elif sub.kind == "mamba":
        out = mixing.mamba(sub, walk.mamba(sub), x)
    else:
        out = adapter.ffn(sub, x)
    if sub.post_norm is not None:
        out = sub.post_norm(out)
    if sub.residual_scale != 1.0:
        out = out * sub.residual_scale
    if cross is not None:
        out = out + cross(sub.index, x)
    base = h if residual is None else residual
    return base + out if mod is None else torch.addcmul(base, out, mod[2])


def step_input(sub: Sublayer, h: torch.Tensor, group_input: torch.Tensor) -> torch.Tensor:
    """What sublayer `sub` reads: the running hidden `h`, or, for a parallel step, the input of the
    residual group it joins (`group_input`: the input of the last non-parallel sublayer)."""
    return group_input if sub.parallel else h


ONE_CHUNK_MAX = 64
"""Inputs up to this many tokens are scanned as one Mamba chunk when no boundary state is recorded
(a decoding prefill): the quadratic one-chunk form has a fraction of the multi-chunk path's ops,
0.5-0.9 ms less on a 24-40 token prompt of the tiny recipe on CPU; its cost grows as T², so longer
inputs keep the caller's chunk."""


def positions_for(cache: TowerCache, valid_new: torch.Tensor) -> torch.Tensor:
    """Per-sequence position ids of new tokens (pads get the position of the next real token)."""
    return cache.next_pos[:, None] + valid_new.long().cumsum(1) - valid_new.long()


class CacheExtension:
    """The context tower's `Mixing`: new tokens attend causally to the cached keys and their own,
    Mamba-2 continues from the cached states; every new key and state goes into `new`."""

    def __init__(self, cache: TowerCache, new: TowerCache, positions: torch.Tensor,
                 mamba_valid: torch.Tensor | None, chunk: int, record: dict | None, rollback: dict | None = None):
        self.cache, self.new, self.positions = cache, new, positions
        self.mamba_valid, self.chunk, self.record, self.rollback = mamba_valid, chunk, record, rollback
        self.masks: dict[int | None, torch.Tensor] = {None: causal_mask(new.valid, positions.shape[1])}

    def mask(self, window: int | None) -> torch.Tensor:
        """The causal mask, narrowed to `window` (built once per forward and window)."""
        m = self.masks.get(window)
        if m is None:
            m = self.masks[None] & window_mask(self.positions, self.new.positions, window)
            self.masks[window] = m
        return m

    def attend(self, sub, q, k, v, scale):
        i = sub.index
        if i in self.cache.keys:
            k, v = torch.cat([self.cache.keys[i], k], dim=2), torch.cat([self.cache.values[i], v], dim=2)
        self.new.keys[i], self.new.values[i] = k, v
        return attention(q, k, v, self.mask(sub.window), scale, sub.logit_softcap)

    def mamba(self, sub, p, x):
        i = sub.index
        points = None if self.rollback is None else self.rollback.setdefault(i, {})
        out, xbc, states = mamba2_mixer(p, x, self.cache.conv.get(i), self.cache.ssm.get(i), self.mamba_valid,
                                        self.chunk, points=points)
        if points is not None:  # the caller picks the states at its rollback point (`rollback_states`)
            points["xbc"] = xbc
            return out
        self.new.conv[i] = xbc[..., xbc.shape[-1] - (p.conv1d.weight.shape[-1] - 1):]
        self.new.ssm[i] = states[:, -1]
        if self.record is not None:
            self.record.setdefault("xbc", {})[i] = xbc
            self.record.setdefault("states", {})[i] = states
        return out


class ContextFeatures(Protocol):
    """What a denoiser with `attention_conditioning=fused_kv` needs from every context forward: the
    outputs of some layers and the inputs of some sublayers, turned into keys/values for its own
    attention sublayers."""

    layers: frozenset[int]
    """Backbone layers whose outputs (the residual stream after the layer) are read."""
    inputs: frozenset[int]
    """Sublayer indices whose input hidden states are read."""

    def __call__(self, outputs: list[torch.Tensor], inputs: dict[int, torch.Tensor],
                 positions: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Outputs `[N, T, d]` of `layers` in ascending order and sublayer index -> input `[N, T, d]`,
        at position ids `[N, T]` -> denoiser sublayer index -> (keys, values) `[N, Hkv, T, hd]` of
        those T positions."""
        ...


def context_forward(
    walk: Walk,
    input_ids: torch.Tensor,
    cache: TowerCache,
    *,
    valid: torch.Tensor | None = None,
    chunk: int,
    record: dict | None = None,
    keep_hidden: bool = False,
    rollback: dict | None = None,
    features: ContextFeatures | None = None,
) -> tuple[torch.Tensor, TowerCache]:
    """Run `input_ids` `[N, T]` through the tower on top of `cache`.

    valid `[N, T]` marks real tokens (left pads False). chunk is the Mamba scan chunk (= B).
    record (a dict) receives `xbc[i]` `[N, Cd, K-1+T]` and `states[i]` `[N, c+1, H, P, S]` per
    mamba sublayer. rollback (a dict; T <= chunk) receives per mamba sublayer what
    `rollback_states` needs to give its conv and SSM states after any position; the extended
    cache then has no Mamba-2 states until the caller sets them (a verified block's rollback).
    features: the fused context keys/values of the new positions are appended to the cache's
    (`ContextFeatures`, for a `fused_kv` denoiser). Returns (final-normed hidden `[N, T, d]`, extended cache).
    """
    n, length = input_ids.shape
    if record is None:  # only the end state is kept: a short input is cheapest as one scan chunk
        chunk = max(chunk, min(length, ONE_CHUNK_MAX))
    mamba_valid = valid  # None: no pads, skip the zeroing multiplies
    if valid is None:
        valid = torch.ones(n, length, dtype=torch.bool, device=input_ids.device)
    positions = positions_for(cache, valid)
    new = TowerCache(torch.cat([cache.valid, valid], dim=1), cache.next_pos + valid.long().sum(1),
                     torch.cat([cache.positions, positions], dim=1),
                     ids=None if cache.ids is None else torch.cat([cache.ids, input_ids], dim=1))
    mixing = CacheExtension(cache, new, positions, mamba_valid, chunk, record, rollback)
    h = walk.adapter.embed(walk.model, input_ids)
    outputs, inputs = [], {}
    group = h
    for j, sub in enumerate(walk.subs):
        x_in = step_input(sub, h, group)
        group = x_in
        if keep_hidden:
            i = sub.index
            new.hidden[i] = torch.cat([cache.hidden[i], x_in], 1) if i in cache.hidden else x_in
        if features is not None and sub.index in features.inputs:
            inputs[sub.index] = x_in
        h = sublayer_step(walk, sub, x_in, mixing, positions, residual=h)
        if features is not None and sub.layer in features.layers and (
                j + 1 == len(walk.subs) or walk.subs[j + 1].layer != sub.layer):  # the layer's last sublayer
            outputs.append(h)
    if features is not None:
        for i, (k, v) in features(outputs, inputs, positions).items():
            new.fused_keys[i] = torch.cat([cache.fused_keys[i], k], 2) if i in cache.fused_keys else k
            new.fused_values[i] = torch.cat([cache.fused_values[i], v], 2) if i in cache.fused_values else v
    return walk.adapter.final_norm(walk.model)(h), new


def rollback_states(rollback: dict, upto: torch.Tensor) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Per mamba sublayer of a `context_forward(..., rollback=...)`, the conv and SSM states after the
    first `upto[n]` `[N]` new tokens of each row: (conv `{i: [N, Cd, K-1]}`, ssm `{i: [N, H, P, S]}`)."""
    conv, ssm = {}, {}
    here = torch.arange(upto.shape[0], device=upto.device)
    for i, points in rollback.items():
        xbc = points["xbc"]  # [N, Cd, K-1+T]: the conv state before the new tokens, then their inputs
        width = xbc.shape[-1] - points["acum"].shape[-1]
        conv[i] = xbc.unfold(-1, width, 1)[here, :, upto.to(xbc.device)]  # the K-1 inputs ending at `upto`
        ssm[i] = ssd_state_at(points, upto)
    return conv, ssm


def layer_container(model: nn.Module, subs: list) -> nn.ModuleList:
    """The `nn.ModuleList` of `model`'s decoder layers (entry l holds the modules of every sublayer
    with `layer == l`), found by structure so that it works for every adapter's layout."""
    n = 1 + max(sub.layer for sub in subs)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            inside = [{id(m) for m in layer.modules()} for layer in module]
            if all(id(sub.mixer) in inside[sub.layer] for sub in subs):
                return module
    raise ValueError(f"twotower.denoiser_layers: cannot find the {n} decoder layers of {type(model).__name__} "
                     "as one nn.ModuleList (the adapter's sublayers name their layers)")
