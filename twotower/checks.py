"""Checks the pipeline stages run on a built model (attach_conditioning, freeze_context).

zero_init_identity: with AdaLN, gates and cross-attention at their zero init, every denoiser
sublayer computes what the backbone's sublayer computes on the same inputs (invariant 4).
context_matches: the context tower is bit-identical to a reference backbone (invariant 1).
"""
from __future__ import annotations

import torch

from twotower.ops import attention, causal_mask, mamba2_mixer


@torch.no_grad()
def zero_init_identity(model, input_ids: torch.Tensor, t: float = 0.5) -> float:
    """Max |Δ| over sublayers between the denoiser's wrapped sublayer and the context tower's
    sublayer, both fed the context tower's input hidden states of `input_ids` `[b, T]` (causal)."""
    den, ctx = model.denoiser, model.context_walk
    dev = next(den.parameters()).device
    ids = input_ids.to(dev)
    b, T = ids.shape
    positions = torch.arange(T, device=dev).expand(b, T)
    mask = causal_mask(torch.ones(b, T, dtype=torch.bool, device=dev), T)
    mod = den.modulation(torch.full((b,), t, device=dev))
    h = ctx.adapter.embed(ctx.model, ids.to(next(ctx.model.parameters()).device)).to(dev)
    worst = 0.0
    for sub_c, sub_d in zip(ctx.subs, den.walk.subs):
        ref = _sublayer(ctx, sub_c, h, positions, mask, B=model.block_size)
        out = _sublayer(den.walk, sub_d, h, positions, mask, B=model.block_size,
                        mod=None if mod is None else mod[:, sub_d.index])
        if model.tt_config.cross_attention:  # zero gate: the module must add exactly nothing
            out = out + den.cross_attn[sub_d.index](sub_d.norm(h), h, mask)
        worst = max(worst, (out - ref).abs().max().item())
        h = h + ref
    if model.tt_config.context_position_keys:  # zero offsets: the context keys stay the tower's own
        worst = max([worst] + [p.abs().max().item() for p in den.context_key_pos.values()])
    return worst


def _sublayer(walk, sub, h, positions, mask, B, mod=None):
    """One residual step's update `(1+gate)·mixer(norm(h)·(1+scale)+shift)` on a full sequence."""
    x = sub.norm(h)
    if mod is not None:
        x = x * (1 + mod[:, 1, None]) + mod[:, 0, None]
    if sub.kind == "attention":
        q, k, v = walk.adapter.qkv(walk.model, sub, x, positions)
        out = walk.adapter.attn_out(sub, attention(q, k, v, mask, walk.adapter.attn_scale(sub)))
    elif sub.kind == "mamba":
        out, _, _ = mamba2_mixer(walk.mamba(sub), x, None, None, None, B)
    else:
        out = walk.adapter.ffn(sub, x)
    return out if mod is None else out * (1 + mod[:, 2, None])


@torch.no_grad()
def context_matches(model, backbone) -> bool:
    """True when every context-tower tensor equals the backbone's, bit for bit."""
    mine = model.context_tower.state_dict()
    ref = backbone.state_dict()
    if mine.keys() != ref.keys():
        return False
    return all(torch.equal(mine[k].cpu(), ref[k].cpu()) for k in ref)
