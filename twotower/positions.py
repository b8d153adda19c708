"""Which logits predict which block position, and which id pads: small rules every path shares
(training loss, decoding, benchmarks), kept in a leaf module so none of them imports another for it.
"""
from __future__ import annotations

import torch


def prediction_logits(logits: torch.Tensor, token_shift: bool) -> torch.Tensor:
    """`[N, B, V]` denoiser outputs -> per block position the logits predicting it. With token
    shift output j predicts position j+1, so position 0 gets zeros (the denoiser never predicts it:
    it is the context tower's token)."""
    if not token_shift:
        return logits
    return torch.cat([torch.zeros_like(logits[:, :1]), logits[:, :-1]], dim=1)


def pad_id_of(config) -> int:
    """A backbone config's pad id: `pad_token_id`, else `eos_token_id` (the first of a list), else 0."""
    for key in ("pad_token_id", "eos_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0
