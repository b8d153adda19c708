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

    @classmethod
    def empty(cls, batch: int, device) -> "TowerCache":
        return cls(
            valid=torch.zeros(batch, 0, dtype=torch.bool, device=device),
            next_pos=torch.zeros(batch, dtype=torch.long, device=device),
            positions=torch.zeros(batch, 0, dtype=torch.long, device=device),
        )

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def _map(self, fn) -> "TowerCache":
        def each(d):
            return {k: fn(v) for k, v in d.items()}

        return TowerCache(
            fn(self.valid), fn(self.next_pos), fn(self.positions), each(self.keys), each(self.values),
            each(self.conv), each(self.ssm), each(self.hidden),
        )

    def to(self, device) -> "TowerCache":
        """The same cache on `device` (no copy when already there)."""
        if self.valid.device == torch.device(device):
            return self
        return self._map(lambda t: t.to(device))

    def clone(self) -> "TowerCache":
        return self._map(lambda t: t.clone())

    def select(self, index: torch.Tensor) -> "TowerCache":
        """Rows `index` of the batch."""
        return self._map(lambda t: t[index])
