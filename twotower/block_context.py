"""How a denoised block sees the context tower: the `BlockContext`s.

`TrainingContext` shows every block of a clean batch the context of one clean context-tower pass
(all blocks at once, or only the selected ones); `DecodeContext` shows one block per sequence the
context tower's cache. Both give a block exactly the keys before its start plus its own block
(each within the sublayer's window) and the Mamba-2 states at its start, so the training and the
decoding logits of a block are equal (invariant 6). Which keys: the context tower's own
(`context_kv`) or the fused ones (`fused_kv`, `twotower.fusion`), `context_keys`.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from twotower.cache import TowerCache
from twotower.config import TwoTowerConfig
from twotower.ops import attention, block_training_mask, window_mask


class BlockContext(Protocol):
    """What a denoised block may see of the context tower, per sublayer."""

    block_valid: torch.Tensor | None
    """`[N, B]` real (non-pad) block positions, or None when all are real."""

    def attend(self, sub, q, k, v, scale: float, key_shift: torch.Tensor | None = None) -> torch.Tensor:
        """Block q/k/v `[N, H(kv), B, hd]` of sublayer `sub` -> attention output `[N, B, H·hd]`
        (its window and soft-cap applied); key_shift `[N, Hkv, Tc, hd]` is added to the context
        keys (`context_position_keys`)."""
        ...

    def context_key_index(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(distance to the block start, absolute position)` of every context key `attend` reads,
        `[N, Tc]` each, clipped to `rows - 1`."""
        ...

    def seed(self, i: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(conv state `[N, Cd, K-1]`, SSM state `[N, H, P, S]`) at the block start."""
        ...

    def cross(self, i: int, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Zero-gated cross-attention output `[N, B, d]`."""
        ...


def context_keys(cache: TowerCache, cfg: TwoTowerConfig, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The context keys/values attention sublayer i of the denoiser reads: the context tower's own
    (`context_kv`) or the fused ones (`fused_kv`); a clear error when the cache lacks them (a
    context forward run without the denoiser's `context_features`)."""
    fused = cfg.attention_conditioning == "fused_kv"
    keys, values = (cache.fused_keys, cache.fused_values) if fused else (cache.keys, cache.values)
    if i not in keys:
        raise ValueError(f"the context cache has no {'fused ' if fused else ''}keys for sublayer {i}"
                         + (": run context_forward with features=model.denoiser.context_features()" if fused else ""))
    return keys[i], values[i]


def clipped_key_index(block_start: torch.Tensor, keys: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(distance to the block start, absolute position)` of keys `[N, Tc]` for blocks starting at
    position `block_start` `[N]`, both clipped to the `rows` of the position-key tables."""
    return (block_start[:, None] - keys).clamp(0, rows - 1), keys.clamp(0, rows - 1)


class TrainingContext:
    """Blocks of a clean batch (`[b, L]`, L = n_blocks·block_len), seen through one clean
    context-tower pass over the whole sequence (K/V and positions of every token, Mamba states
    at every block boundary, recorded with chunk = block_len).

    blocks: the flat block indices (into `b·n`) that are denoised, `[S, block_len]` in that order
    (e.g. only the blocks holding a masked position: block-aligned prompt/answer rows put the
    answer in one block, so most of the denoiser's work is skipped); None: every block, in the
    sequence layout `[b, L]` with one `[L, 2L]` mask (no per-block copies of the context keys).
    Both layouts show a block exactly the same keys (those before its start and its own block,
    each within the sublayer's window) and the same boundary states, so the logits are equal;
    context position keys, which shift the context keys per block, use the per-block layout.
    block_len: defaults to the config's block size (`checks.zero_init_identity` uses 1).
    """

    def __init__(self, cache: TowerCache, record: dict, cfg: TwoTowerConfig, batch: int, n_blocks: int,
                 blocks: torch.Tensor | None = None, block_len: int | None = None):
        self.cache, self.record, self.cfg = cache, record, cfg
        self.b, self.n, self.B = batch, n_blocks, block_len or cfg.block_size
        self.L = n_blocks * self.B
        valid = cache.valid  # [b, L]: pads (left or right) are never keys, but see themselves
        dev = valid.device
        self.sequence_layout = blocks is None
        if blocks is None:
            blocks = torch.arange(batch * n_blocks, device=dev)
        self.rows, self.ks = blocks // n_blocks, blocks % n_blocks
        self.span = int(self.ks.max()) * self.B if blocks.numel() else 0
        """Context keys any block sees in the per-block layout (up to the latest block start)."""
        self.query_pos = cache.positions.reshape(batch * n_blocks, self.B)[blocks]  # [S, B]
        bv = valid.reshape(batch * n_blocks, self.B)[blocks]
        self.block_valid = None if bool(bv.all()) else bv
        self._masks: dict = {}

    # -- sequence layout (every block): queries [b, H, L, hd], keys = L context then L block keys
    def _to_seq(self, x):  # [b·n, H, B, hd] -> [b, H, L, hd]
        _, heads, _, hd = x.shape
        return x.view(self.b, self.n, heads, self.B, hd).transpose(1, 2).reshape(self.b, heads, self.L, hd)

    def _sequence_mask(self, window):
        key = ("seq", window)
        if key not in self._masks:
            if window is None:
                valid = self.cache.valid
                mask = block_training_mask(self.L, self.B, valid.device)  # [L, 2L]
                if self.block_valid is not None:
                    own = torch.eye(self.L, dtype=torch.bool, device=valid.device)
                    mask = torch.cat([valid[:, None, :] & mask[None, :, : self.L],
                                      (valid[:, None, :] | own) & mask[None, :, self.L:]], dim=2)[:, None]
            else:
                near = window_mask(self.cache.positions, self.cache.positions, window)  # [b, 1, L, L]
                mask = self._sequence_mask(None) & torch.cat([near, near], dim=-1)
            self._masks[key] = mask
        return self._masks[key]

    # -- per-block layout: queries [S, H, B, hd], keys = `span` context keys then B block keys
    def _block_masks(self, window):
        """(context mask `[S, 1, B, span]`, own-block mask `[S, 1, B, B]`)."""
        key = ("block", window)
        if key not in self._masks:
            if window is None:
                valid, span = self.cache.valid, self.span
                pos = torch.arange(span, device=valid.device)
                sees = (pos[None, :] < (self.ks * self.B)[:, None]) & valid[self.rows, :span]
                ctx_mask = sees[:, None, None, :].expand(-1, 1, self.B, -1)
                own = torch.eye(self.B, dtype=torch.bool, device=valid.device)
                bv = valid.reshape(self.b * self.n, self.B)[self.rows * self.n + self.ks]
                own_mask = (own[None] | bv[:, None, :])[:, None]
            else:
                ctx_mask, own_mask = self._block_masks(None)
                ctx_mask = ctx_mask & window_mask(self.query_pos, self.cache.positions[self.rows, : self.span], window)
                own_mask = own_mask & window_mask(self.query_pos, self.query_pos, window)
            self._masks[key] = (ctx_mask, own_mask)
        return self._masks[key]

    def context_key_index(self, rows):
        pos = self.cache.positions
        return clipped_key_index(pos[self.rows, self.ks * self.B], pos[self.rows, : self.span], rows)

    def attend(self, sub, q, k, v, scale, key_shift=None):
        i, context_kv = sub.index, self.cfg.attention_conditioning != "none"
        keys, values = context_keys(self.cache, self.cfg, i) if context_kv else (None, None)
        if self.sequence_layout and key_shift is None:
            q, k, v = self._to_seq(q), self._to_seq(k), self._to_seq(v)
            mask = self._sequence_mask(sub.window)
            if context_kv:
                k = torch.cat([keys.to(k.dtype), k], dim=2)
                v = torch.cat([values.to(v.dtype), v], dim=2)
            else:
                mask = mask[..., self.L:]
            return attention(q, k, v, mask, scale, sub.logit_softcap).view(self.b * self.n, self.B, -1)
        ctx_mask, own_mask = self._block_masks(sub.window)
        span = self.span
        if context_kv and span:
            ctx_k = keys[self.rows, :, :span]
            if key_shift is not None:
                ctx_k = ctx_k + key_shift
            k = torch.cat([ctx_k.to(k.dtype), k], dim=2)
            v = torch.cat([values[self.rows, :, :span].to(v.dtype), v], dim=2)
            mask = torch.cat([ctx_mask, own_mask], dim=-1)
        else:
            mask = own_mask
        return attention(q, k, v, mask, scale, sub.logit_softcap)

    def seed(self, i):
        if self.cfg.mamba_conditioning != "seeded_state":
            return None, None
        states = self.record["states"][i][self.rows, self.ks]  # state before each block start
        xbc = self.record["xbc"][i]  # [b, Cd, K-1+L]: zeros, then the clean pre-conv inputs
        width = xbc.shape[-1] - self.L
        conv = xbc.unfold(-1, width, self.B)[self.rows, :, self.ks]  # [S, Cd, K-1]
        return conv, states

    def cross(self, i, module, x):
        if self.sequence_layout:
            ctx = self.cache.hidden[i]  # [b, L, d]
            mask = self._sequence_mask(None)[..., : self.L]
            out = module(x.view(self.b, self.L, -1), ctx, mask if mask.dim() == 4 else mask[None, None])
            return out.view(self.b * self.n, self.B, -1)
        span = self.span
        ctx = self.cache.hidden[i][self.rows, : max(span, 1)]
        ctx_mask = self._block_masks(None)[0]
        mask = ctx_mask if span else ctx_mask.new_zeros(x.shape[0], 1, self.B, 1)
        return module(x, ctx, mask)


class DecodeContext:
    """One block per sequence on top of the context tower's cache (moved to the denoiser's device).
    Masks are built once per block (and window), not per denoiser step."""

    block_valid = None  # decoded blocks hold no pads

    def __init__(self, cache: TowerCache, cfg: TwoTowerConfig, block_len: int):
        self.cache, self.cfg = cache, cfg
        dev = cache.valid.device
        ones = torch.ones(cache.valid.shape[0], block_len, dtype=torch.bool, device=dev)
        self.query_pos = cache.next_pos[:, None] + torch.arange(block_len, device=dev)  # [N, B]
        self._masks = {None: torch.cat([cache.valid, ones], dim=1)[:, None, None, :]}  # [N, 1, 1, T+B]
        self._key_index: tuple[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def _mask(self, window):
        mask = self._masks.get(window)
        if mask is None:
            keys = torch.cat([self.cache.positions, self.query_pos], dim=1)
            mask = self._masks[None] & window_mask(self.query_pos, keys, window)  # [N, 1, B, T+B]
            self._masks[window] = mask
        return mask

    def context_key_index(self, rows):
        if self._key_index is None or self._key_index[0] != rows:  # one per block, not per step
            index = clipped_key_index(self.cache.next_pos, self.cache.positions, rows)
            self._key_index = (rows, index)
        return self._key_index[1]

    def attend(self, sub, q, k, v, scale, key_shift=None):
        i, mask = sub.index, self._mask(sub.window)
        if self.cfg.attention_conditioning != "none" and self.cache.length:
            keys, values = context_keys(self.cache, self.cfg, i)
            ctx_k = keys if key_shift is None else keys + key_shift
            k = torch.cat([ctx_k.to(k.dtype), k], dim=2)
            v = torch.cat([values.to(v.dtype), v], dim=2)
        else:
            mask = mask[..., self.cache.length:]
        return attention(q, k, v, mask, scale, sub.logit_softcap)

    def seed(self, i):
        if self.cfg.mamba_conditioning != "seeded_state":
            return None, None
        return self.cache.conv.get(i), self.cache.ssm.get(i)

    def cross(self, i, module, x):
        valid = self.cache.valid[:, None, None, :].expand(-1, 1, x.shape[1], -1)
        return module(x, self.cache.hidden[i], valid)
