"""`TowerCache`: the context tower's decoding state, our own (not HF `DynamicCache`).

Per attention sublayer the keys/values of every position, per Mamba-2 sublayer the conv state
(last K-1 pre-convolution inputs) and SSM state, plus which positions are real (left padding)
and each sequence's next RoPE position. Updates replace tensors (never in place), so a denoiser
step can read the cache while nothing mutates it underneath.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TowerCache:
    """Decoding state of one tower for a batch of sequences."""

    valid: torch.Tensor
    """`[N, T]` bool: True at real tokens, False at left pads."""
    next_pos: torch.Tensor
    """`[N]` long: the position id the next real token of each sequence gets."""
    positions: torch.Tensor
    """`[N, T]` long: the position id of every cached key (a left pad has the next real
    token's); sliding windows are counted on these."""
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    """sublayer index -> `[N, Hkv, T, hd]` (RoPE applied)."""
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    """sublayer index -> `[N, Hkv, T, hd]`."""
    conv: dict[int, torch.Tensor] = field(default_factory=dict)
    """sublayer index -> `[N, Cd, K-1]` pre-convolution inputs."""
    ssm: dict[int, torch.Tensor] = field(default_factory=dict)
    """sublayer index -> `[N, H, P, S]` float32."""
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    """sublayer index -> `[N, T, d]` input hidden states (only with cross_attention)."""
    fused_keys: dict[int, torch.Tensor] = field(default_factory=dict)
    """Denoiser attention sublayer index -> `[N, Hkv, T, hd]`: the keys that sublayer's own
    projections make of the fused context feature (only with attention_conditioning=fused_kv;
    they depend on denoiser weights, so the tower's forward gets them from `ContextFeatures`)."""
    fused_values: dict[int, torch.Tensor] = field(default_factory=dict)
    """As `fused_keys`, the values."""
    ids: torch.Tensor | None = None
    """`[N, T]` long: the token id of every column (what a rebuild re-prefills: `twotower.rope_switch`);
    None on a cache built without them."""

    @classmethod
    def empty(cls, batch: int, device) -> "TowerCache":
        return cls(
            valid=torch.zeros(batch, 0, dtype=torch.bool, device=device),
            next_pos=torch.zeros(batch, dtype=torch.long, device=device),
            positions=torch.zeros(batch, 0, dtype=torch.long, device=device),
            ids=torch.zeros(batch, 0, dtype=torch.long, device=device),
        )

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def _map(self, fn) -> "TowerCache":
        def each(d):
            return {k: fn(v) for k, v in d.items()}

        return TowerCache(
            fn(self.valid), fn(self.next_pos), fn(self.positions), each(self.keys), each(self.values),
            each(self.conv), each(self.ssm), each(self.hidden), each(self.fused_keys), each(self.fused_values),
            None if self.ids is None else fn(self.ids),
        )

    def to(self, device) -> "TowerCache":
        """The same cache on `device` (no copy when already there)."""
        if self.valid.device == torch.device(device):
            return self
        return self._map(lambda t: t.to(device))

    def clone(self) -> "TowerCache":
        return self._map(lambda t: t.clone())

    def select(self, index: torch.Tensor) -> "TowerCache":
        """Rows `index` of the batch, without the leading columns no remaining row uses (a row that
        left the batch may have been the only one with a long prompt)."""
        picked = self._map(lambda t: t[index])
        used = picked.valid.any(0)
        start = int(used.float().argmax()) if bool(used.any()) else picked.length
        return picked._columns(slice(start, None)) if start else picked

    def join(self, other: "TowerCache") -> "TowerCache":
        """This cache's rows, then `other`'s (continuous batching: prompts prefilled on their own join
        a batch in flight). Rows stay right-aligned: the narrower cache gains invalid left-pad columns
        (zero keys, values and hidden states, which attention never sees; a pad's position is its
        row's first column's, as for a prompt's left pads). Both come from the same tower, so they
        cache the same sublayers."""
        if set(self.keys) != set(other.keys) or set(self.conv) != set(other.conv) or \
                set(self.hidden) != set(other.hidden) or set(self.fused_keys) != set(other.fused_keys):
            raise ValueError("TowerCache.join: the caches hold different sublayers (not the same tower or options)")
        width = max(self.length, other.length)
        a, b = self._left_padded(width), other.to(self.valid.device)._left_padded(width)

        def cat(x: dict, y: dict) -> dict:
            return {i: torch.cat([x[i], y[i]]) for i in x}

        ids = None if a.ids is None or b.ids is None else torch.cat([a.ids, b.ids])
        return TowerCache(torch.cat([a.valid, b.valid]), torch.cat([a.next_pos, b.next_pos]),
                          torch.cat([a.positions, b.positions]), cat(a.keys, b.keys), cat(a.values, b.values),
                          cat(a.conv, b.conv), cat(a.ssm, b.ssm), cat(a.hidden, b.hidden),
                          cat(a.fused_keys, b.fused_keys), cat(a.fused_values, b.fused_values), ids)

    def _left_padded(self, width: int) -> "TowerCache":
        """The same rows, `width` columns: invalid pad columns in front."""
        n = width - self.length
        if n == 0:
            return self
        rows = self.valid.shape[0]
        first = self.positions[:, :1] if self.length else self.next_pos[:, None]

        def front(t: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = n
            return torch.cat([t.new_zeros(shape), t], dim)

        return TowerCache(
            front(self.valid, 1), self.next_pos, torch.cat([first.expand(rows, n), self.positions], 1),
            {i: front(k, 2) for i, k in self.keys.items()}, {i: front(v, 2) for i, v in self.values.items()},
            dict(self.conv), dict(self.ssm), {i: front(h, 1) for i, h in self.hidden.items()},
            {i: front(k, 2) for i, k in self.fused_keys.items()},
            {i: front(v, 2) for i, v in self.fused_values.items()},
            None if self.ids is None else front(self.ids, 1),
        )

    def _columns(self, cols) -> "TowerCache":
        """The same rows, time columns `cols` (a slice) only; Mamba states are untouched."""
        return TowerCache(
            self.valid[:, cols], self.next_pos, self.positions[:, cols],
            {i: k[:, :, cols] for i, k in self.keys.items()}, {i: v[:, :, cols] for i, v in self.values.items()},
            dict(self.conv), dict(self.ssm), {i: h[:, cols] for i, h in self.hidden.items()},
            {i: k[:, :, cols] for i, k in self.fused_keys.items()},
            {i: v[:, :, cols] for i, v in self.fused_values.items()},
            None if self.ids is None else self.ids[:, cols],
        )

    def drop_last(self, drop: torch.Tensor, conv: dict[int, torch.Tensor],
                  ssm: dict[int, torch.Tensor]) -> "TowerCache":
        """Roll each row back by `drop[i]` `[N]` positions (the rejected tail of a verified draft).

        Keys, values (the fused ones too), hidden states, positions and validity lose their last `drop[i]` columns; rows
        stay right-aligned (a row that drops fewer than another keeps its columns, the others gain
        invalid left pads, which attention never sees), and the width shrinks by `min(drop)`.
        Mamba-2 states summarise the whole prefix, so they cannot be cut: the caller passes each
        sublayer's conv and SSM state at the accepted length (`conv`, `ssm`)."""
        low = int(drop.min())
        width = self.length - low
        shift = drop - low
        next_pos = self.next_pos - drop
        if not bool(shift.any()):  # every row drops the same: a slice, no copy
            cut = self._columns(slice(0, width))
            return TowerCache(cut.valid, next_pos, cut.positions, cut.keys, cut.values, conv, ssm, cut.hidden,
                              cut.fused_keys, cut.fused_values, cut.ids)
        src = torch.arange(width, device=drop.device)[None] - shift[:, None]  # [N, width]
        pads = src < 0
        src = src.clamp(min=0)

        def along(t: torch.Tensor, dim: int) -> torch.Tensor:
            shape = [1] * t.dim()
            shape[0], shape[dim] = src.shape[0], width
            index = src.view(shape).expand(*[width if d == dim else n for d, n in enumerate(t.shape)])
            return t.gather(dim, index)

        return TowerCache(
            along(self.valid, 1) & ~pads, next_pos, along(self.positions, 1),
            {i: along(k, 2) for i, k in self.keys.items()}, {i: along(v, 2) for i, v in self.values.items()},
            conv, ssm, {i: along(h, 1) for i, h in self.hidden.items()},
            {i: along(k, 2) for i, k in self.fused_keys.items()},
            {i: along(v, 2) for i, v in self.fused_values.items()},
            None if self.ids is None else along(self.ids, 1),
        )
